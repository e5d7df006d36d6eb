"""AsyncEngine: one background thread steps the LLMEngine; each request is an async iterator of
IncrementalOutputs. Requests are validated in the caller (errors raise at once); adds and aborts reach
the engine thread through an inbox drained before every step, so an abort (or a consumer that goes
away) frees the request's blocks within one step."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from seekserve.engine.engine import EngineStats, LLMEngine, PreparedRequest, Prompt
from seekserve.engine.errors import EngineDeadError, InvalidRequestError
from seekserve.engine.outputs import IncrementalOutput
from seekserve.engine.params import SamplingParams

log = logging.getLogger("seekserve.engine")


class _Stream:
    """Where one request's outputs land, on the event loop that asked for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[IncrementalOutput | BaseException] = asyncio.Queue()
        self.num_unfinished = n


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._dead: BaseException | None = None
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="seekserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its last step."""
        return self._stats

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                 priority: int = 0, cache_salt: str | bytes | None = None) -> AsyncIterator[IncrementalOutput]:
        """Yield outputs until every one of the request's n completions has finished. Raises
        InvalidRequestError at once for a bad request, EngineDeadError if the loop is not running."""
        req = self.engine.prepare_request(request_id or uuid.uuid4().hex, prompt, params, priority, cache_salt)
        return self.stream(req)

    def stream(self, req: PreparedRequest) -> AsyncIterator[IncrementalOutput]:
        """The outputs of a prepared request. It is submitted when iteration starts, so a stream that is
        never iterated costs nothing; leaving the iteration early aborts the request."""
        if self._dead is not None or self._stopped.is_set():
            raise EngineDeadError("the engine loop is not running") from self._dead
        return self._iterate(req)

    async def _iterate(self, req: PreparedRequest) -> AsyncIterator[IncrementalOutput]:
        stream = _Stream(asyncio.get_running_loop(), req.params.n)
        with self._lock:
            if req.request_id in self._streams:
                raise InvalidRequestError(f"request id {req.request_id!r} is already in use", param="request_id")
            self._streams[req.request_id] = stream
        if self._stopped.is_set():   # shut down between stream() and now: nothing will ever answer
            with self._lock:
                self._streams.pop(req.request_id, None)
            raise EngineDeadError("the engine loop was shut down")
        self._send("add", req)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.num_unfinished -= 1
                finished = stream.num_unfinished == 0
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(req.request_id, None)
            if not finished:
                self._send("abort", req.request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout)

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.stats()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                self._deliver(outputs)
        except BaseException as e:  # a crash in a step: fail every open request, clearly
            log.exception("engine loop crashed")
            self._dead = e
            self._fail_all(EngineDeadError(f"the engine loop crashed: {e!r}"))
            return
        # shut down with requests still open: they end with a clear error instead of waiting forever
        self._fail_all(EngineDeadError("the engine loop was shut down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_prepared(payload)
                except Exception as e:  # e.g. a duplicate request id: that request alone fails
                    self._post(payload.request_id, e)
            elif kind == "abort":
                self.engine.abort(payload)

    def _deliver(self, outputs: list[IncrementalOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, IncrementalOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # that event loop is closed; its requests are aborted by their finally blocks

    def _post(self, request_id: str, item: BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._post(rid, error)


def _put_all(items: list[tuple[_Stream, IncrementalOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)
