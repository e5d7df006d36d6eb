#!/usr/bin/env python3
"""Gateway overhead: what seekserve's pipeline (auth, RBAC, rate limits, sensitivity, routing, usage and
audit) adds to a request it forwards to a remote upstream, against the same request sent to that upstream
directly, in one run. Targets on a 2-core machine: <= 1 ms added p50 at concurrency 1, <= 1 ms of CPU per
request. Three processes, so each one's CPU is its own:

  * the fake OpenAI upstream (`python -m tests.backends.upstream`, non-recording fast mode: each kind of
    answer built once, written in one piece);
  * `seekserve serve --config` with an upstream "cloud", a route sending public traffic there, a real API
    key with rpm/tpm limits (so the limiter runs) made by `seekserve keys create`;
  * this script: a raw-socket HTTP/1.1 keep-alive load generator (not the bottleneck: its CPU is printed).

For each repeat, each mode (JSON body, SSE stream read to [DONE]) and each concurrency, every target gets
--warmup requests, then --requests timed ones, each with a user prompt of its own (the system prompt is
shared), as real traffic has. CPU = utime + stime of the process tree from /proc, before
and after the timed part. Medians over --repeat.

  python benchmarks/gateway_overhead.py [--repeat 3] [--requests 1000]
  python benchmarks/gateway_overhead.py --server-python /tmp/venv/bin/python   # e.g. with httptools+uvloop
  python benchmarks/gateway_overhead.py --litellm /tmp/litellm-venv/bin/litellm  # LiteLLM's proxy beside
  python benchmarks/gateway_overhead.py --raw-floor        # + a uvloop/httptools byte relay: Python's least
  python benchmarks/gateway_overhead.py --asgi-floor       # + uvicorn and seekserve's upstream client alone
  python benchmarks/gateway_overhead.py --profile cprofile|py-spy                # where a request goes

Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ROOT, free_port, spawn, stop, wait_http  # benchmarks/ is not a package

TARGET_ADDED_P50_MS, TARGET_CPU_MS = 1.0, 1.0
# the figures for LiteLLM's proxy on this machine, measured the same way (quoted, not measured here)
LITELLM_QUOTED = {"added_p50_ms": 9.0, "cpu_ms_per_request": 9.0, "rps_per_worker": 110}
MODEL = "deepseek-chat"
PROMPT = "Write a short haiku about autumn leaves falling on a quiet river."
SYSTEM = "You are a helpful assistant."


def messages(i: int) -> list[dict[str, str]]:
    """Request i's messages: a fixed system prompt and a user prompt of its own (no two requests ask the same
    thing, so nothing the gateway remembers about a text, such as its sensitivity findings, serves twice)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{PROMPT} Take {i}."}]
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 0.2      # after a timed part: the record writer's 50 ms batch lands inside it


# -- processes and their CPU ---------------------------------------------------------------------------
def _stat(pid: int, tid: int | None = None) -> tuple[int, float] | None:
    """(ppid, utime + stime in seconds) of one process (or one of its threads), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()    # after "(comm) ": state, ppid, ... utime, stime
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its live descendants (LiteLLM may fork workers)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s is not None:
                stats[int(entry)] = s
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += stats[p][1]
            todo += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None
    key: str = "unused"
    path: str = "/v1/chat/completions"
    log: Path | None = None
    is_upstream: bool = False           # "direct": its CPU is the upstream column, no gateway CPU

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the process tree, and of the main thread alone (the event loop)."""
        if self.proc is None or self.is_upstream:
            return 0.0, 0.0
        main = _stat(self.proc.pid, self.proc.pid)
        return tree_cpu(self.proc.pid), main[1] if main else 0.0


