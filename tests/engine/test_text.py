"""Text out of tokens: incremental UTF-8 detokenization and stop strings across token boundaries."""

from __future__ import annotations

import pytest

from seekserve.engine import SamplingParams
from seekserve.engine.output_processor import append_token, make_output
from seekserve.engine.sequence import Sequence
from seekserve.engine.tokenizer import BYTE_DECODER, IncrementalDetokenizer, Tokenizer

CHINESE = "深度求索是一家人工智能公司。你好，世界！"


@pytest.fixture(scope="module")
def tokenizer(llama_path) -> Tokenizer:
    return Tokenizer(llama_path)


def _byte_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per byte (the byte-level alphabet), so every multi-byte character spans tokens."""
    char_of_byte = {b: ch for ch, b in BYTE_DECODER.items()}
    ids = [tokenizer._tok.token_to_id(char_of_byte[b]) for b in text.encode()]
    assert None not in ids
    return ids


def test_incremental_chinese_never_emits_replacement_char(tokenizer: Tokenizer) -> None:
    for ids in (tokenizer.encode(CHINESE, add_special_tokens=False), _byte_tokens(tokenizer, CHINESE)):
        detok = IncrementalDetokenizer(tokenizer, [0, 5, 6])
        deltas = [detok.add([t]) for t in ids]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) + detok.flush() == CHINESE
    assert len(_byte_tokens(tokenizer, CHINESE)) > len(CHINESE)  # characters really were split


def _run(tokenizer: Tokenizer, text_ids: list[int], params: SamplingParams) -> tuple[str, list, Sequence]:
    seq = Sequence("r", 0, [0], params, 0, IncrementalDetokenizer(tokenizer, [0]), None)
    outs = []
    for t in text_ids:
        append_token(seq, t, None, frozenset({1}), 10_000)
        out = make_output(seq)
        if out is not None:
            outs.append(out)
        if seq.finish_reason:
            break
    return "".join(o.text for o in outs), outs, seq


def test_stop_string_split_across_tokens_is_cut(tokenizer: Tokenizer) -> None:
    text = "Hello world. The answer is 82. END of story"
    ids = _byte_tokens(tokenizer, text)      # "END" arrives as three tokens
    streamed, outs, seq = _run(tokenizer, ids, SamplingParams(stop=["END"], max_tokens=500))
    assert streamed == "Hello world. The answer is 82. "
    assert seq.finish_reason == "stop" and seq.stop_reason == "END"
    assert outs[-1].finish_reason == "stop"
    assert all("E" not in o.text for o in outs)   # never emitted a partial stop string


def test_stop_string_with_chinese_and_multiple_candidates(tokenizer: Tokenizer) -> None:
    ids = _byte_tokens(tokenizer, CHINESE)
    streamed, _, seq = _run(tokenizer, ids, SamplingParams(stop=["世界", "公司"], max_tokens=500))
    assert streamed == "深度求索是一家人工智能"
    assert seq.stop_reason == "公司"


def test_stop_token_and_eos_and_length(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    text, _, seq = _run(tokenizer, ids + [1] + ids, SamplingParams(max_tokens=100))
    assert text == "Hello world" and seq.finish_reason == "stop" and seq.stop_reason is None
    text, _, seq = _run(tokenizer, ids + [1] + ids, SamplingParams(max_tokens=100, ignore_eos=True))
    assert seq.finish_reason is None and seq.num_output_tokens == 2 * len(ids) + 1
    text, _, seq = _run(tokenizer, ids * 3, SamplingParams(max_tokens=100, stop_token_ids=(ids[1],)))
    assert seq.finish_reason == "stop" and seq.stop_reason == ids[1] and text == tokenizer.decode(ids[:1])
    text, _, seq = _run(tokenizer, ids * 5, SamplingParams(max_tokens=3))
    assert seq.finish_reason == "length" and seq.num_output_tokens == 3


def test_engine_stop_strings_end_to_end(llama_engine) -> None:
    base = llama_engine.generate([[0, 40, 41]], SamplingParams(max_tokens=30, temperature=0.0,
                                                                ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    out = llama_engine.generate([[0, 40, 41]], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                              stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[:base.text.find(stop)]
