"""Servers for the benchmarks.

`serving()`: an in-process seekserve server (a real uvicorn server on a loopback port, its own temporary
store, keys created directly in that store) for benchmarks whose client is light.
`serving_process()`: `seekserve serve` in its own process, keys made with `seekserve keys create`, for
benchmarks whose load generator would otherwise share the server's interpreter lock (and so measure
itself). The process helpers (spawn, wait_http, stop, free_port) are shared by the other benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Server:
    base: str
    app: Any
    backend: Any

    def key(self, name: str, tier: str = "standard", role: str = "developer", tenant: str = "bench",
            **limits: Any) -> str:
        from seekserve.gateway.principal import Limits, Role, Tier

        _, secret = self.app.state.gateway_parts.keys.create(name, Role(role), tenant, Tier(tier),
                                                             limits=Limits(**limits))
        return secret


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_http(port: int, proc: subprocess.Popen, what: str, log: Path | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def serving(**settings: Any) -> Iterator[Server]:
    import uvicorn  # here, so the process helpers stay light for the scripts that need only them

    from seekserve.api.app import create_app
    from seekserve.config import Settings
    from seekserve.server import build_backend

    settings.setdefault("data_dir", tempfile.mkdtemp(prefix="seekserve-bench-"))
    cfg = Settings(port=free_port(), **settings)
    backend = build_backend(cfg)
    app = create_app(cfg, backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{cfg.port}", app, backend)
    finally:
        server.should_exit = True
        thread.join(15)
        backend.async_engine.shutdown()


@dataclass
class ServerProcess:
    base: str
    proc: subprocess.Popen
    store: list[str]        # --data-dir DIR: what `seekserve keys` needs to reach the same store

    def key(self, name: str, tier: str = "standard", role: str = "developer", tenant: str = "bench") -> str:
        made = subprocess.run([sys.executable, "-m", "seekserve.cli", "keys", "create", "--name", name, "--role",
                               role, "--tenant", tenant, "--tier", tier, *self.store],
                              cwd=ROOT, capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise RuntimeError(f"keys create failed: {made.stderr[-2000:]}")
        return made.stdout.strip()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics (e.g. seekserve:generation_tokens_total)."""
        import httpx

        text = httpx.get(self.base + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "))


@contextlib.contextmanager
def serving_process(*flags: str) -> Iterator[ServerProcess]:
    """`seekserve serve FLAGS` on a free loopback port with a fresh --data-dir; stopped with SIGTERM."""
    work = Path(tempfile.mkdtemp(prefix="seekserve-bench-"))
    store = ["--data-dir", str(work / "data")]
    port = free_port()
    log = work / "serve.log"
    proc = spawn([sys.executable, "-m", "seekserve.cli", "serve", *store, "--port", str(port),
                  "--log-level", "warning", *flags], log)
    try:
        wait_http(port, proc, "seekserve serve", log)
        yield ServerProcess(f"http://127.0.0.1:{port}", proc, store)
    finally:
        stop(proc)