def interpreter_features(python: str) -> str:
    """What uvicorn's "auto" picks in that interpreter: httptools/h11 and uvloop/asyncio."""
    code = ("import importlib.util as u; print(('httptools' if u.find_spec('httptools') else 'h11') + '+' + "
            "('uvloop' if u.find_spec('uvloop') else 'asyncio'))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# cProfile of the event loop (main thread) between SIGUSR1 and SIGUSR2 only: start-up is left out
PROFILED_SERVE = """
import cProfile, signal, sys
from seekserve.cli import main
out, profs = sys.argv.pop(1), []
def start(*_):
    profs.append(cProfile.Profile()); profs[-1].enable()
def dump(*_):
    profs[-1].disable(); profs[-1].dump_stats(out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, dump)
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class GatewayStore:
    config: Path        # upstream "cloud" serving MODEL, public traffic routed there
    data: Path          # the store, holding one developer key with rpm/tpm limits
    key: str

    @property
    def args(self) -> list[str]:
        return ["--config", str(self.config), "--data-dir", str(self.data)]


def make_gateway_store(python: str, upstream_port: int, work: Path, label: str, default_backend: str = "local"
                       ) -> GatewayStore:
    """A benchmark gateway's config and store: the upstream, a rule sending public traffic to it (the rest to
    `default_backend`), and a real key made by `seekserve keys create` with limits, so the limiter runs."""
    data = work / f"data-{label}"
    data.mkdir()
    config = work / f"seekserve-{label}.yaml"
    config.write_text(json.dumps({     # JSON is YAML
        "upstreams": [{"name": "cloud", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                       "api_key_env": UPSTREAM_KEY_ENV, "models": [{"alias": MODEL}]}],
        "routes": [{"name": "public-cloud", "match": {"sensitivity": ["public"]}, "backends": ["cloud"]},
                   {"name": "default", "backends": [default_backend]}]}))
    made = subprocess.run([python, "-m", "seekserve.cli", "keys", "create", "--name", "bench", "--role",
                           "developer", "--tenant", "bench", "--rpm", "100000000", "--tpm", "10000000000",
                           "--config", str(config), "--data-dir", str(data)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if made.returncode != 0:
        raise RuntimeError(f"keys create failed: {made.stderr[-2000:]}")
    return GatewayStore(config, data, made.stdout.strip())


def start_seekserve(python: str, upstream_port: int, work: Path, label: str, profile_to: Path | None = None
                    ) -> Target:
    gateway = make_gateway_store(python, upstream_port, work, label)
    store = gateway.args
    port = free_port()
    serve = ["serve", *store, "--port", str(port), "--log-level", "warning"]
    head = [python, "-c", PROFILED_SERVE, str(profile_to)] if profile_to else [python, "-m", "seekserve.cli"]
    log = work / f"seekserve-{label}.log"
    proc = spawn(head + serve, log, env={UPSTREAM_KEY_ENV: "sk-bench-upstream"})
    wait_http(port, proc, f"seekserve ({label})", log)
    return Target(f"seekserve {label}", port, proc, key=gateway.key, log=log)


# the cost of a conventional HTTP stack alone: FastAPI + uvicorn + a pooled httpx client, passing bytes through
FLOOR_APP = """
import sys, httpx, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
port, upstream = int(sys.argv[1]), sys.argv[2]
app = FastAPI()
client = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))

@app.post("/v1/chat/completions")
async def chat(request: Request):
    sent = client.build_request("POST", upstream + "/chat/completions", content=await request.body(),
                                headers={"content-type": "application/json"})
    response = await client.send(sent, stream=True)
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return Response(await response.aread(), media_type="application/json")
    async def relay():
        try:
            async for part in response.aiter_raw():
                yield part
        finally:
            await response.aclose()
    return StreamingResponse(relay(), media_type="text/event-stream")

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


