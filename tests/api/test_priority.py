"""Tiers through the server: a vip key's request starts at once even when every batch slot holds a long
standard generation (the lowest-priority running request is preempted and later resumes with identical
greedy output), and a reserved share of slots keeps vip traffic from waiting for a slot at all."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from seekserve.gateway.principal import Role, Tier
from tests.api.conftest import running_server

MODEL = "tiny-chat"


def chat(prompt: str, max_tokens: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)


async def _run(base: str, std: str, vip: str, scheduler) -> tuple[list[str], list[str], float, list[float]]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        async def post(key: str, body: dict) -> tuple[str, float]:
            r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], time.perf_counter()

        prompts = ["first long story", "second long story"]
        baseline = [text for text, _ in await asyncio.gather(*(post(std, chat(p, 220)) for p in prompts))]
        longs = [asyncio.create_task(post(std, chat(p, 220))) for p in prompts]
        await _until(lambda: scheduler.num_running == 2)          # both slots are decoding
        _, vip_done = await post(vip, chat("urgent", 4))
        resumed = await asyncio.gather(*longs)
    return baseline, [t for t, _ in resumed], vip_done, [d for _, d in resumed]


def test_vip_preempts_a_full_batch_and_the_victim_resumes_identically(chat_model: Path, tmp_path: Path) -> None:
    with running_server(chat_model, served_model_name=[MODEL], data_dir=str(tmp_path), batch_size=2,
                        max_sequence_length=256) as (base, backend, app):
        keys = app.state.gateway_parts.keys
        _, std = keys.create("std", Role.developer, "t", Tier.standard)
        _, vip = keys.create("vip", Role.developer, "t", Tier.vip)
        before = backend.engine.scheduler.num_preemptions
        baseline, resumed, vip_done, std_done = asyncio.run(_run(base, std, vip, backend.engine.scheduler))
        assert backend.engine.scheduler.num_preemptions > before          # a running standard was preempted
        assert vip_done < min(std_done)                                     # and vip finished first
        assert resumed == baseline                                          # identical greedy output


def test_reserved_slots_keep_standard_out_of_the_vip_pool(chat_model: Path, tmp_path: Path) -> None:
    with running_server(chat_model, served_model_name=[MODEL], data_dir=str(tmp_path), batch_size=4,
                        vip_reserved_share=0.25) as (base, backend, app):
        assert backend.engine.scheduler.num_reserved_slots == 1
        _, std = app.state.gateway_parts.keys.create("std", Role.developer, "t", Tier.standard)

        async def fill() -> int:
            async with httpx.AsyncClient(base_url=base, timeout=120,
                                         headers={"Authorization": f"Bearer {std}"}) as c:
                tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=chat(f"s{i}", 200)))
                         for i in range(6)]
                sched = backend.engine.scheduler
                await _until(lambda: sched.num_running + sched.num_waiting == 6)
                running = sched.num_running
                await asyncio.gather(*tasks)
                return running

        assert asyncio.run(fill()) == 3              # 4 slots, one kept for vip
