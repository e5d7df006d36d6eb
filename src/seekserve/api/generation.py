"""Shared by the chat and completion routes: request -> SamplingParams, running backend streams (several
prompts merged, timings recorded), and DeepSeek/OpenAI usage objects."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from seekserve.api.errors import APIError
from seekserve.api.metrics import ServerMetrics
from seekserve.api.schemas import ChatCompletionRequest, CompletionRequest
from seekserve.backends.base import Chunk
from seekserve.engine.params import SamplingParams
from seekserve.metric_children import child


def request_id(prefix: str) -> str:
    """`chatcmpl-` + 32 hex digits, as OpenAI spells them. Unique, not secret: from `random` (seeded from the
    OS, reseeded in a forked child), not a system call per request as uuid4."""
    return f"{prefix}-{random.getrandbits(128):032x}"


def sampling_params(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """Map OpenAI fields onto the engine's; refuse what is not supported with a clear 400."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                       code="unsupported_parameter")
    if isinstance(body, ChatCompletionRequest):
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, f"response_format type '{body.response_format.type}' is not supported yet; "
                           "use 'text'", param="response_format", code="unsupported_parameter")
        if body.tools:
            raise APIError(400, "tool calling (tools) is not supported by this server yet", param="tools",
                           code="unsupported_parameter")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                           code="invalid_value")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    else:
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix",
                           code="unsupported_parameter")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported_parameter")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs (prompt logprobs) is not supported",
                           param="echo", code="unsupported_parameter")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(400, f"logprobs must be in [0, 5], got {body.logprobs}", param="logprobs",
                           code="invalid_value")
        logprobs, max_tokens = body.logprobs, body.max_tokens
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    kw: dict[str, Any] = {
        "n": body.n, "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "stop": tuple(stop), "max_tokens": max_tokens,
        "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
        "seed": body.seed, "logprobs": logprobs, "top_k": body.top_k or 0, "min_p": body.min_p or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "min_tokens": body.min_tokens or 0, "ignore_eos": bool(body.ignore_eos),
        "stop_token_ids": tuple(body.stop_token_ids or ()),
        "skip_special_tokens": True if body.skip_special_tokens is None else body.skip_special_tokens}
    return SamplingParams(**kw)   # raises InvalidRequestError (-> 400) for out-of-range values


@dataclass
class UsageTracker:
    """Token counts for one response; prompts are counted once each, completions per choice."""
    prompt: dict[int, tuple[int, int]] = field(default_factory=dict)   # source -> (prompt, cached)
    output: dict[int, int] = field(default_factory=dict)               # choice -> tokens
    reasoning: dict[int, int] = field(default_factory=dict)

    def add(self, source: int, choice: int, chunk: Chunk) -> None:
        self.prompt[source] = (chunk.num_prompt_tokens, chunk.num_cached_tokens)
        self.output[choice] = chunk.num_output_tokens
        self.reasoning[choice] = chunk.num_reasoning_tokens

    def usage(self, with_reasoning: bool) -> dict[str, Any]:
        prompt = sum(p for p, _ in self.prompt.values())
        cached = sum(c for _, c in self.prompt.values())
        completion = sum(self.output.values())
        usage: dict[str, Any] = {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached,
            "prompt_tokens_details": {"cached_tokens": cached}}
        if with_reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(self.reasoning.values())}
        return usage


class RequestTimer:
    """Feeds the latency histograms: TTFT, inter-token latency, end-to-end."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.start = time.perf_counter()
        self.last: float | None = None

    def tokens(self, chunk: Chunk) -> None:
        if chunk.finish_reason:
            child(self.metrics.request_success, self.model, chunk.finish_reason).inc()
        # remote backends and cache hits carry text but no token ids: their first text is the first token
        if not (chunk.token_ids or chunk.text or chunk.reasoning_text):
            return
        now = time.perf_counter()
        if self.last is None:
            child(self.metrics.ttft, self.model).observe(now - self.start)
        elif chunk.token_ids:
            child(self.metrics.itl, self.model).observe((now - self.last) / len(chunk.token_ids))
        self.last = now
        if chunk.token_ids:
            child(self.metrics.generation_tokens, self.model).inc(len(chunk.token_ids))

    def done(self, usage: UsageTracker) -> None:
        child(self.metrics.e2e, self.model).observe(time.perf_counter() - self.start)
        child(self.metrics.prompt_tokens, self.model).inc(sum(p for p, _ in usage.prompt.values()))


async def merge(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Interleave several prompts' streams as chunks arrive: (source index, chunk)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # closing it aborts the engine request
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in s:
                await queue.put((i, chunk))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