# the least a Python proxy costs: uvloop + httptools both ways, a pool of upstream connections, the body
# relayed chunk by chunk (chunked encoding); no framework, no validation, nothing of the gateway
RAW_FLOOR_APP = """
import asyncio, sys, httptools, uvloop
port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
idle = []

class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.sink = transport, None
    def start(self, body, sink):
        self.sink, self.parser = sink, httptools.HttpResponseParser(self)
        self.transport.write(b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: upstream\\r\\n"
                             b"Content-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_headers_complete(self):
        self.sink.head(self.parser.get_status_code())
    def on_body(self, data):
        self.sink.body(data)
    def on_message_complete(self):
        sink, self.sink = self.sink, None
        idle.append(self)
        sink.done()

class Client(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser, self.parts = transport, httptools.HttpRequestParser(self), []
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_body(self, data):
        self.parts.append(data)
    def on_message_complete(self):
        body, self.parts = b"".join(self.parts), []
        asyncio.ensure_future(self.forward(body))
    async def forward(self, body):
        up = idle.pop() if idle else (await asyncio.get_running_loop().create_connection(
            Upstream, "127.0.0.1", upstream_port))[1]
        up.start(body, self)
    def head(self, status):
        self.transport.write(b"HTTP/1.1 %d OK\\r\\ncontent-type: text/event-stream\\r\\n"
                             b"transfer-encoding: chunked\\r\\n\\r\\n" % status)
    def body(self, data):
        self.transport.write(b"%x\\r\\n%s\\r\\n" % (len(data), data))
    def done(self):
        self.transport.write(b"0\\r\\n\\r\\n")

async def main():
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port)
    await server.serve_forever()

uvloop.run(main())
"""


