"""An in-process seekserve server for the serving benchmarks: a real uvicorn server on a loopback port,
its own temporary store, keys created directly in that store."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from seekserve.api.app import create_app
from seekserve.config import Settings
from seekserve.server import build_backend


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(**settings: Any) -> Iterator[Server]:
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
