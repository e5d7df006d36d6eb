"""Reading an OpenAI-compatible event stream: bytes -> SSE events (`SSEParser`, any split of the input
gives the same events) -> `Chunk`s (`ChunkTranslator`, which holds each choice's finishing chunk back
until the usage numbers arrive, so the last chunk of every choice carries them)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from pydantic_core import from_json

from seekserve.backends.base import BackendError, Chunk, LogprobEntry

MAX_LINE_BYTES = 16 << 20     # a line this long without an end is a broken upstream, not a big answer


class SSEEvent(NamedTuple):
    data: str
    event: str = "message"


# an SSEEvent made without NamedTuple's Python-level __new__ (a frame per event on the hot path)
_event = functools.partial(tuple.__new__, SSEEvent)


class SSEParser:
    """Incremental parser per the WHATWG SSE rules: lines end with CRLF, LF or CR; `:` lines are comments
    (DeepSeek's `: keep-alive`); `data` lines join with newlines; a blank line dispatches the event."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._event = ""

    def feed(self, raw: bytes) -> list[SSEEvent]:
        self._buf += raw
        events: list[SSEEvent] = []
        if not self._data and not self._event and self._buf.startswith(b"data: "):
            # the commonest shape by far: events of one `data: ` line each, LF only. Split them all at once
            # when every line break of the complete part is one of theirs
            end = self._buf.rfind(b"\n\n") + 2
            if end > 1:
                complete = self._buf[:end]
                if complete.count(b"\n") == 2 * complete.count(b"\n\ndata: ") + 2 and b"\r" not in complete:
                    text = complete[6:-2].decode("utf-8", errors="replace")
                    del self._buf[:end]
                    return [_event((data, "message")) for data in text.split("\n\ndata: ")]
        if b"\r" not in self._buf:     # the usual LF-only stream: split all complete lines at once
            cut = self._buf.rfind(b"\n")
            if cut != -1:   # a multi-byte character never contains LF, so the complete part decodes whole
                text = self._buf[:cut].decode("utf-8", errors="replace")
                del self._buf[:cut + 1]
                data = self._data
                for line in text.split("\n"):
                    if line.startswith("data: "):     # nearly every line: handled here, not in _line
                        data.append(line[6:])
                    elif line:
                        self._line(line, events)
                    elif data:      # a blank line: dispatch (most events are one data line)
                        events.append(_event((data[0] if len(data) == 1 else "\n".join(data),
                                              self._event or "message")))
                        data = self._data = []
                        self._event = ""
                    else:
                        self._event = ""
            return events
        start = 0
        while True:
            end = _line_end(self._buf, start)
            if end is None:
                break
            line_end, next_start = end
            self._line(bytes(self._buf[start:line_end]).decode("utf-8", errors="replace"), events)
            start = next_start
        del self._buf[:start]   # lines are decoded whole, so a multi-byte character may span reads
        return events

    @property
    def num_pending_bytes(self) -> int:
        return len(self._buf)

    def close(self) -> list[SSEEvent]:
        """End of input: be lenient with a last event that lacks its blank line (some servers end so)."""
        events: list[SSEEvent] = []
        if self._buf:
            self._line(bytes(self._buf).rstrip(b"\r").decode("utf-8", errors="replace"), events)
            self._buf.clear()
        self._line("", events)
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent("\n".join(self._data), self._event or "message"))
            self._data, self._event = [], ""
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")   # one space after the colon is not part of the value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # `id` and `retry` only matter to a reconnecting browser; a completion stream cannot be resumed


def _line_end(buf: bytearray, start: int) -> tuple[int, int] | None:
    """(end of the line, start of the next) for the first full line from `start`, or None."""
    lf, cr = buf.find(b"\n", start), buf.find(b"\r", start)
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(buf):
        return None        # a CR at the end may be the first half of a CRLF split across reads
    return (cr, cr + 2) if buf[cr + 1] == ord("\n") else (cr, cr + 1)


