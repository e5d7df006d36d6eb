"""Greedy output and logprobs against Hugging Face `transformers` (float32, CPU), alone and under
preemption, forced-small prefill chunks and prefix-cache hits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from seekserve.engine import LLMEngine, SamplingParams
from tests.engine.conftest import make_engine

MAX_TOKENS = 24


def hf_greedy(model, ids: list[int], max_new_tokens: int = MAX_TOKENS, **kw):
    """transformers' greedy generate with EOS switched off (our side uses ignore_eos=True)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=2, **kw)


def make_prompts(vocab: int, count: int = 22, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 90) for _ in range(count)]
    return [[0] + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def golden(request: pytest.FixtureRequest, llama_path: Path, qwen2_path: Path):
    """(checkpoint path, prompts, reference greedy tokens, reference top-5 per step)."""
    from transformers import AutoModelForCausalLM

    path = llama_path if request.param == "llama" else qwen2_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts(model.config.vocab_size)
    refs, tops = [], []
    for ids in prompts:
        out = hf_greedy(model, ids, output_logits=True, return_dict_in_generate=True)
        refs.append(out.sequences[0, len(ids):].tolist())
        tops.append([step[0].topk(5).indices.tolist() for step in out.logits])
    return path, prompts, refs, tops, model


def assert_matches(got: list[list[int]], refs: list[list[int]], tops: list[list[list[int]]]) -> None:
    """Equal tokens, or where they differ: first 8 equal and the choice is in the reference's top-5."""
    for i, (g, r) in enumerate(zip(got, refs)):
        if g == r:
            continue
        assert g[:8] == r[:8], f"prompt {i}: first tokens differ: {g[:8]} vs {r[:8]}"
        k = next(j for j in range(len(r)) if g[j] != r[j])
        assert g[k] in tops[i][k], f"prompt {i}, step {k}: {g[k]} not in reference top-5 {tops[i][k]}"
        # after a divergence the continuations are different texts: the next prompt


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native-kernels", "pytorch-only"])
def test_greedy_batch_matches_transformers(golden, native_kernels: bool, monkeypatch) -> None:
    """Both paths: the native CPU kernels (attention, norm, rotary, SiLU) and the plain PyTorch fallback."""
    from seekserve.engine import kernels

    if not native_kernels:
        monkeypatch.setattr(kernels, "kernels_for", lambda t: None)
    path, prompts, refs, tops, _ = golden
    engine = make_engine(path, enable_prefix_caching=False)
    got = greedy(engine, prompts)
    assert sum(g == r for g, r in zip(got, refs)) >= len(refs) - 1   # float32: near-exact
    assert_matches(got, refs, tops)


def test_greedy_under_preemption(golden) -> None:
    path, prompts, refs, tops, _ = golden
    # 20 blocks of 16 tokens for 22 prompts of up to ~115 tokens: sequences must be preempted
    engine = make_engine(path, kv_cache_memory_gb=20 * 2 * 2 * 16 * 2 * 16 * 4 / 2**30, max_model_len=256,
                         enable_prefix_caching=False)
    assert engine.resolved.num_blocks == 20
    got = greedy(engine, prompts)
    assert engine.scheduler.num_preemptions > 0
    assert_matches(got, refs, tops)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_under_priority_pauses_and_evictions(golden, monkeypatch) -> None:
    """Worse priorities first, better ones arriving while the batch is full, in a cache too small for
    all: sequences are paused (KV kept), paused ones give their blocks up, running ones are recomputed;
    every output still matches transformers."""
    path, prompts, refs, tops, _ = golden
    engine = make_engine(path, kv_cache_memory_gb=20 * 2 * 2 * 16 * 2 * 16 * 4 / 2**30, max_model_len=256,
                         max_num_seqs=4, enable_prefix_caching=False)
    calls = {"_pause": 0, "_evict_paused": 0, "_preempt": 0}
    for name in calls:
        original = getattr(engine.scheduler, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(engine.scheduler, name, counted)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    arrivals = sorted(range(len(prompts)), key=lambda i: -(i % 3))     # priority 2 first, then 1, then 0
    while arrivals or engine.has_unfinished_requests():
        for _ in range(2 if arrivals else 0):                             # two arrivals per step
            i = arrivals.pop(0)
            engine.add_request(str(i), prompts[i], params, priority=i % 3)
        for out in engine.step():
            got[int(out.request_id)].extend(out.token_ids)
    assert calls["_pause"] > 0 and calls["_evict_paused"] > 0 and calls["_preempt"] > 0, calls
    assert_matches([got[i] for i in range(len(prompts))], refs, tops)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_with_small_prefill_chunks(golden) -> None:
    path, prompts, refs, tops, _ = golden
    engine = make_engine(path, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert_matches(greedy(engine, prompts), refs, tops)


def test_small_chunks_are_attended_row_wise(llama_path) -> None:
    """A chunk of <= ROWWISE_CHUNK_TOKENS joins the decodes: one query row per token, each seeing its causal
    prefix in the cache (the greedy tests above check the numbers; this pins the layout)."""
    from seekserve.engine.runner import ROWWISE_CHUNK_TOKENS, ModelRunner

    engine = make_engine(llama_path, max_num_batched_tokens=7, enable_prefix_caching=False)
    engine.add_request("a", [0, *range(3, 23)], SamplingParams(max_tokens=2, ignore_eos=True))
    try:
        out = engine.scheduler.schedule()
        assert [s.num_new_tokens for s in out.scheduled] == [7] and 7 <= ROWWISE_CHUNK_TOKENS
        _, _, meta, _ = engine.runner._prepare(ModelRunner.sampled_order(out.scheduled))
        assert engine.runner.native and meta.prefill is None
        assert meta.decode.num_tokens == 7 and meta.decode.kv_lens.tolist() == list(range(1, 8))
    finally:
        engine.abort("a")


def test_greedy_with_prefix_cache_hits(golden) -> None:
    path, prompts, refs, tops, model = golden
    engine = make_engine(path, block_size=4)
    shared = prompts[0][:1] + list(range(10, 50))               # 41-token shared prefix
    variants = [shared + p[1:6] for p in prompts[:6]]
    var_refs = [hf_greedy(model, v)[0, len(v):].tolist() for v in variants]
    first = engine.generate([variants[0]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                          ignore_eos=True))[0]
    assert first.num_cached_tokens == 0
    outs = engine.generate(variants[1:], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    assert [o.num_cached_tokens for o in outs] == [40] * 5        # 10 full blocks of 4
    assert [first.token_ids] + [o.token_ids for o in outs] == var_refs
    again = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    assert_matches([o.token_ids for o in again], refs, tops)


def test_logprobs_equal_log_softmax_of_reference(golden) -> None:
    path, prompts, _, _, model = golden
    engine = make_engine(path)
    ids = prompts[3]
    out = engine.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True))[0]
    seq = torch.tensor([ids + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(seq).logits[0].float(), dim=-1)
    assert len(out.logprobs) == 6
    for step, lp in enumerate(out.logprobs):
        row = ref[len(ids) - 1 + step]
        assert lp.token_id == out.token_ids[step]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        ref_top = row.topk(5)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist()
        for (_, v), rv in zip(lp.top, ref_top.values.tolist()):
            assert abs(v - rv) < 1e-4


def test_equal_length_prompts_take_the_causal_fast_path(golden) -> None:
    """Fresh prompts of one length are attended without a mask or a cache gather; same tokens."""
    path, prompts, _, _, model = golden
    same = [p[:1] + [(t * 7 + i) % 400 + 3 for t in range(30)] for i, p in enumerate(prompts[:6])]
    refs = [hf_greedy(model, s)[0, len(s):].tolist() for s in same]
    engine = make_engine(path, enable_prefix_caching=False)
    assert greedy(engine, same) == refs
