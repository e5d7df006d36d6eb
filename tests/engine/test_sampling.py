"""Seeded sampling, the allowed set of top-k / top-p / min-p, penalties and min_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from seekserve.engine import SamplingParams
from seekserve.engine.sampler import Sampler
from seekserve.engine.sequence import Sequence

PROMPT = [0, 40, 41, 42, 43, 44]


def test_seed_reproducible_alone_and_in_busy_batch(llama_engine) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llama_engine.generate([PROMPT], params)[0].token_ids
    again = llama_engine.generate([PROMPT], params)[0].token_ids
    noise = SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True)
    busy = llama_engine.generate([PROMPT[:3] + [9] * 30, PROMPT, [0, 7, 8], PROMPT] + [PROMPT[:2]] * 5,
                                 [noise, params, noise, params] + [noise] * 5)
    assert alone == again
    assert busy[1].token_ids == alone and busy[3].token_ids == alone
    other = llama_engine.generate([PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=99,
                                                           ignore_eos=True))[0].token_ids
    assert other != alone


def test_n_completions_differ_and_are_reproducible(llama_engine) -> None:
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    first = llama_engine.generate([PROMPT], params)[0]
    second = llama_engine.generate([PROMPT], params)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in first.outputs)


def _seq(params: SamplingParams, tokens: list[int] | None = None, seed: int | None = None) -> Sequence:
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return Sequence("r", 0, tokens or [0, 1], params, 0, None, gen)  # type: ignore[arg-type]


def _allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The allowed set, computed independently in float64 with sorted Python lists."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    keep = set(order)
    if p.min_p > 0:
        keep = {i for i in keep if probs[i] >= p.min_p * probs[order[0]]}
    if p.top_k:
        kth = probs[order[min(p.top_k, len(order)) - 1]]
        keep = {i for i in keep if probs[i] >= kth}
    if p.top_p < 1:
        mass = sum(probs[i].item() for i in keep)
        acc, chosen = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            if chosen and acc / mass >= p.top_p + 1e-6:
                break
            chosen.add(i)
            acc += probs[i].item()
        keep = chosen
    return keep


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.5),
    SamplingParams(temperature=1.3, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.8, min_p=0.05),
])
def test_filters_never_emit_outside_allowed_set(params: SamplingParams) -> None:
    sampler = Sampler((), torch.device("cpu"), seed=0)
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    allowed = [_allowed(row, params) for row in logits]
    seen: list[set[int]] = [set() for _ in range(64)]
    for seed in range(60):
        seqs = [_seq(params, seed=seed * 64 + i) for i in range(64)]
        tokens, _ = sampler.sample(logits.clone(), seqs)
        for i, t in enumerate(tokens):
            assert t in allowed[i], f"row {i}: token {t} outside allowed set (seed {seed})"
            seen[i].add(t)
    # the filters keep real randomness: most rows with >1 allowed token show more than one choice
    multi = [i for i in range(64) if len(allowed[i]) > 1]
    assert sum(len(seen[i]) > 1 for i in multi) >= 0.8 * len(multi)


def test_sampling_follows_the_distribution() -> None:
    sampler = Sampler((), torch.device("cpu"), seed=3)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = [0, 0, 0]
    for _ in range(1500):
        [t], _ = sampler.sample(logits.clone(), [_seq(SamplingParams(temperature=1.0))])
        counts[t] += 1
    for c, p in zip(counts, [0.5, 0.3, 0.2]):
        assert abs(c / 1500 - p) < 4 * math.sqrt(p * (1 - p) / 1500)


def test_penalties_and_min_tokens() -> None:
    sampler = Sampler((1,), torch.device("cpu"))
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.9, 0.0]])
    # min_tokens masks EOS (1): greedy takes 2 instead
    seq = _seq(SamplingParams(temperature=0.0, min_tokens=2), tokens=[0])
    assert sampler.sample(logits.clone(), [seq])[0] == [2]
    # frequency penalty on a generated token 2 (twice) pushes greedy to 3
    seq = _seq(SamplingParams(temperature=0.0, frequency_penalty=0.1), tokens=[0])
    seq.token_ids += [2, 2]
    assert sampler.sample(torch.tensor([[0.0, 0.0, 4.0, 3.9, 0.0]]), [seq])[0] == [3]
    # presence penalty: once is enough
    seq = _seq(SamplingParams(temperature=0.0, presence_penalty=0.2), tokens=[0])
    seq.token_ids += [2]
    assert sampler.sample(torch.tensor([[0.0, 0.0, 4.0, 3.9, 0.0]]), [seq])[0] == [3]
    # repetition penalty also covers prompt tokens (token 2 in the prompt)
    seq = _seq(SamplingParams(temperature=0.0, repetition_penalty=1.1), tokens=[0, 2])
    assert sampler.sample(torch.tensor([[0.0, 0.0, 4.0, 3.9, 0.0]]), [seq])[0] == [3]


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -3}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": 2**70}, "seed"),
])
def test_invalid_params_raise_typed_error(kwargs: dict, param: str) -> None:
    from seekserve.engine import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
    assert param in str(err.value)
    assert isinstance(err.value, ValueError)
