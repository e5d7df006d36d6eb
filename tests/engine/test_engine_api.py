"""The step-level API, request validation, and AsyncEngine streaming and abort."""

from __future__ import annotations

import asyncio

import pytest

from seekserve.engine import AsyncEngine, InvalidRequestError, SamplingParams
from tests.engine.conftest import make_engine


def test_step_api_streams_increments(llama_engine) -> None:
    llama_engine.add_request("a", [0, 5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    llama_engine.add_request("b", "Hello world", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                             priority=-1)
    seen: dict[str, list] = {"a": [], "b": []}
    steps = 0
    while llama_engine.has_unfinished_requests():
        for out in llama_engine.step():
            seen[out.request_id].append(out)
        steps += 1
    assert steps <= 6
    for rid, n in (("a", 5), ("b", 3)):
        assert [len(o.token_ids) for o in seen[rid]] == [1] * n
        assert [o.num_output_tokens for o in seen[rid]] == list(range(1, n + 1))
        assert seen[rid][-1].finish_reason == "length" and all(o.finish_reason is None for o in seen[rid][:-1])


def test_abort_frees_blocks_now(llama_engine) -> None:
    bm = llama_engine.block_manager
    free_before = bm.num_free_blocks
    llama_engine.add_request("x", [0] + list(range(3, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    llama_engine.step()
    assert bm.num_free_blocks < free_before
    llama_engine.abort("x")
    assert bm.num_free_blocks == free_before
    assert not llama_engine.has_unfinished_requests()


def test_prompt_longer_than_context_is_refused(llama_path) -> None:
    engine = make_engine(llama_path, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="70 tokens.*64 tokens") as err:
        engine.add_request("long", [0] * 70)
    assert err.value.param == "prompt"
    out = engine.generate([[0] * 60], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4   # capped by the context, not truncated


@pytest.mark.parametrize("prompt", [[], [0, 10**6], [0, -1], [1.5], [True], None])
def test_bad_prompts_raise(llama_engine, prompt) -> None:
    with pytest.raises(InvalidRequestError):
        llama_engine.add_request("bad", prompt)


def test_duplicate_request_id(llama_engine) -> None:
    llama_engine.add_request("dup", [0, 3], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="already in use"):
        llama_engine.add_request("dup", [0, 3], SamplingParams(max_tokens=1))
    while llama_engine.has_unfinished_requests():
        llama_engine.step()


def test_max_model_len_above_model_limit_refused(llama_path) -> None:
    with pytest.raises(InvalidRequestError, match="exceeds the model's limit"):
        make_engine(llama_path, max_model_len=100_000)


def test_kv_budget_too_small_for_one_sequence(llama_path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot hold one sequence"):
        make_engine(llama_path, kv_cache_memory_gb=1e-5)


def test_priority_request_preempts_running_one(llama_path) -> None:
    engine = make_engine(llama_path, max_num_seqs=2)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = engine.generate([[0, 9, 9], [0, 8, 8]], long)
    engine.add_request("s1", [0, 9, 9], long, priority=1)
    engine.add_request("s2", [0, 8, 8], long, priority=1)
    for _ in range(5):
        engine.step()
    engine.add_request("vip", [0, 7], SamplingParams(max_tokens=2, temperature=0.0), priority=0)
    outs = engine.step()
    assert any(o.request_id == "vip" for o in outs)          # started within one step
    results: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            results.setdefault(o.request_id, []).extend(o.token_ids)
    assert engine.scheduler.num_preemptions >= 1
    # the preempted request resumes with output identical to an uninterrupted run
    assert ref[0].token_ids[-len(results["s1"]):] == results["s1"]
    assert ref[1].token_ids[-len(results["s2"]):] == results["s2"]


async def _collect(engine: AsyncEngine, prompt, params, **kw):
    return [o async for o in engine.generate(prompt, params, **kw)]


def test_async_engine_streams_and_matches_offline(llama_path) -> None:
    engine = make_engine(llama_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    offline = engine.generate([[0, 5, 6], [0, 7, 8, 9]], params)
    async_engine = AsyncEngine(engine)

    async def main():
        return await asyncio.gather(_collect(async_engine, [0, 5, 6], params),
                                    _collect(async_engine, [0, 7, 8, 9], params))

    try:
        streams = asyncio.run(main())
    finally:
        async_engine.shutdown()
    for stream, ref in zip(streams, offline):
        assert sum((o.token_ids for o in stream), []) == ref.token_ids
        assert "".join(o.text for o in stream) == ref.text
        assert stream[-1].finished and stream[-1].num_prompt_tokens == len(ref.prompt_token_ids)


def test_async_invalid_request_raises_before_streaming(llama_engine) -> None:
    async_engine = AsyncEngine(llama_engine)

    async def main():
        with pytest.raises(InvalidRequestError):
            await _collect(async_engine, [], SamplingParams())

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_async_consumer_leaving_frees_blocks_within_a_step(llama_path) -> None:
    engine = make_engine(llama_path)
    async_engine = AsyncEngine(engine)
    free_total = engine.block_manager.num_blocks

    async def main():
        gen = async_engine.generate([0] + list(range(3, 40)), SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in gen:
            assert engine.block_manager.num_free_blocks < free_total
            break
        await gen.aclose()   # the consumer goes away (a client disconnect)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if async_engine.stats().num_running == 0:
                break
        return async_engine.stats()

    try:
        stats = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert engine.block_manager.num_free_blocks == free_total


def test_async_cancelled_task_aborts(llama_path) -> None:
    engine = make_engine(llama_path)
    async_engine = AsyncEngine(engine)

    async def main():
        task = asyncio.create_task(_collect(async_engine, [0, 3, 4], SamplingParams(max_tokens=5000,
                                                                                     ignore_eos=True)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            await asyncio.sleep(0.01)
            if async_engine.stats().num_running == 0:
                return True
        return False

    try:
        assert asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_shutdown_fails_open_streams_instead_of_leaving_them_waiting(llama_path) -> None:
    from seekserve.engine.errors import EngineDeadError

    engine = make_engine(llama_path)
    async_engine = AsyncEngine(engine)

    async def main():
        gen = async_engine.generate([0, 3, 4], SamplingParams(max_tokens=5000, ignore_eos=True))
        await anext(gen)
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async with asyncio.timeout(10):
                async for _ in gen:
                    pass

    asyncio.run(main())
