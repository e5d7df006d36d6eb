#!/usr/bin/env python3
"""Gateway cost in instructions: CPU instructions per request the gateway pipeline executes, counted by
valgrind's callgrind, so two versions of the code can be compared exactly on a machine whose timings move
±25% from one minute to the next (gateway_overhead.py measures time; this measures work).

Requests are those of gateway_overhead.py: a system prompt and a user prompt of each request's own.
The app is built in-process (as `seekserve serve` builds it, without uvicorn or a client socket) with a
remote upstream "cloud" served by the fake OpenAI upstream in its own process, a real API key with rpm/tpm
limits, sensitivity classification and the usage/audit writer. After --warmup requests, callgrind counts
--requests requests; instructions are split by thread (the event loop, the record writer).

  python benchmarks/gateway_instructions.py [--mode json|stream] [--requests 300] [--words 5]

Needs valgrind (callgrind_control, callgrind_annotate) on PATH; the run takes about a minute (the
interpreter runs ~40x slower under valgrind). Counts vary by about 1% between runs: the writer's batch
sizes follow wall-clock time. Kernel work (system calls) is not counted. Last line of stdout: JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ROOT, free_port, spawn, stop, wait_http  # benchmarks/ is not a package
from gateway_overhead import UPSTREAM_KEY_ENV, make_gateway_store, messages

UNDER_VALGRIND = "SEEKSERVE_UNDER_CALLGRIND"


def measure_inside(args: argparse.Namespace) -> None:
    """Runs under valgrind: build the app, warm up, count --requests requests."""
    from seekserve.api.app import create_app
    from seekserve.config import load_settings

    settings = load_settings({"data_dir": args.data}, args.config)
    app = create_app(settings, {})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {args.key}".encode())]}

    def make(i: int) -> tuple[dict, bytes]:
        body = json.dumps({"model": "deepseek-chat", "stream": args.mode == "stream", "max_tokens": 64,
                           "messages": messages(i)}).encode()
        return {**scope, "headers": [*scope["headers"], (b"content-length", str(len(body)).encode())]}, body

    # made before counting starts: each request its own prompt, as in gateway_overhead.py
    requests = [make(i) for i in range(args.warmup + args.requests)]

    async def one(i: int) -> None:
        request, body = requests[i]
        sent: list[dict] = []
        done = asyncio.Event()
        received = False

        async def receive() -> dict:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()
        await app(request, receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"the gateway answered {sent}")

    def callgrind(switch: str) -> None:
        subprocess.run(["callgrind_control", "-i", switch, str(os.getpid())], capture_output=True, check=True)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            for i in range(args.warmup):
                await one(i)
            import gc
            gc.collect()
            gc.freeze()     # as `seekserve serve` does after start-up
            callgrind("on")
            for i in range(args.warmup, args.warmup + args.requests):
                await one(i)
            callgrind("off")

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def thread_totals(out: Path) -> dict[str, int]:
    """Instructions of each thread's callgrind file (out-01: main thread, then others in start order)."""
    totals = {}
    for part in sorted(out.parent.glob(out.name + "-*")):
        text = subprocess.run(["callgrind_annotate", str(part)], capture_output=True, text=True,
                              check=False).stdout
        m = re.search(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS", text, re.MULTILINE)
        if m:
            totals[part.name.rsplit("-", 1)[1]] = int(m.group(1).replace(",", ""))
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["json", "stream"], default="json")
    ap.add_argument("--requests", type=int, default=300, help="counted requests")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--words", type=int, default=5, help="words in each answer (one chunk each)")
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.environ.get(UNDER_VALGRIND):
        measure_inside(args)
        return 0
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not on PATH (Debian: apt-get install valgrind)")
    work = Path(tempfile.mkdtemp(prefix="seekserve-instr-"))
    port = free_port()
    text = " ".join(["word"] * args.words)
    upstream = spawn([sys.executable, "-m", "tests.backends.upstream", "--port", str(port), "--text", text],
                     work / "upstream.log")
    try:
        wait_http(port, upstream, "fake upstream", work / "upstream.log")
        gateway = make_gateway_store(sys.executable, port, work, "instr", default_backend="cloud")
        env = {**os.environ, UPSTREAM_KEY_ENV: "sk-bench-upstream"}
        out = work / "callgrind.out"
        # the running interpreter: a venv's python is a link to the binary, and keeps its venv when started by
        # that path (os.path.realpath would lose the venv's site-packages)
        python = sys.executable
        started = time.monotonic()
        run = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                              f"--callgrind-out-file={out}", python, __file__, "--mode", args.mode,
                              "--requests", str(args.requests), "--warmup", str(args.warmup),
                              "--config", str(gateway.config), "--data", str(gateway.data),
                              "--key", gateway.key],
                             cwd=ROOT, env={**env, UNDER_VALGRIND: "1"}, capture_output=True, text=True,
                             check=False)
        if run.returncode != 0:
            raise RuntimeError(f"the run under valgrind failed:\n{run.stderr[-3000:]}")
        totals = thread_totals(out)
    finally:
        stop(upstream)
    main_thread = totals.get("01", 0)
    everything = sum(totals.values())
    print(f"{args.mode}, {args.words} words per answer, {args.requests} requests, "
          f"{time.monotonic() - started:.0f} s under valgrind")
    print(f"  event loop thread   {main_thread / args.requests:12,.0f} instructions/request")
    print(f"  all threads         {everything / args.requests:12,.0f} instructions/request "
          "(the record writer's share grows under valgrind: its 50 ms batches hold fewer requests)")
    print(json.dumps({"mode": args.mode, "words": args.words, "requests": args.requests,
                      "main_thread_per_request": round(main_thread / args.requests),
                      "all_threads_per_request": round(everything / args.requests), "work_dir": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
