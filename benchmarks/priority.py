"""VIP priority under load, through the real HTTP server and real keys.

The server is `seekserve serve` in its own process (keys made with `seekserve keys create`): a load
generator in the server's process would share its interpreter lock with the engine thread and the event
loop, and the comparison would partly measure the client.

Scenario 1 (queue): standard clients keep more requests in flight than --batch-size, so a queue forms; a
vip request arrives every --vip-interval seconds. Printed: TTFT p50/p95 of both groups, and the
throughput against the same workload served first-come-first-served (the "vip" requests sent with a
standard key). Target: vip p50 TTFT <= 0.05 x standard p50; throughput within 10 % of FCFS.

Scenario 2 (full batch, no queue): every slot holds a long standard generation; a vip request still
starts within about one engine step, because the scheduler preempts the lowest-priority running request
(vLLM never interrupts a running one). The preempted request resumes and its greedy output is identical.

    python benchmarks/priority.py [--model PATH] [--batch-size 8] [--duration 20] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess, serving_process  # benchmarks/ is not a package

PROMPT = "Add the numbers and explain the steps: 1234 + 5678 ="


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def one(client: httpx.AsyncClient, key: str, model: str, max_tokens: int, prompt: str = PROMPT
              ) -> tuple[float, int, str]:
    """(TTFT seconds, completion tokens, text) of one streamed request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for c in event.get("choices", []):
                piece = c["delta"].get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens, "".join(text)


def length(rng: random.Random, a: argparse.Namespace) -> int:
    """A request's max_tokens: uniform in max_tokens x (1 +- spread). Each client draws from its own seeded
    generator, so both modes replay the same lengths."""
    return max(1, round(a.max_tokens * (1 + a.length_spread * (2 * rng.random() - 1))))


def generated_tokens(srv: ServerProcess) -> float:
    """Tokens the server has streamed so far (its seekserve:generation_tokens counter, counted per chunk)."""
    return srv.metric("seekserve:generation_tokens_total")


async def queue_scenario(srv: ServerProcess, std_key: str, vip_key: str, model: str, a: argparse.Namespace
                         ) -> dict[str, Any]:
    """Throughput is measured in the steady state only: tokens generated between the first vip request
    and the end of the run, per second. The ramp-up (queue forming) and the drain after the last
    request (whose length depends on where each client was when time ran out) are left out."""
    base = srv.base
    std_ttft: list[float] = []
    vip_ttft: list[float] = []
    stop = time.perf_counter() + a.duration
    async with httpx.AsyncClient(base_url=base, timeout=600,
                                 limits=httpx.Limits(max_connections=a.standard_clients + 50)) as client:
        async def standard_loop(rng: random.Random) -> None:
            while time.perf_counter() < stop:
                ttft, _, _ = await one(client, std_key, model, length(rng, a))
                std_ttft.append(ttft)

        vip_rng = random.Random("vip")

        async def vip_one() -> None:
            ttft, _, _ = await one(client, vip_key, model, length(vip_rng, a))
            vip_ttft.append(ttft)

        loops = [asyncio.create_task(standard_loop(random.Random(i))) for i in range(a.standard_clients)]
        vips = []
        await asyncio.sleep(a.vip_interval * 2)      # let the queue form first
        t0, n0 = time.perf_counter(), await asyncio.to_thread(generated_tokens, srv)
        while time.perf_counter() < stop:
            vips.append(asyncio.create_task(vip_one()))
            await asyncio.sleep(a.vip_interval)
        t1, n1 = time.perf_counter(), await asyncio.to_thread(generated_tokens, srv)
        await asyncio.gather(*loops, *vips)
    return {"std": std_ttft, "vip": vip_ttft, "throughput": (n1 - n0) / (t1 - t0)}


async def full_batch_scenario(base: str, std_key: str, vip_key: str, model: str, a: argparse.Namespace
                              ) -> dict[str, Any]:
    prompts = [f"{PROMPT} (variant {i})" for i in range(a.batch_size)]
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        baseline = await asyncio.gather(*(one(client, std_key, model, a.long_tokens, p) for p in prompts))
        step = await one(client, std_key, model, 32)      # an unloaded request: TTFT ~ one prefill step
        longs = [asyncio.create_task(one(client, std_key, model, a.long_tokens, p)) for p in prompts]
        await asyncio.sleep(1.0)                          # every slot busy decoding
        vip_ttft, _, _ = await one(client, vip_key, model, 16)
        resumed = await asyncio.gather(*longs)
    return {"vip_ttft": vip_ttft, "single_ttft": step[0], "std_ttft": [r[0] for r in resumed],
            "identical": all(r[2] == b[2] for r, b in zip(resumed, baseline))}


