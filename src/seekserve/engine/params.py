"""SamplingParams: how one request is decoded. Validated on construction so a bad value fails
at `add_request` with a clear message instead of deep inside a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from seekserve.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                          # number of completions for the prompt
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0                  # nucleus: keep the smallest set with cumulative prob >= top_p
    top_k: int = 0                      # 0 or -1 = disabled
    min_p: float = 0.0                  # drop tokens with prob < min_p * max prob
    presence_penalty: float = 0.0       # OpenAI semantics, on generated tokens
    frequency_penalty: float = 0.0      # OpenAI semantics, on generated tokens
    repetition_penalty: float = 1.0     # CTRL/HF semantics, on prompt + generated tokens
    seed: int | None = None             # per-request generator: same seed -> same text
    stop: tuple[str, ...] = ()          # stop strings, not included in the output
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16         # None = up to the context limit
    min_tokens: int = 0                 # EOS and stop tokens are masked until this many tokens
    ignore_eos: bool = False
    logprobs: int | None = None         # None = off; k >= 0: chosen token's logprob + top-k
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        if not isinstance(self.n, int) or self.n < 1 or self.n > 128:
            raise bad("n", "must be an integer in [1, 128]")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise bad("top_k", "must be -1, 0 (disabled) or a positive integer below 2^31")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "must be a 64-bit integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be at most 16 non-empty strings")
        if any(not isinstance(t, int) or not 0 <= t < 2**31 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers below 2^31")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
