"""POST /v1/chat/completions (also /chat/completions): the request -> the gateway -> a JSON body or SSE
frames. Served by the plain ASGI endpoint in api/inference.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from seekserve.api.context import AppContext
from seekserve.api.errors import APIError
from seekserve.api.generation import RequestTimer, UsageTracker, request_id, sampling_params
from seekserve.api.schemas import ChatCompletionRequest
from seekserve.api.streaming import ChunkFrames, Reply, frame, sse_events
from seekserve.backends.base import Chunk, GenerationRequest, LogprobEntry
from seekserve.gateway.principal import Principal

# template variables the backend passes itself: a request setting them again would be a TypeError (500)
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


def _logprobs(entries: list[LogprobEntry] | None) -> list[dict[str, Any]] | None:
    if entries is None:
        return None
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in e.top]} for e in entries]


async def create_chat_completion(ctx: AppContext, principal: Principal, body: ChatCompletionRequest,
                                 headers: Mapping[str, str]) -> Reply:
    info = ctx.model(body.model, principal)
    if any(m.reasoning_content for m in body.messages):
        # DeepSeek's rule: reasoning_content of earlier turns must not be sent back
        raise APIError(400, "reasoning_content must not be included in input messages", param="messages")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(body.chat_template_kwargs or {}))
    if reserved:
        raise APIError(400, f"chat_template_kwargs must not set {', '.join(reserved)}: the server sets "
                       f"{'it' if len(reserved) == 1 else 'them'}", param="chat_template_kwargs",
                       code="invalid_value")
    params = sampling_params(body)
    rid = request_id("chatcmpl")
    gen = GenerationRequest(request_id=rid, model=info.id, kind="chat", params=params,
                            messages=[{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                                      for m in body.messages],
                            chat_template_kwargs=body.chat_template_kwargs or {},
                            priority=principal.priority, cache_salt=principal.tenant, streamed=bool(body.stream))
    admission = await ctx.gateway.admit(principal, [gen], headers, "inference.chat")
    chunks = admission.streams[0]
    timer = RequestTimer(ctx.metrics, info.id)
    base = {"id": rid, "created": int(time.time()), "model": info.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Reply(admission.headers, events=_sse(chunks, base, info.reasoning, include_usage, body.n, timer,
                                                    body.logprobs))
    async with contextlib.aclosing(chunks) as source:   # a cancel (client gone) stops the backend
        items = [(0, chunk) async for chunk in source]
    return Reply(admission.headers, payload=_response(items, base, info.reasoning, body.n, timer, body.logprobs))


def _response(items: list[tuple[int, Chunk]], base: dict[str, Any], reasoning: bool, n: int,
              timer: RequestTimer, want_logprobs: bool) -> dict[str, Any]:
    usage = UsageTracker()
    choices: list[dict[str, Any]] = [{"content": "", "reasoning": "", "logprobs": [], "finish": None}
                                     for _ in range(n)]
    for source, chunk in items:
        timer.tokens(chunk)
        usage.add(source, chunk.index, chunk)
        c = choices[chunk.index]
        c["content"] += chunk.text
        c["reasoning"] += chunk.reasoning_text
        c["logprobs"] += chunk.logprobs or []
        c["finish"] = chunk.finish_reason or c["finish"]
    timer.done(usage)
    out = []
    for i, c in enumerate(choices):
        message: dict[str, Any] = {"role": "assistant", "content": c["content"]}
        if reasoning:
            message["reasoning_content"] = c["reasoning"]
        out.append({"index": i, "message": message,
                    "logprobs": {"content": _logprobs(c["logprobs"])} if want_logprobs else None,
                    "finish_reason": c["finish"]})
    return {**base, "object": "chat.completion", "choices": out, "usage": usage.usage(reasoning),
            "system_fingerprint": None}


def _sse(chunks: AsyncIterator[Chunk], base: dict[str, Any], reasoning: bool, include_usage: bool, n: int,
         timer: RequestTimer, want_logprobs: bool) -> AsyncIterator[bytes]:
    """One prompt's chunks (read directly, without merge's extra step per chunk) -> SSE frames."""
    usage = UsageTracker()
    head = {**base, "object": "chat.completion.chunk", "system_fingerprint": None}
    frames = ChunkFrames(head, {"usage": None} if include_usage else None)
    started = [False] * n

    def encode(chunk: Chunk) -> bytes | None:
        timer.tokens(chunk)
        usage.add(0, chunk.index, chunk)
        delta: dict[str, Any] = {}
        if not started[chunk.index]:
            started[chunk.index] = True
            delta["role"] = "assistant"
            delta["content"] = ""
        if chunk.text:
            delta["content"] = chunk.text
        if reasoning and chunk.reasoning_text:
            delta["reasoning_content"] = chunk.reasoning_text
        if not delta and not chunk.finish_reason and not chunk.logprobs:
            return None
        choice = {"index": chunk.index, "delta": delta,
                  "logprobs": {"content": _logprobs(chunk.logprobs)} if want_logprobs else None,
                  "finish_reason": chunk.finish_reason}
        return frames([choice])

    def last() -> list[bytes]:
        timer.done(usage)
        return [frame({**head, "choices": [], "usage": usage.usage(reasoning)})] if include_usage else []

    return sse_events(chunks, encode, _more_ready, last)


def _more_ready(chunk: Chunk) -> bool:
    return chunk.more_ready
