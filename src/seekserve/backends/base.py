"""The backend protocol: what the API layer asks of any engine, local or remote. Requests come in as
`GenerationRequest`s (chat messages or a completion prompt, sampling parameters); answers come back as a
stream of `Chunk`s, one per completion index and step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from seekserve.engine.params import SamplingParams


class BackendError(Exception):
    """A request the backend refuses or cannot serve; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None,
                 retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.error_type = error_type
        self.headers = headers or {}
        # the backend failed, not the request: another try (here or on a fallback backend) may succeed
        self.retryable = retryable
        self.retry_after = retry_after   # seconds the backend asked us to wait, if it said


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    kind: Literal["chat", "completion"]
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None     # chat: role/content dicts, content as a string
    prompt: str | list[int] | None = None            # completion: text or token ids
    priority: int = 0                                # lower runs first
    cache_salt: str | None = None                    # keeps tenants' prefix caches apart
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # the client reads the answer as it comes (SSE). False: only the whole answer matters, so a backend may
    # hand over what it has at once as one chunk per choice (the remote backend merges what one read held)
    streamed: bool = True


@dataclass(frozen=True)
class LogprobEntry:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]          # (token, logprob, bytes), best first


@dataclass(slots=True)
class Chunk:
    """One completion's progress; the last chunk of a completion has `finish_reason` set. Slotted: a long
    answer makes thousands, each read and written a few times on its way through the gateway."""
    index: int
    text: str = ""
    reasoning_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0
    # a transport hint: the next chunk of this stream is already here (decoded from the same network read),
    # so the API may write the two in one go
    more_ready: bool = False


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str
    max_model_len: int
    reasoning: bool


class Backend(Protocol):
    def models(self) -> list[ModelInfo]: ...

    def is_ready(self) -> bool: ...

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of token ids (for `echo` of a token-id prompt)."""
        ...

    async def start(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Validate and admit the request now (raising BackendError if it is refused, so the API can answer
        with the right status before any byte is sent), and return the stream of its chunks."""
        ...

    async def close(self) -> None: ...
