"""What the engine returns: per-step deltas (`IncrementalOutput`) and, for the offline
`LLMEngine.generate`, the finished request (`RequestOutput` of `CompletionOutput`s)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float                          # log_softmax of the model's raw logits
    top: tuple[tuple[int, float], ...] = () # the k most likely (token id, logprob), best first


@dataclass
class IncrementalOutput:
    """One sequence's progress in one step (or its final state when `finish_reason` is set)."""
    request_id: str
    index: int                              # which of the request's n completions
    text: str                               # text added since this sequence's previous output
    token_ids: list[int]                    # tokens added since the previous output
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None               # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None           # the stop string or stop token id that matched
    num_prompt_tokens: int
    num_cached_tokens: int                  # prompt tokens served from the prefix cache
    num_output_tokens: int                  # generated so far, cumulative

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: IncrementalOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    """A finished request. `.text`, `.token_ids`, ... read the first completion (the only one when n=1)."""
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
