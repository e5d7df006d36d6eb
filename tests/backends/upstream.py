"""A fake OpenAI/DeepSeek-compatible upstream for tests and benchmarks: a real HTTP/1.1 server on a loopback
port (own thread and event loop) that answers from a script of `Reply`s, else with a default completion,
and records every request. `python -m tests.backends.upstream` serves it alone for load benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self


# -- a reply is a status, headers and either a body or a list of steps (a chunked, streamed body) -----------
@dataclass(frozen=True)
class Send:
    data: bytes                     # written as-is, as one HTTP chunk (or `split` pieces)


@dataclass(frozen=True)
class Sleep:
    seconds: float                  # cut short when the client goes away


@dataclass(frozen=True)
class WaitFor:
    gate: threading.Event           # the test sets it; the stream goes on then
    timeout: float = 10.0


@dataclass(frozen=True)
class Drop:
    """Abort the connection here: the client sees the body end without its terminating chunk."""


Step = Send | Sleep | WaitFor | Drop
KEEPALIVE = Send(b": keep-alive\n\n")   # DeepSeek's comment while a request waits
BLANK_LINE = Send(b"\n")                # DeepSeek also sends bare blank lines
DONE = Send(b"data: [DONE]\n\n")


def event(payload: dict[str, Any] | str) -> Send:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return Send(f"data: {data}\n\n".encode())


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    steps: list[Step] | None = None     # None: `body` with a Content-Length
    header_delay: float = 0.0           # stall before the status line
    drop: bool = False                  # close the connection instead of answering
    split: int | None = None            # write each Send in pieces of this many bytes, pausing between
    split_pause: float = 0.001          # long enough for each piece to be a separate TCP read

    @classmethod
    def sse(cls, *items: dict[str, Any] | str | bytes | Step, done: bool = True, split: int | None = None,
            status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        """A stream: dicts become `data:` events, str/bytes are written raw, steps run as they are."""
        steps: list[Step] = [event(i) if isinstance(i, dict) else Send(i.encode()) if isinstance(i, str)
                             else Send(i) if isinstance(i, bytes) else i for i in items]
        return cls(status=status, steps=steps + ([DONE] if done else []), split=split,
                   headers={"content-type": "text/event-stream; charset=utf-8", **(headers or {})})

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(status=status, body=json.dumps(payload).encode(),
                   headers={"content-type": "application/json", **(headers or {})})

    @classmethod
    def error(cls, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
              param: str | None = None, headers: dict[str, str] | None = None) -> Reply:
        """DeepSeek's (and OpenAI's) error shape."""
        return cls.json({"error": {"message": message, "type": type, "param": param, "code": code}}, status,
                        headers)

    @classmethod
    def stall(cls, seconds: float) -> Reply:
        return cls(header_delay=seconds, body=b"{}", headers={"content-type": "application/json"})

    @classmethod
    def disconnect(cls) -> Reply:
        return cls(drop=True)


# -- payload builders (DeepSeek's shapes) -----------------------------------------------------------------
def chat_chunk(content: str | None = None, *, reasoning: str | None = None, finish: str | None = None,
               index: int = 0, role: str | None = None, logprobs: Any = None, usage: Any = None,
               model: str = "deepseek-chat") -> dict[str, Any]:
    delta: dict[str, Any] = {k: v for k, v in (("role", role), ("content", content),
                                                ("reasoning_content", reasoning)) if v is not None}
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            **({"usage": usage} if usage is not None else {})}


def completion_chunk(text: str, *, finish: str | None = None, index: int = 0, logprobs: Any = None,
                     model: str = "deepseek-chat") -> dict[str, Any]:
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(usage: dict[str, Any], model: str = "deepseek-chat") -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [], "usage": usage}


def deepseek_usage(prompt: int, completion: int, cache_hit: int = 0, reasoning: int = 0) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_cache_hit_tokens": cache_hit, "prompt_cache_miss_tokens": prompt - cache_hit,
             "prompt_tokens_details": {"cached_tokens": cache_hit}}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]                 # names lower-cased
    body: bytes
    received_at: float = field(default_factory=time.monotonic)
    # set when the client closed the connection before the reply ended (e.g. its client disconnected)
    closed_early: threading.Event = field(default_factory=threading.Event)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class FakeUpstream:
    """Replies come from `push()`ed Replies in order, then `default`, else an automatic DeepSeek-style
    answer (`text`, streamed or not as asked; `chunk_delay` between events). `record=False` is the fast
    mode for load benchmarks: nothing is kept per request. HTTP/1.1 keep-alive, no pipelining."""

    def __init__(self, *, models: tuple[str, ...] = ("deepseek-chat", "deepseek-reasoner"),
                 text: str = "Hello from the fake upstream.", chunk_delay: float = 0.0, record: bool = True,
                 port: int = 0) -> None:
        self.models, self.text, self.chunk_delay, self.record = models, text, chunk_delay, record
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.default: Reply | None = None
        self.num_connections = 0                # accepted so far: shows whether the client pools
        self.errors: list[BaseException] = []   # the server's own failures: a test must not pass over them
        self._script: collections.deque[Reply] = collections.deque()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: dict[tuple[Any, ...], Reply] = {}     # the fast mode's automatic answers, by shape

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The base URL clients configure (OpenAI style, with /v1)."""
        return f"{self.base}/v1"

    def push(self, *replies: Reply) -> None:
        self._script.extend(replies)

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake upstream did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None \
                and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop()
        if self.errors and exc_type is None:
            raise AssertionError(f"the fake upstream failed: {self.errors!r}")

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests)} requests arrived, not {n}")
            time.sleep(0.005)
        return self.requests

    # -- the server (its own thread) --------------------------------------------------------------------
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_error)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    def _on_error(self, _: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception") or RuntimeError(context["message"])
        if not isinstance(error, asyncio.CancelledError):   # stop() cancels the connections' tasks
            self.errors.append(error)

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, limit=1 << 20, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.num_connections += 1
        try:
            while True:
                rec = await _read_request(reader)
                if rec is None:
                    return
                if self.record:
                    self.requests.append(rec)
                reply = self._script.popleft() if self._script else self.default or self._auto(rec)
                if not await _Exchange(reader, writer, rec).respond(reply) or \
                        rec.headers.get("connection") == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return      # the client went away between requests
        except (ValueError, asyncio.LimitOverrunError):
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        finally:
            self._tasks.discard(task)
            writer.close()

    def _auto(self, rec: RecordedRequest) -> Reply:
        if rec.method == "GET" and rec.path.rstrip("/").endswith("/models"):
            return Reply.json({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"}
                                                          for m in self.models]})
        kind = "chat" if rec.path.endswith("/chat/completions") else "completion"
        if rec.method != "POST" or not rec.path.endswith("/completions"):
            return Reply.error(404, f"no route {rec.method} {rec.path}", code="not_found")
        try:
            body = json.loads(rec.body)
        except ValueError:
            return Reply.error(400, "the body is not JSON")
        prompt_tokens = max(1, len(rec.body) // 4)
        if self.record:
            return auto_answer(kind, body, self.text, self.chunk_delay, prompt_tokens)
        # the fast mode (load benchmarks): an answer is built once per shape and replayed, so the upstream's
        # own CPU stays small next to what it is compared with
        key = (kind, str(body.get("model", "")), body.get("n"), bool(body.get("stream")),
               bool((body.get("stream_options") or {}).get("include_usage")), prompt_tokens)
        reply = self._answers.get(key)
        if reply is None:
            reply = self._answers[key] = auto_answer(kind, body, self.text, self.chunk_delay, prompt_tokens)
        return reply


def auto_answer(kind: str, body: dict[str, Any], text: str, chunk_delay: float, prompt_tokens: int) -> Reply:
    """A complete DeepSeek-style answer: reasoning first for *reasoner models, then `text` word by word."""
    model, n = str(body.get("model", "")), int(body.get("n") or 1)
    pieces = re.findall(r"\S+\s*", text) or [text]
    thoughts = ["Thinking ", "it over."] if kind == "chat" and "reasoner" in model else []
    usage = deepseek_usage(prompt_tokens, n * (len(pieces) + len(thoughts)), reasoning=n * len(thoughts))
    if not body.get("stream"):
        if kind == "chat":
            message = {"role": "assistant", "content": text, **({"reasoning_content": "".join(thoughts)}
                                                                 if thoughts else {})}
            choices = [{"index": i, "message": message, "finish_reason": "stop", "logprobs": None} for i in range(n)]
        else:
            choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None} for i in range(n)]
        return Reply.json({"id": "fake", "object": "chat.completion" if kind == "chat" else "text_completion",
                           "created": 0, "model": model, "choices": choices, "usage": usage})
    events: list[dict[str, Any]] = []
    for i in range(n):
        if kind == "chat":
            events += [chat_chunk("", role="assistant", index=i, model=model)]
            events += [chat_chunk(reasoning=t, index=i, model=model) for t in thoughts]
            events += [chat_chunk(p, index=i, model=model) for p in pieces]
            events += [chat_chunk("", finish="stop", index=i, model=model)]
        else:
            events += [completion_chunk(p, index=i, model=model) for p in pieces]
            events += [completion_chunk("", finish="stop", index=i, model=model)]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(usage_chunk(usage, model))
    if chunk_delay <= 0:   # one write: the cheapest answer for a load benchmark
        return Reply.sse(b"".join(event(e).data for e in events) + DONE.data, done=False)
    steps: list[Step] = []
    for e in events:
        steps += [event(e), Sleep(chunk_delay)]
    return Reply.sse(*steps)


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None         # the client closed the (idle) connection
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")     # the (empty) trailer section
    else:
        body = bytearray(await reader.readexactly(int(headers.get("content-length") or 0)))
    return RecordedRequest(method, target.split("?")[0], headers, bytes(body))