def report(name: str, values: list[float]) -> str:
    return f"{name:<9} n={len(values):<4} TTFT p50 {pct(values, 0.5) * 1000:8.1f} ms   p95 {pct(values, 0.95) * 1000:8.1f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny model)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--standard-clients", type=int, default=24, help="standard requests kept in flight")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--vip-interval", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=64, help="mean output length (ignore_eos: exact)")
    p.add_argument("--length-spread", type=float, default=0.5,
                   help="output lengths uniform in max-tokens x (1 +- spread); 0: all equal, which keeps FCFS "
                        "in lockstep (every slot admitted in one prefill step), a pattern real traffic never has")
    p.add_argument("--long-tokens", type=int, default=400, help="scenario 2: length of the running generations")
    p.add_argument("--vip-reserved-share", type=float, default=0.0,
                   help="share of the batch slots kept for vip (the server's --vip-reserved-share)")
    p.add_argument("--repeat", type=int, default=2, help="runs per mode, alternating (default 2)")
    p.add_argument("--dtype", default=None, help="default: float32 for the tiny model, the checkpoint's otherwise; "
                                                 "scenario 2's comparison is exact in float32 only: bf16 kernels "
                                                 "round differently with the batch shape, preempted or not")
    a = p.parse_args()
    flags = ["--batch-size", str(a.batch_size), "--dtype", a.dtype or ("auto" if a.model else "float32"),
             "--vip-reserved-share", str(a.vip_reserved_share)]
    if a.model:
        flags += ["--model-path", a.model]
    runs: dict[str, list[dict[str, Any]]] = {"priority": [], "fcfs": []}
    full: dict[str, Any] = {}
    for r in range(a.repeat):          # alternate the two modes, so a noisy minute hits both
        for mode in ("priority", "fcfs") if r % 2 == 0 else ("fcfs", "priority"):
            with serving_process(*flags) as srv:
                model = httpx.get(srv.base + "/v1/models", headers={"Authorization": f"Bearer {srv.key('lister')}"}
                                  ).json()["data"][0]["id"]
                std, vip = srv.key("std"), srv.key("vip", tier="vip" if mode == "priority" else "standard")
                runs[mode].append(asyncio.run(queue_scenario(srv, std, vip, model, a)))
                if mode == "priority" and not full:
                    full = asyncio.run(full_batch_scenario(srv.base, std, srv.key("vip2", tier="vip"), model, a))
    pr = {k: [v for run in runs["priority"] for v in run[k]] for k in ("std", "vip")}
    fc_vip = [v for run in runs["fcfs"] for v in run["vip"]]
    print(f"scenario 1: {a.standard_clients} standard clients, batch size {a.batch_size}, a vip request every "
          f"{a.vip_interval}s, max_tokens {a.max_tokens} +- {a.length_spread:.0%}, {a.duration:.0f}s x {a.repeat} "
          "runs per mode")
    print(report("standard", pr["std"]))
    print(report("vip", pr["vip"]))
    print(report("fcfs-vip", fc_vip) + "   (the same requests, first-come-first-served)")
    ratio = pct(pr["vip"], 0.5) / pct(pr["std"], 0.5)
    tputs = [(p["throughput"], f["throughput"]) for p, f in zip(runs["priority"], runs["fcfs"])]
    tput = statistics.median(p / f for p, f in tputs)
    print(f"vip p50 / standard p50 = {ratio:.4f}   (target <= 0.05; vLLM's priority scheduling: 0.017)")
    print("throughput tok/s, priority vs FCFS, per pair: " + ", ".join(f"{p:.0f}/{f:.0f}" for p, f in tputs)
          + f"; median ratio {tput:.3f}   (target: at least 0.90)")
    print(f"scenario 2: {a.batch_size} long standard generations fill every slot, no queue")
    print(f"vip TTFT {full['vip_ttft'] * 1000:.1f} ms; an unloaded request's TTFT {full['single_ttft'] * 1000:.1f} ms; "
          f"preempted generations resumed with identical output: {full['identical']}")
    ok = ratio <= 0.05 and tput >= 0.90 and full["identical"]     # faster than FCFS is no failure
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