# seekserve's own serving path without the gateway: uvicorn, a bare ASGI app and seekserve's upstream client
# (backends/http1.py), relaying the body. seekserve minus this = what auth, limits, classification, routing,
# SSE decoding/encoding, usage and audit cost
ASGI_FLOOR_APP = """
import sys, uvicorn
from seekserve.backends.http1 import ConnectionPool
port, upstream = int(sys.argv[1]), sys.argv[2]
pool = None

async def app(scope, receive, send):
    global pool
    if scope["type"] != "http":
        return
    pool = pool or ConnectionPool(upstream, connect_timeout=5, read_timeout=60, max_connections=100)
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    response = await pool.post("/v1/chat/completions", body)
    await send({"type": "http.response.start", "status": response.status,
                "headers": [(b"content-type", response.headers.get("content-type", "").encode())]})
    async for part in response:
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await response.aclose()
    await send({"type": "http.response.body", "body": b""})

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def start_floor(python: str, upstream_port: int, work: Path, label: str, kind: str = "floor") -> Target:
    port = free_port()
    log = work / f"{kind}-{label}.log"
    args = {"floor": [FLOOR_APP, str(port), f"http://127.0.0.1:{upstream_port}/v1"],
            "raw-floor": [RAW_FLOOR_APP, str(port), str(upstream_port)],
            "asgi-floor": [ASGI_FLOOR_APP, str(port), f"http://127.0.0.1:{upstream_port}"]}[kind]
    proc = spawn([python, "-c", *args], log)
    wait_http(port, proc, f"{kind} proxy", log)
    return Target(f"{kind} {label}", port, proc, log=log)


def start_litellm(binary: str, upstream_port: int, work: Path) -> Target:
    config = work / "litellm.yaml"
    master = "sk-bench-litellm-master"
    config.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": "sk-bench-upstream"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": master}}))
    port = free_port()
    log = work / "litellm.log"
    proc = spawn([binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                  "--num_workers", "1"], log, env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"})
    wait_http(port, proc, "litellm", log, timeout=300)
    return Target("litellm proxy", port, proc, key=master, log=log)


# -- the load generator ----------------------------------------------------------------------------------
def request_bytes(target: Target, stream: bool, i: int) -> bytes:
    body = json.dumps({"model": MODEL, "stream": stream, "max_tokens": 64, "messages": messages(i)}).encode()
    head = (f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
            f"Authorization: Bearer {target.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; a response is read whole (Content-Length or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 20))

    async def exchange(self, raw: bytes) -> tuple[int, bytes, bytes]:
        """(status, head lower-cased, body)."""
        self.writer.write(raw)
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            length = int(head[at + 17:head.index(b"\r\n", at + 2)])
            return status, head, await self.reader.readexactly(length)
        if b"\r\ntransfer-encoding: chunked" not in head:
            raise RuntimeError(f"a response with neither length nor chunks: {head[:300]!r}")
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
            parts.append((await self.reader.readexactly(size + 2))[:-2])
        await self.reader.readuntil(b"\r\n")
        return status, head, b"".join(parts)

    def close(self) -> None:
        self.writer.close()


def check(target: Target, stream: bool, status: int, head: bytes, body: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"{target.name}: HTTP {status}: {body[:500]!r}")
    if stream and not body.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"{target.name}: the stream did not end with [DONE]: {body[-300:]!r}")
    if not stream and b'"choices"' not in body:
        raise RuntimeError(f"{target.name}: no choices in {body[:300]!r}")
    if target.name.startswith("seekserve") and b"x-seekserve-backend: cloud" not in head:
        raise RuntimeError(f"{target.name}: not routed to the upstream: {head!r}")


@dataclass
class Phase:
    target: str
    mode: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float           # the target's process tree per request (0 for the upstream itself)
    loop_cpu_ms: float      # of which its main thread (the event loop; the rest: writer and pool threads)
    upstream_cpu_ms: float
    client_cpu_ms: float


async def run_phase(target: Target, upstream: subprocess.Popen, stream: bool, concurrency: int, n: int,
                    warmup: int) -> Phase:
    numbers = itertools.count()
    conns = [await Connection.open(target.port) for _ in range(concurrency)]
    latencies: list[float] = []
    remaining = 0

    async def worker(conn: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            raw = request_bytes(target, stream, next(numbers))
            t0 = time.perf_counter()
            status, head, body = await conn.exchange(raw)
            latencies.append(time.perf_counter() - t0)
            check(target, stream, status, head, body)

    try:
        remaining = warmup
        await asyncio.gather(*(worker(c) for c in conns))
        await asyncio.sleep(SETTLE_S)
        latencies.clear()
        remaining = n
        cpu0, up0, me0 = target.cpu(), tree_cpu(upstream.pid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        wall = time.perf_counter() - t0
        me1 = time.process_time()
        await asyncio.sleep(SETTLE_S)
        cpu1, up1 = target.cpu(), tree_cpu(upstream.pid)
    finally:
        for c in conns:
            c.close()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return Phase(target.name, "stream" if stream else "json", concurrency, n / wall,
                 statistics.median(latencies) * 1e3, q[98] * 1e3, (cpu1[0] - cpu0[0]) * 1e3 / n,
                 (cpu1[1] - cpu0[1]) * 1e3 / n, (up1 - up0) * 1e3 / n, (me1 - me0) * 1e3 / n)


# -- the report ------------------------------------------------------------------------------------------
@dataclass
class Summary:
    rows: list[dict] = field(default_factory=list)
    added: list[dict] = field(default_factory=list)


def summarize(phases: list[Phase], targets: list[str]) -> Summary:
    out = Summary()
    keys = sorted({(p.mode, p.concurrency) for p in phases}, key=lambda k: (k[0] != "json", k[1]))
    for mode, conc in keys:
        base: dict | None = None
        for name in targets:
            runs = [p for p in phases if (p.target, p.mode, p.concurrency) == (name, mode, conc)]
            if not runs:
                continue
            row = {"mode": mode, "concurrency": conc, "path": name, "repeats": len(runs)}
            for k in ("rps", "p50_ms", "p99_ms", "cpu_ms", "loop_cpu_ms", "upstream_cpu_ms", "client_cpu_ms"):
                row[k] = round(statistics.median(getattr(p, k) for p in runs), 3)
            out.rows.append(row)
            if name == "direct":
                base = row
            elif base is not None:
                out.added.append({"mode": mode, "concurrency": conc, "path": name,
                                  "added_p50_ms": round(row["p50_ms"] - base["p50_ms"], 3),
                                  "added_p99_ms": round(row["p99_ms"] - base["p99_ms"], 3),
                                  "cpu_ms": row["cpu_ms"],
                                  "rps_ratio": round(row["rps"] / base["rps"], 3)})
    return out


def print_report(s: Summary) -> None:
    print(f"\n{'mode':<7}{'conc':>5}  {'path':<40}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'CPU ms/req':>12}{'(loop)':>8}{'upstr CPU':>11}{'client CPU':>12}")
    for r in s.rows:
        cpu, loop = ("-", "-") if r["path"] == "direct" else (f"{r['cpu_ms']:.3f}", f"{r['loop_cpu_ms']:.2f}")
        print(f"{r['mode']:<7}{r['concurrency']:>5}  {r['path']:<40}{r['rps']:>8.0f}{r['p50_ms']:>9.3f}"
              f"{r['p99_ms']:>9.3f}{cpu:>12}{loop:>8}{r['upstream_cpu_ms']:>11.3f}{r['client_cpu_ms']:>12.3f}")
    print("\nadded over direct (medians):")
    for a in s.added:
        verdict = ""
        if a["concurrency"] == 1:
            ok = a["added_p50_ms"] <= TARGET_ADDED_P50_MS and a["cpu_ms"] <= TARGET_CPU_MS
            verdict = "  target (<= 1 ms p50, <= 1 ms CPU): " + ("met" if ok else "MISSED")
        print(f"  {a['mode']:<6} c={a['concurrency']:<3} {a['path']:<40} p50 {a['added_p50_ms']:+.3f} ms, "
              f"p99 {a['added_p99_ms']:+.3f} ms, CPU {a['cpu_ms']:.3f} ms/req, req/s x{a['rps_ratio']:.2f}"
              f"{verdict}")


# -- profiling -------------------------------------------------------------------------------------------
def print_cprofile(path: Path, n: int, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt
    print(f"\ncProfile of the event loop thread: {total * 1e3 / n:.3f} ms/request in Python functions "
          f"(profiler overhead included; ratios matter, not the absolute)")
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(f"{'self us/req':>12}{'cum us/req':>12}{'calls/req':>11}  function")
    for (file, line, func), (_, nc, tt, ct, _) in rows:
        print(f"{tt * 1e6 / n:>12.1f}{ct * 1e6 / n:>12.1f}{nc / n:>11.1f}  {_short(file)}:{line} {func}")
    print("\nseekserve's own functions by cumulative time (callees included):")
    ours = [(k, v) for k, v in stats.stats.items() if "seekserve/" in k[0]]
    for (file, line, func), (_, nc, tt, ct, _) in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
        print(f"{ct * 1e6 / n:>12.1f} us/req  {100 * ct / total:5.1f}%  {_short(file)}:{line} {func}")
    print("\nby module (self time):")
    by_module: dict[str, float] = {}
    for (file, _, _), (_, _, tt, _, _) in stats.stats.items():
        by_module[_module(file)] = by_module.get(_module(file), 0.0) + tt
    for mod, tt in sorted(by_module.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{tt * 1e6 / n:>12.1f} us/req  {100 * tt / total:5.1f}%  {mod}")


def _short(file: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _module(file: str) -> str:
    short = _short(file)
    if short.startswith("seekserve/"):
        return "/".join(short.split("/")[:3])    # seekserve/gateway/pipeline.py
    return short.split("/")[0] if "/" in short else short


def print_pyspy(path: Path, top: int) -> None:
    """py-spy's collapsed stacks ("frame;frame;... count"): self and inclusive share by function."""
    self_count: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (")[0] + " " + _short(f.split(" (", 1)[1].rstrip(")")) if " (" in f else f
                  for f in stack.split(";")]
        c = int(count)
        total += c
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    print(f"\npy-spy samples of the gateway process: {total}")
    print("top self:")
    for f, c in sorted(self_count.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * c / total:5.1f}%  {f}")
    print("top inclusive:")
    for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top * 2]:
        print(f"  {100 * c / total:5.1f}%  {f}")


