"""The local backend: the native engine in this process. Renders chat messages with the model's template,
checks the context budget, bounds the waiting queue, and turns engine outputs into Chunks (with the
DeepSeek-R1 reasoning split and OpenAI-style logprobs)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from seekserve.backends.base import BackendError, Chunk, GenerationRequest, LogprobEntry, ModelInfo
from seekserve.backends.reasoning import THINK_START, ReasoningSplitter
from seekserve.engine import AsyncEngine, InvalidRequestError, LLMEngine
from seekserve.engine.outputs import IncrementalOutput, TokenLogprobs


class LocalBackend:
    def __init__(self, engine: LLMEngine, served_model_names: list[str], reasoning_parser: str = "auto",
                 max_queued_requests: int = 256) -> None:
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.names = served_model_names or [Path(str(engine.model_path)).name]
        template = engine.tokenizer.chat_template or ""
        self.reasoning = reasoning_parser == "deepseek-r1" or (reasoning_parser == "auto" and THINK_START in template)
        self.max_queued_requests = max_queued_requests
        self.num_queued = 0          # admitted, no output yet (waiting for a slot or in prefill)
        self.num_active = 0          # admitted, not finished
        self._models: tuple[ModelInfo, ...] | None = None

    # -- Backend protocol ---------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        if self._models is None:    # fixed once the engine is built; asked several times per request
            max_len = self.engine.resolved.max_model_len
            self._models = tuple(ModelInfo(id=name, owned_by="seekserve", max_model_len=max_len,
                                           reasoning=self.reasoning) for name in self.names)
        return list(self._models)

    def is_ready(self) -> bool:
        return self.async_engine.is_alive

    def detokenize(self, token_ids: list[int]) -> str:
        try:   # ids outside the vocabulary are the client's mistake (the tokenizer would overflow: a 500)
            self.engine.check_token_ids(token_ids)
        except InvalidRequestError as e:
            raise BackendError(e.message, status=400, param=e.param, code="invalid_value") from None
        return self.engine.tokenizer.decode(token_ids)

    def stats(self):
        """Engine gauges for /metrics."""
        return self.async_engine.stats()

    async def start(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        # tokenizing a long prompt takes a while: off the event loop, so other requests (and probes) go on
        ids, starts_in_reasoning = await asyncio.to_thread(self._prompt_ids, request)
        try:   # the engine's InvalidRequestError is the client's mistake: a 400, as the protocol asks
            params = self._fit_to_context(request, len(ids))   # re-validates (e.g. min_tokens > max_tokens)
            if self.num_queued >= self.max_queued_requests:
                raise BackendError(f"the server is busy: {self.num_queued} requests are already waiting; "
                                   "retry later", status=429, code="queue_full", error_type="rate_limit_error",
                                   headers={"Retry-After": "1"})
            prepared = self.engine.prepare_request(request.request_id, ids, params, request.priority,
                                                   request.cache_salt)
            outputs = self.async_engine.stream(prepared)
        except InvalidRequestError as e:
            raise BackendError(e.message, status=400, param=e.param, code="invalid_value") from None
        reasoning = self.reasoning and request.kind == "chat"
        return self._chunks(outputs, params.n, reasoning, starts_in_reasoning)

    async def close(self) -> None:
        self.async_engine.shutdown()

    # -- helpers ------------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> tuple[list[int], bool]:
        tok = self.engine.tokenizer
        try:
            if request.kind == "chat":
                text = tok.apply_chat_template(request.messages or [], add_generation_prompt=True,
                                               **request.chat_template_kwargs)
                return tok.encode(text, add_special_tokens=False), text.rstrip().endswith(THINK_START)
            if isinstance(request.prompt, str):
                return tok.encode(request.prompt), False
            return list(request.prompt or []), False
        except InvalidRequestError as e:
            raise BackendError(e.message, status=400, param=e.param, code="invalid_value") from None

    def _fit_to_context(self, request: GenerationRequest, num_prompt: int):
        """OpenAI semantics: prompt + max_tokens must fit the context (400 stating both numbers);
        without max_tokens, generation may use whatever context is left."""
        max_len = self.engine.resolved.max_model_len
        params = request.params
        if num_prompt >= max_len:
            raise BackendError(f"This model's maximum context length is {max_len} tokens. However, your "
                               f"{'messages' if request.kind == 'chat' else 'prompt'} resulted in {num_prompt} "
                               "tokens, leaving no room for the completion.", param="messages"
                               if request.kind == "chat" else "prompt", code="context_length_exceeded")
        if params.max_tokens is None:
            return dataclasses.replace(params, max_tokens=max_len - num_prompt)
        if num_prompt + params.max_tokens > max_len:
            raise BackendError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                               f"{num_prompt + params.max_tokens} tokens ({num_prompt} in the "
                               f"{'messages' if request.kind == 'chat' else 'prompt'}, {params.max_tokens} in "
                               "the completion). Please reduce the length of the messages or completion.",
                               param="max_tokens", code="context_length_exceeded")
        return params

    async def _chunks(self, outputs: AsyncIterator[IncrementalOutput], n: int, reasoning: bool,
                      starts_in_reasoning: bool) -> AsyncIterator[Chunk]:
        splitters = [ReasoningSplitter(starts_in_reasoning) for _ in range(n)] if reasoning else None
        reasoning_tokens = [0] * n
        self.num_queued += 1       # from submission (the first iteration) to the first output
        self.num_active += 1
        queued = True
        try:
            async for out in outputs:
                if queued:
                    self.num_queued -= 1
                    queued = False
                chunk = Chunk(index=out.index, token_ids=out.token_ids, finish_reason=out.finish_reason,
                              num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                              num_output_tokens=out.num_output_tokens,
                              logprobs=None if out.logprobs is None else [self._entry(lp) for lp in out.logprobs])
                if splitters is None:
                    chunk.text = out.text
                else:
                    splitter = splitters[out.index]
                    was_reasoning = splitter.in_reasoning
                    chunk.reasoning_text, chunk.text = splitter.feed(out.text)
                    if out.finished:
                        r, c = splitter.flush()
                        chunk.reasoning_text += r
                        chunk.text += c
                    if was_reasoning:
                        reasoning_tokens[out.index] += len(out.token_ids)
                    chunk.num_reasoning_tokens = reasoning_tokens[out.index]
                yield chunk
        finally:
            if queued:
                self.num_queued -= 1
            self.num_active -= 1

    def _entry(self, lp: TokenLogprobs) -> LogprobEntry:
        tok = self.engine.tokenizer

        def text_and_bytes(token_id: int) -> tuple[str, list[int]]:
            raw = tok.token_bytes(token_id)
            return raw.decode("utf-8", errors="replace"), list(raw)

        token, raw = text_and_bytes(lp.token_id)
        top = [(*text_and_bytes(t), v) for t, v in lp.top]
        return LogprobEntry(token=token, logprob=lp.logprob, bytes=raw,
                            top=[(t, v, b) for t, b, v in top])