class EventStreamDecoder:
    """One upstream response's bytes -> Chunks; `done` once `data: [DONE]` was read. Each `feed` returns the
    chunks that read completed, every one but the last marked `more_ready` (the API writes them in one
    go). A bad event ends the stream: the chunks decoded before it are returned and the error is kept in
    `failure`, for the caller to raise once they went out."""

    def __init__(self, upstream: str, n: int, coalesce: bool = False) -> None:
        self.upstream, self.coalesce = upstream, coalesce   # coalesce: one chunk per choice from each read
        self.parser, self.translator = SSEParser(), ChunkTranslator(upstream, n)
        self.done = False
        self.failure: BackendError | None = None

    def feed(self, raw: bytes) -> list[Chunk]:
        chunks = self._translate(self.parser.feed(raw))
        if self.parser.num_pending_bytes > MAX_LINE_BYTES and self.failure is None:
            self.failure = BackendError(f"the upstream {self.upstream} sent a line of over {MAX_LINE_BYTES} "
                                        "bytes", status=502, code="upstream_error", error_type="server_error")
        return chunks

    def end(self) -> list[Chunk]:
        """The input ended: a stream without [DONE] is fine (some servers omit it) if every choice ended."""
        chunks = self._translate(self.parser.close())
        if self.done or self.failure is not None:
            return chunks
        if not self.translator.all_finished:
            self.failure = BackendError(f"the upstream {self.upstream} ended the stream before the completion "
                                        "finished", status=502, code="upstream_error", error_type="server_error")
            return chunks
        return self._ready(chunks + self.translator.flush())

    def _translate(self, events: list[SSEEvent]) -> list[Chunk]:
        out: list[Chunk] = []
        translate = self.translator.feed
        for data, kind in events:
            if self.done or self.failure is not None:
                break
            if data == "[DONE]" or (len(data) < 32 and data.strip() == "[DONE]"):
                self.done = True
                out += self.translator.flush()
                break
            try:
                obj = from_json(data)     # pydantic's parser: a third of json.loads' time
            except ValueError:
                self.failure = BackendError(f"the upstream {self.upstream} sent an event that is not JSON",
                                            status=502, code="upstream_error", error_type="server_error")
                break
            if kind == "error" and isinstance(obj, dict) and "error" not in obj:
                obj = {"error": obj}
            try:
                translate(obj, out)
            except BackendError as e:
                self.failure = e
                break
        return self._ready(out)

    def _ready(self, chunks: list[Chunk]) -> list[Chunk]:
        if self.coalesce and len(chunks) > 1:
            chunks = coalesced(chunks)
        for chunk in chunks[:-1]:
            chunk.more_ready = True
        return chunks


def coalesced(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks of one read as one chunk per choice, in order of first appearance: texts and logprobs
    joined, the finish reason and the token counts of the choice's last chunk (counts are running totals,
    set on a finishing chunk). For a client that waits for the whole answer, pieces that arrived together
    need not travel through the gateway one by one. The chunks are this decoder's own: merged in place."""
    merged: dict[int, Chunk] = {}
    for chunk in chunks:
        into = merged.get(chunk.index)
        if into is None:
            merged[chunk.index] = chunk
            continue
        into.text += chunk.text
        into.reasoning_text += chunk.reasoning_text
        into.token_ids = into.token_ids + chunk.token_ids
        if chunk.logprobs is not None:
            into.logprobs = (into.logprobs or []) + chunk.logprobs
        into.finish_reason = chunk.finish_reason or into.finish_reason
        into.num_prompt_tokens, into.num_cached_tokens = chunk.num_prompt_tokens, chunk.num_cached_tokens
        into.num_output_tokens, into.num_reasoning_tokens = chunk.num_output_tokens, chunk.num_reasoning_tokens
    return list(merged.values())


