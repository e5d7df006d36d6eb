"""Running the server: load the model, build the app, serve with uvicorn, and drain on SIGTERM —
readiness fails and new requests get 503 at once, in-flight requests get up to --drain-timeout to finish,
then the process exits 0."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from pathlib import Path

import uvicorn

from seekserve.api.app import create_app
from seekserve.api.lifecycle import ServerState
from seekserve.backends.local import LocalBackend
from seekserve.config import Settings
from seekserve.engine import EngineConfig, LLMEngine
from seekserve.gateway.bootstrap import SetupError, load_pepper, open_store
from seekserve.store.keys import KeyStore

log = logging.getLogger("seekserve.server")
DEFAULT_MODEL = Path(__file__).parent / "engine" / "default_model"
DEFAULT_MODEL_NAME = "seekserve-tiny"


def build_backend(settings: Settings) -> LocalBackend:
    model_path = settings.model_path or str(DEFAULT_MODEL)
    names = settings.served_model_name or ([DEFAULT_MODEL_NAME] if settings.model_path is None
                                           else [Path(model_path.rstrip("/")).name])
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model_path=model_path, dtype=settings.dtype, device=settings.device, max_num_seqs=settings.batch_size,
        max_model_len=settings.max_sequence_length, max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_memory_gb=settings.kv_cache_memory, enable_prefix_caching=settings.enable_prefix_caching,
        tensor_parallel_size=settings.tensor_parallel, num_reserved_slots=settings.num_reserved_slots()))
    log.info("model ready in %.2fs: %s as %s", time.perf_counter() - t0, model_path, ", ".join(names))
    return LocalBackend(engine, names, settings.reasoning_parser, settings.max_queued_requests)


class DrainingServer(uvicorn.Server):
    """uvicorn closes its sockets at the first SIGTERM; we first drain, keeping them open so late requests
    get a clear 503 instead of a refused connection. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # everything made so far (the model, the app) lives as long as the server: keep it out of the cyclic
        # collector's scans, which otherwise walk the whole heap every few thousand requests
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame) -> None:  # type: ignore[override]
        # not uvicorn's own handler: it would re-raise the signal after shutdown (exit 143, not 0)
        if self.state.draining:                      # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        if self.drain_timeout <= 0:
            self.should_exit = True
            return
        log.info("signal %s: draining (%d in flight, up to %.0fs)", sig, self.state.in_flight, self.drain_timeout)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: setattr(self, "_drain_task", loop.create_task(self._drain())))

    async def _drain(self) -> None:
        finished = await self.state.wait_idle(self.drain_timeout)
        log.info("drain %s; shutting down", "complete" if finished else
                 f"timed out with {self.state.in_flight} request(s) still running")
        self.should_exit = True


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def check_exposure(settings: Settings) -> None:
    """Safe default: with no credential of any kind (static key, issuer, key in the store) the server runs
    open, so it may only listen on loopback unless --allow-unauthenticated says otherwise."""
    if settings.host in LOOPBACK or settings.host.startswith("127.") or settings.allow_unauthenticated:
        return
    if settings.api_key or settings.oidc is not None:
        return
    keys = KeyStore(open_store(settings), load_pepper(settings))
    if keys.has_usable_keys():
        return
    raise SetupError(f"refusing to listen on {settings.host} with no authentication: create a key first "
                     "(`seekserve keys create --name admin --role admin --tenant ops`), configure an OIDC "
                     "issuer, or pass --allow-unauthenticated to serve openly on purpose")


def serve(settings: Settings) -> int:
    try:
        check_exposure(settings)
    except SetupError as e:
        log.error("%s", e)
        return 2
    backend = build_backend(settings)
    state = ServerState()
    app = create_app(settings, backend, state)
    # the drain already gave in-flight requests their --drain-timeout; uvicorn's own grace period after it only
    # needs to flush what is written (not 5 more seconds: a 30 s drain must fit a 30 s termination grace)
    # proxy_headers off: nothing here reads the client address, and rewriting it from X-Forwarded-For cost
    # every request a pass over its headers. server_header off: no `server: uvicorn` telling scanners what
    # runs here (and one header fewer for uvicorn to check on every answer)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=1, access_log=False, proxy_headers=False,
                            server_header=False)
    server = DrainingServer(config, state, settings.drain_timeout)
    try:
        server.run()
    finally:
        asyncio.run(backend.close())
    return 0