async def profile(args: argparse.Namespace, upstream: Target, work: Path) -> None:
    assert upstream.proc is not None
    python = args.server_python[0]
    out = work / "gateway.prof"
    target = start_seekserve(python, upstream.port, work, "profiled",
                             profile_to=out if args.profile == "cprofile" else None)
    try:
        for stream in (False, True):
            await run_phase(target, upstream.proc, stream, 1, 10, args.warmup)     # warm
            if args.profile == "cprofile":
                out.unlink(missing_ok=True)
                assert target.proc is not None
                target.proc.send_signal(signal.SIGUSR1)
                await asyncio.sleep(0.2)
                await run_phase(target, upstream.proc, stream, args.profile_concurrency, args.profile_requests, 0)
                target.proc.send_signal(signal.SIGUSR2)
                for _ in range(100):
                    if out.exists() and out.stat().st_size:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.3)
                print(f"\n== profile: {'stream' if stream else 'json'}, concurrency {args.profile_concurrency}, "
                      f"{args.profile_requests} requests ==")
                kept = out.rename(work / f"gateway-{'stream' if stream else 'json'}.prof")
                print_cprofile(kept, args.profile_requests, args.top)
                print(f"(saved: {kept}; `python -m pstats {kept}` to browse)")
            else:
                raw = work / f"pyspy-{int(stream)}.txt"
                assert target.proc is not None
                spy = await asyncio.create_subprocess_exec(
                    args.py_spy, "record", "--pid", str(target.proc.pid), "--format", "raw", "--rate", "1000",
                    "--nonblocking", "--output", str(raw), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                await asyncio.sleep(1.0)
                await run_phase(target, upstream.proc, stream, args.profile_concurrency, args.profile_requests, 0)
                if spy.returncode is None:
                    with contextlib.suppress(ProcessLookupError):   # it may have ended by itself
                        spy.send_signal(signal.SIGINT)
                _, err = await asyncio.wait_for(spy.communicate(), 30)
                if not raw.exists():
                    raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-1000:]}")
                print(f"\n== py-spy: {'stream' if stream else 'json'}, concurrency {args.profile_concurrency}, "
                      f"{args.profile_requests} requests ==")
                print_pyspy(raw, args.top)
    finally:
        stop(target.proc)


