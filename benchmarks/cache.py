#!/usr/bin/env python3
"""Response cache: replays a Zipf-distributed workload of deterministic chat requests (temperature 0) against
a real server (in-process uvicorn on loopback, benchmarks/_server.py) twice, response cache off and on, and
prints the hit rate and the latency of both runs and their ratio.

The workload: --distinct prompts (default 200), drawn --requests times (default 1000) with probability
proportional to 1/rank^s (--zipf 1.1, fixed --seed), sent by --concurrency clients (default 4) in that order.
The hit rate is read from the server's own counters (/metrics: seekserve:response_cache_hits/misses) and
from the responses' x-seekserve-cache header; the ideal rate (every repeat a hit) is printed beside them.
Concurrent identical misses are not coalesced, so the measured rate can sit slightly below the ideal.

  python benchmarks/cache.py                               # the shipped tiny model, in-process LRU cache
  python benchmarks/cache.py --model bench_models/qwen2-150m --max-tokens 64
  python benchmarks/cache.py --redis-url redis://127.0.0.1:6379/0   # the cache (and rate limits) in Redis

Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import serving  # benchmarks/ is not a package

ADJECTIVES = ["ancient", "modern", "quiet", "bright", "hidden", "northern", "coastal", "mountain", "urban", "rural",
              "early", "late", "small", "great", "simple", "curious", "gentle", "distant", "wild", "formal"]
SUBJECTS = ["gardens", "bridges", "libraries", "rivers", "festivals", "markets", "forests", "harbours", "castles",
            "railways"]


def make_prompts(n: int) -> list[str]:
    """n distinct, harmless prompts (no digits or names the sensitivity classifier would flag)."""
    topics = [f"{a} {s}" for s in SUBJECTS for a in ADJECTIVES]
    if n > len(topics):
        topics += [f"{t} and their {s}" for t in list(topics) for s in SUBJECTS][:n - len(topics)]
    return [f"Write a short paragraph about {t}." for t in topics[:n]]


def zipf_sequence(num_distinct: int, num_requests: int, s: float, seed: int) -> list[int]:
    weights = [1.0 / (rank ** s) for rank in range(1, num_distinct + 1)]
    return random.Random(seed).choices(range(num_distinct), weights=weights, k=num_requests)


@dataclass
class Run:
    label: str                   # off / on / on, warm (the same sequence again: nearly all hits)
    cache: bool
    latencies_ms: list[float]
    statuses: list[str]          # x-seekserve-cache per request: hit / miss / off
    wall_s: float
    metrics_hits: int | None
    metrics_misses: int | None

    def percentile(self, q: float, only: str | None = None) -> float:
        xs = [x for x, s in zip(self.latencies_ms, self.statuses) if only is None or s == only]
        if len(xs) < 2:
            return xs[0] if xs else float("nan")
        return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if q != 50 else statistics.median(xs)

    @property
    def header_hit_rate(self) -> float:
        return self.statuses.count("hit") / len(self.statuses)


def _counter(text: str, name: str) -> int | None:
    m = re.search(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", text, re.MULTILINE)
    return int(float(m.group(1))) if m else None


async def replay(base: str, key: str, model: str, prompts: list[str], sequence: list[int], concurrency: int,
                 max_tokens: int) -> tuple[list[float], list[str], float]:
    latencies: list[float] = [0.0] * len(sequence)
    statuses: list[str] = [""] * len(sequence)
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=120) as client:
        async def one(i: int) -> None:
            body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": prompts[sequence[i]]}]}
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            latencies[i] = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
            statuses[i] = r.headers.get("x-seekserve-cache", "?")

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(sequence):
                i, next_index = next_index, next_index + 1
                await one(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, statuses, time.perf_counter() - t0


def cache_counters(base: str) -> tuple[int | None, int | None]:
    text = httpx.get(f"{base}/metrics").text
    return _counter(text, "seekserve:response_cache_hits"), _counter(text, "seekserve:response_cache_misses")


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def run_server(args: argparse.Namespace, cache: bool, prompts: list[str], sequence: list[int]) -> list[Run]:
    """One fresh server: the workload once (and with the cache on, once more against the filled cache)."""
    settings: dict = {"response_cache": {"enabled": cache}}
    if args.model:
        settings["model_path"] = args.model
    if args.redis_url:
        settings["redis_url"] = args.redis_url
    runs = []
    with serving(**settings) as server:
        key = server.key("cache-bench", tenant="bench")
        auth = {"Authorization": f"Bearer {key}"}
        model = httpx.get(f"{server.base}/v1/models", headers=auth).json()["data"][0]["id"]
        # warm-up outside the workload's prompts: the engine's first steps
        warm_prompts = ["Say hello.", "Name a colour.", "Describe the sky.", "Say goodbye."]
        asyncio.run(replay(server.base, key, model, warm_prompts, [0, 1, 2, 3], args.concurrency, 8))
        for label in (["on", "on, warm"] if cache else ["off"]):
            before = cache_counters(server.base)
            latencies, statuses, wall = asyncio.run(replay(server.base, key, model, prompts, sequence,
                                                           args.concurrency, args.max_tokens))
            after = cache_counters(server.base)
            runs.append(Run(label, cache, latencies, statuses, wall, _delta(after[0], before[0]),
                            _delta(after[1], before[1])))
    return runs


def _finite(x: float) -> float | None:
    """JSON has no NaN: a percentile of no samples is null."""
    return None if math.isnan(x) else round(x, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped tiny model)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis-url", default=None, help="Redis for the cache (and the rate limiter)")
    args = ap.parse_args()

    prompts = make_prompts(args.distinct)
    sequence = zipf_sequence(args.distinct, args.requests, args.zipf, args.seed)
    ideal = 1 - len(set(sequence)) / len(sequence)
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.requests} requests over {args.distinct} prompts, Zipf s={args.zipf}, seed {args.seed}: "
          f"{len(set(sequence))} distinct drawn, top prompt {sequence.count(0)} times; "
          f"concurrency {args.concurrency}, max_tokens {args.max_tokens}, model {args.model or 'shipped tiny'}, "
          f"cache store {'Redis' if args.redis_url else 'in-process LRU'}")
    runs = run_server(args, False, prompts, sequence) + run_server(args, True, prompts, sequence)
    off, on = runs[0], runs[1]
    print(f"\n{'cache':<10}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'hit rate (metrics)':>20}"
          f"{'(headers)':>11}{'p50 hit':>9}{'p50 miss':>10}")
    for r in runs:
        lookups = (r.metrics_hits or 0) + (r.metrics_misses or 0)
        rate = f"{r.metrics_hits / lookups:.3f}" if r.metrics_hits is not None and lookups else "-"
        print(f"{r.label:<10}{len(r.latencies_ms) / r.wall_s:>8.1f}{r.percentile(50):>9.2f}"
              f"{r.percentile(95):>9.2f}{r.percentile(99):>9.2f}{rate:>20}{r.header_hit_rate:>11.3f}"
              f"{r.percentile(50, 'hit') if r.cache else float('nan'):>9.2f}"
              f"{r.percentile(50, 'miss') if r.cache else r.percentile(50):>10.2f}")
    ratio_p50 = off.percentile(50) / on.percentile(50)
    ratio_p95 = off.percentile(95) / on.percentile(95)
    print(f"\nideal hit rate (every repeat a hit): {ideal:.3f}; first pass: cache hits {on.metrics_hits}, "
          f"misses {on.metrics_misses}; 'on, warm' = the same sequence again on the filled cache (the latency of a "
          f"hit while no miss is generating)")
    print(f"p50 without / with cache: {ratio_p50:.2f}x; p95: {ratio_p95:.2f}x; throughput "
          f"{(len(on.latencies_ms) / on.wall_s) / (len(off.latencies_ms) / off.wall_s):.2f}x")
    print(json.dumps({
        "requests": args.requests, "distinct": args.distinct, "zipf_s": args.zipf, "seed": args.seed,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "model": args.model or "shipped-tiny",
        "store": "redis" if args.redis_url else "lru", "ideal_hit_rate": round(ideal, 4),
        "runs": [{"run": r.label, "cache": r.cache, "rps": round(len(r.latencies_ms) / r.wall_s, 2),
                  "p50_ms": round(r.percentile(50), 3), "p95_ms": round(r.percentile(95), 3),
                  "p99_ms": round(r.percentile(99), 3), "header_hit_rate": round(r.header_hit_rate, 4),
                  "metrics_hits": r.metrics_hits, "metrics_misses": r.metrics_misses,
                  "p50_hit_ms": _finite(r.percentile(50, "hit")) if r.cache else None,
                  "p50_miss_ms": _finite(r.percentile(50, "miss")) if r.cache else None} for r in runs],
        "p50_ratio": round(ratio_p50, 3), "p95_ratio": round(ratio_p95, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