class _Exchange:
    """Writing one reply, watching for the client closing the connection meanwhile."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: RecordedRequest) -> None:
        self.reader, self.writer, self.rec = reader, writer, rec
        self.closed = asyncio.Event()
        self.pipelined = False      # bytes of a next request arrived early: not supported, close after

    async def respond(self, reply: Reply) -> bool:
        """False when the connection must close afterwards."""
        waits = reply.header_delay or any(isinstance(s, (Sleep, WaitFor)) for s in reply.steps or ())
        watcher = asyncio.create_task(self._watch()) if waits else None   # only a wait can miss a close
        try:
            if reply.header_delay and not await self._pause(reply.header_delay):
                return False
            if reply.drop:
                return False
            return await self._send(reply) and not self.pipelined
        except ConnectionError:
            self.rec.closed_early.set()
            return False
        finally:
            if watcher is not None:   # awaited: its pending read would block reading the next request
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _send(self, reply: Reply) -> bool:
        """True when the whole reply went out."""
        head = [f"HTTP/1.1 {reply.status} {'OK' if reply.status < 400 else 'Error'}"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        if reply.steps is None:
            head.append(f"content-length: {len(reply.body)}")
            self.writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + reply.body)
            await self.writer.drain()
            return True
        head += ["transfer-encoding: chunked", "cache-control: no-cache"]
        if len(reply.steps) == 1 and isinstance(reply.steps[0], Send) and not reply.split and reply.steps[0].data:
            data = reply.steps[0].data     # the whole answer at once (the fast mode's): one write, one TCP read
            self.writer.write(b"%s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % ("\r\n".join(head).encode(), len(data), data))
            await self.writer.drain()
            return True
        self.writer.write("\r\n".join(head).encode() + b"\r\n\r\n")
        for step in reply.steps:
            if not await self._step(step, reply):
                return False
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        return True

    async def _step(self, step: Step, reply: Reply) -> bool:
        if isinstance(step, Send):
            size = reply.split or len(step.data) or 1
            for at in range(0, len(step.data), size):
                piece = step.data[at:at + size]
                self.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await self.writer.drain()
                if reply.split:
                    await asyncio.sleep(reply.split_pause)
            return True
        await self.writer.drain()
        if isinstance(step, Sleep):
            return await self._pause(step.seconds)
        if isinstance(step, WaitFor):
            deadline = time.monotonic() + step.timeout
            while not step.gate.is_set() and not self.closed.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)   # a threading.Event cannot be awaited; polling is cheap here
            return not self.closed.is_set()
        self.writer.transport.abort()        # Drop
        return False

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless the client goes away first (then False)."""
        try:
            await asyncio.wait_for(self.closed.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _watch(self) -> None:
        # during a reply an HTTP/1.1 client without pipelining only ever sends EOF (it closed the connection)
        try:
            data = await self.reader.read(1)
        except ConnectionError:
            data = b""
        if data:
            self.pipelined = True
            return
        self.rec.closed_early.set()
        self.closed.set()


def main(argv: list[str] | None = None) -> None:
    """Serve the automatic answer alone (another process: the benchmark's client keeps its own GIL)."""
    ap = argparse.ArgumentParser(description="fake OpenAI/DeepSeek-compatible upstream")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--text", default="Hello from the fake upstream.")
    ap.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed events")
    args = ap.parse_args(argv)
    upstream = FakeUpstream(text=args.text, chunk_delay=args.chunk_delay, record=False, port=args.port).start()
    print(upstream.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        upstream.stop()


if __name__ == "__main__":
    main()
