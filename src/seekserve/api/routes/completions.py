"""POST /v1/completions (also /completions): prompt as a string, a list of strings, token ids or a list
of token-id lists; each prompt gets n choices, indexed prompt * n + i. Served by the plain ASGI endpoint in
api/inference.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from seekserve.api.context import AppContext
from seekserve.api.errors import APIError
from seekserve.api.generation import RequestTimer, UsageTracker, merge, request_id, sampling_params
from seekserve.api.schemas import CompletionRequest
from seekserve.api.streaming import ChunkFrames, Reply, frame, sse_events
from seekserve.backends.base import Chunk, GenerationRequest, LogprobEntry
from seekserve.gateway.principal import Principal

MAX_PROMPTS = 64


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt", code="invalid_value")
    return list(prompt)  # type: ignore[arg-type]


def _logprobs(entries: list[LogprobEntry], offset: int) -> dict[str, Any]:
    """The legacy completions format: parallel lists, text offsets from `offset`."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
        tokens.append(e.token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: v for t, v, _ in e.top} for e in entries], "text_offset": offsets}


async def create_completion(ctx: AppContext, principal: Principal, body: CompletionRequest,
                            headers: Mapping[str, str]) -> Reply:
    info = ctx.model(body.model, principal)
    params = sampling_params(body)
    prompts = _prompts(body.prompt)
    rid = request_id("cmpl")
    echoes = ([p if isinstance(p, str) else ctx.detokenize(info.id, p) for p in prompts] if body.echo
              else [""] * len(prompts))
    gens = [GenerationRequest(request_id=f"{rid}-{i}", model=info.id, kind="completion", params=params, prompt=p,
                              priority=principal.priority, cache_salt=principal.tenant, streamed=bool(body.stream))
            for i, p in enumerate(prompts)]
    admission = await ctx.gateway.admit(principal, gens, headers, "inference.completion")
    streams = admission.streams
    base = {"id": rid, "created": int(time.time()), "model": info.id}
    timer = RequestTimer(ctx.metrics, info.id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Reply(admission.headers, events=_sse(merge(streams), base, body.n, echoes, include_usage, timer,
                                                    body.logprobs is not None))
    async with contextlib.aclosing(merge(streams)) as source:   # a cancel (client gone) stops it
        items = [item async for item in source]
    usage = UsageTracker()
    choices = [{"text": echoes[i // body.n], "logprobs": [], "finish": None} for i in range(len(prompts) * body.n)]
    for source, chunk in items:
        timer.tokens(chunk)
        idx = source * body.n + chunk.index
        usage.add(source, idx, chunk)
        choices[idx]["text"] += chunk.text
        choices[idx]["logprobs"] += chunk.logprobs or []
        choices[idx]["finish"] = chunk.finish_reason or choices[idx]["finish"]
    timer.done(usage)
    out = [{"index": i, "text": c["text"],
            "logprobs": _logprobs(c["logprobs"], len(echoes[i // body.n])) if body.logprobs is not None else None,
            "finish_reason": c["finish"]} for i, c in enumerate(choices)]
    return Reply(admission.headers, payload={**base, "object": "text_completion", "choices": out,
                                            "usage": usage.usage(False), "system_fingerprint": None})


def _sse(source: AsyncIterator[tuple[int, Chunk]], base: dict[str, Any], n: int, echoes: list[str],
         include_usage: bool, timer: RequestTimer, want_logprobs: bool) -> AsyncIterator[bytes]:
    usage = UsageTracker()
    head = {**base, "object": "text_completion"}
    frames = ChunkFrames(head, {"usage": None} if include_usage else None)
    offsets: dict[int, int] = {}   # choice -> text offset of its next token
    echoed: set[int] = set()

    def encode(item: tuple[int, Chunk]) -> bytes | None:
        source_idx, chunk = item
        timer.tokens(chunk)
        idx = source_idx * n + chunk.index
        usage.add(source_idx, idx, chunk)
        text = chunk.text
        if idx not in echoed:
            echoed.add(idx)
            text = echoes[source_idx] + text
        if not text and not chunk.finish_reason:
            return None
        lp = None
        if want_logprobs:
            start = offsets.get(idx, len(echoes[source_idx]))
            lp = _logprobs(chunk.logprobs or [], start)
            offsets[idx] = start + sum(len(e.token) for e in chunk.logprobs or [])
        choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": chunk.finish_reason}
        return frames([choice])

    def last() -> list[bytes]:
        timer.done(usage)
        return [frame({**head, "choices": [], "usage": usage.usage(False)})] if include_usage else []

    return sse_events(source, encode, _more_ready, last)


def _more_ready(item: tuple[int, Chunk]) -> bool:
    return item[1].more_ready