class ChunkTranslator:
    """Upstream stream objects (already JSON-decoded) -> Chunks. Non-finishing chunks pass through at
    once; each finishing chunk waits for the usage object (a last chunk with empty `choices`, or usage on
    the finishing chunk itself) and then carries the counts the API's UsageTracker reads."""

    def __init__(self, upstream: str, n: int) -> None:
        self.upstream, self.n = upstream, n
        self.held: dict[int, Chunk] = {}         # choice index -> its finishing chunk, until usage comes
        self.finished: set[int] = set()
        self.usage: dict[str, Any] | None = None

    @property
    def all_finished(self) -> bool:
        return len(self.finished) >= self.n

    def feed(self, obj: Any, ready: list[Chunk]) -> None:
        """Append the chunks `obj` makes ready to `ready`."""
        if type(obj) is not dict:
            raise BackendError(f"the upstream {self.upstream} sent a malformed stream event", status=502,
                               code="upstream_error", error_type="server_error")
        choices = obj.get("choices")
        if not choices and obj.get("error"):
            raise BackendError(f"the upstream {self.upstream} failed mid-stream: {_error_message(obj)}",
                               status=502, code="upstream_error", error_type="server_error")
        for choice in choices or ():
            try:
                chunk = _chunk(choice)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise BackendError(f"the upstream {self.upstream} sent a malformed choice ({e!r})", status=502,
                                   code="upstream_error", error_type="server_error") from e
            if chunk.finish_reason:
                self.held[chunk.index] = chunk
                self.finished.add(chunk.index)
            elif chunk.text or chunk.reasoning_text or chunk.logprobs:
                ready.append(chunk)
        usage = obj.get("usage")
        if usage:
            self.usage = usage
            # the usage-only chunk is the last one; usage on a chunk is final once every choice is done
            if not choices or self.all_finished:
                ready += self.flush()

    def flush(self) -> list[Chunk]:
        """The held finishing chunks, with whatever usage is known (none if the upstream never sends it)."""
        if not self.held:
            return []
        prompt, cached, completion, reasoning = usage_numbers(self.usage or {})
        chunks = [self.held[i] for i in sorted(self.held)]
        for chunk in chunks:
            chunk.num_prompt_tokens, chunk.num_cached_tokens = prompt, cached
            # the API sums completion tokens over choices: the total goes on index 0 (or the first held)
            first = chunk is chunks[0]
            chunk.num_output_tokens = completion if first else 0
            chunk.num_reasoning_tokens = reasoning if first else 0
        self.held.clear()
        return chunks


def usage_numbers(usage: dict[str, Any]) -> tuple[int, int, int, int]:
    """(prompt, cached prompt, completion, reasoning) tokens: DeepSeek's prompt_cache_hit_tokens, or
    OpenAI/vLLM's prompt_tokens_details.cached_tokens."""
    prompt_details = usage.get("prompt_tokens_details") or {}
    cached = usage.get("prompt_cache_hit_tokens")
    if cached is None:
        cached = prompt_details.get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return int(usage.get("prompt_tokens") or 0), int(cached), int(usage.get("completion_tokens") or 0), \
        int(reasoning)


def _chunk(choice: dict[str, Any]) -> Chunk:
    # chat: delta.content; completions: text. Reasoning: DeepSeek's reasoning_content, newer vLLM's reasoning
    delta = choice.get("delta")
    if delta:
        text = delta.get("content") or choice.get("text") or ""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    else:
        text, reasoning = choice.get("text") or "", ""
    index, finish, lp = choice.get("index"), choice.get("finish_reason"), choice.get("logprobs")
    # positional, in Chunk's field order (index, text, reasoning_text, token_ids, logprobs, finish_reason)
    return Chunk(int(index) if index else 0, text, reasoning, [], _logprobs(lp) if lp else None, finish or None)


def _logprobs(lp: Any) -> list[LogprobEntry] | None:
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):    # chat format
        return [LogprobEntry(token=e["token"], logprob=float(e["logprob"]), bytes=_bytes(e),
                             top=[(t["token"], float(t["logprob"]), _bytes(t)) for t in e.get("top_logprobs") or []])
                for e in lp["content"]]
    if isinstance(lp.get("tokens"), list):     # legacy completions format: parallel lists
        tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
        return [LogprobEntry(token=tok, logprob=float(value), bytes=list(tok.encode("utf-8")),
                             top=[(t, float(v), list(t.encode("utf-8")))
                                  for t, v in sorted((top or {}).items(), key=lambda kv: -kv[1])])
                for tok, value, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops)]
    return None


def _bytes(entry: dict[str, Any]) -> list[int]:
    raw = entry.get("bytes")
    return list(raw) if isinstance(raw, list) else list(str(entry["token"]).encode("utf-8"))


def _error_message(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)