# -- main --------------------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, upstream: subprocess.Popen, targets: list[Target]) -> list[Phase]:
    phases: list[Phase] = []
    for rep in range(args.repeat):
        for stream in (False, True):
            for conc in args.concurrency:
                for t in targets:
                    p = await run_phase(t, upstream, stream, conc, args.requests, args.warmup)
                    phases.append(p)
                    print(f"  rep {rep + 1} {p.mode:<6} c={conc:<3} {t.name:<40} {p.rps:7.0f} req/s  "
                          f"p50 {p.p50_ms:7.3f} ms  p99 {p.p99_ms:7.3f} ms  CPU {p.cpu_ms:6.3f} ms/req",
                          flush=True)
    return phases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000, help="timed requests per phase")
    ap.add_argument("--warmup", type=int, default=100, help="untimed requests before each phase")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10])
    ap.add_argument("--server-python", action="append", default=None,
                    help="interpreter(s) running seekserve (repeatable: one gateway each, e.g. a venv with "
                         "httptools+uvloop); default: this one")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor: a bare FastAPI + httpx passthrough proxy on the same interpreter")
    ap.add_argument("--raw-floor", action="store_true",
                    help="also measure a raw floor: a uvloop + httptools byte relay with no framework (the least "
                         "a Python proxy costs; needs httptools and uvloop in that interpreter)")
    ap.add_argument("--asgi-floor", action="store_true",
                    help="also measure seekserve's serving path without the gateway: uvicorn + a bare ASGI relay "
                         "over seekserve's upstream client (what the gateway's own work costs is seekserve "
                         "minus this)")
    ap.add_argument("--litellm", default=None, help="path of LiteLLM's `litellm` CLI: measure its proxy too")
    ap.add_argument("--profile", choices=["cprofile", "py-spy"], default=None,
                    help="profile the gateway at concurrency 1 after (or, with --profile-only, instead of) "
                         "the measurement")
    ap.add_argument("--profile-only", action="store_true")
    ap.add_argument("--profile-requests", type=int, default=2000)
    ap.add_argument("--profile-concurrency", type=int, default=1)
    ap.add_argument("--py-spy", default="py-spy", help="the py-spy binary")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    args.server_python = args.server_python or [sys.executable]
    if args.profile_only and not args.profile:
        ap.error("--profile-only needs --profile")
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"python {sys.version.split()[0]}")
    work = Path(tempfile.mkdtemp(prefix="seekserve-gw-bench-"))
    upstream_port = free_port()
    up_log = work / "upstream.log"
    up_proc = spawn([sys.executable, "-m", "tests.backends.upstream", "--port", str(upstream_port)], up_log)
    upstream = Target("direct", upstream_port, up_proc, log=up_log, is_upstream=True)
    targets: list[Target] = [upstream]
    try:
        wait_http(upstream_port, up_proc, "fake upstream", up_log)
        if not args.profile_only:
            labels: list[str] = []
            for i, python in enumerate(args.server_python):
                label = f"({interpreter_features(python)})"
                label += f" #{i + 1}" if label in labels else ""
                labels.append(label)
                print(f"{label}: {python}")
                slug = f"{i}"
                if args.floor:
                    targets.append(start_floor(python, upstream_port, work, slug))
                    targets[-1].name = f"floor {label}"
                if args.raw_floor:
                    targets.append(start_floor(python, upstream_port, work, slug, kind="raw-floor"))
                    targets[-1].name = f"raw floor {label}"
                if args.asgi_floor:
                    targets.append(start_floor(python, upstream_port, work, slug, kind="asgi-floor"))
                    targets[-1].name = f"asgi floor {label}"
                targets.append(start_seekserve(python, upstream_port, work, slug))
                targets[-1].name = f"seekserve {label}"
            if args.litellm:
                targets.append(start_litellm(args.litellm, upstream_port, work))
            time.sleep(1.0)
            idle = {t.name: t.cpu()[0] for t in targets[1:]}
            time.sleep(2.0)
            for t in targets[1:]:
                print(f"idle CPU of {t.name}: {(t.cpu()[0] - idle[t.name]) * 1e3 / 2:.1f} ms/s")
            phases = asyncio.run(measure(args, up_proc, targets))
            summary = summarize(phases, [t.name for t in targets])
            print_report(summary)
            if not args.litellm:
                print(f"\nLiteLLM proxy (quoted from the issue, not measured in this run): adds about "
                      f"{LITELLM_QUOTED['added_p50_ms']:.0f} ms p50 and {LITELLM_QUOTED['cpu_ms_per_request']:.0f} "
                      f"ms of CPU per request, about {LITELLM_QUOTED['rps_per_worker']} req/s per worker")
        else:
            summary = Summary()
        if args.profile:
            asyncio.run(profile(args, upstream, work))
    finally:
        for t in targets:
            stop(t.proc)
        stop(up_proc)
    print(json.dumps({"rows": summary.rows, "added": summary.added, "litellm_quoted": LITELLM_QUOTED,
                      "targets_ms": {"added_p50": TARGET_ADDED_P50_MS, "cpu": TARGET_CPU_MS},
                      "work_dir": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
