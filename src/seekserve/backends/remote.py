"""The remote backend: any OpenAI-compatible upstream (DeepSeek cloud, vLLM, SGLang, Ollama) over pooled
HTTP/1.1 (`http1.ConnectionPool`). Streams pass through chunk by chunk; upstream failures become BackendErrors
that name the upstream and never carry our API key, which is read once at start-up and never logged."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic_core import to_json

from seekserve.backends.base import BackendError, Chunk, GenerationRequest, ModelInfo
from seekserve.backends.http1 import (
    ConnectFailed,
    ConnectionPool,
    ConnectTimedOut,
    HTTPClientError,
    ReadTimedOut,
    Response,
)
from seekserve.backends.sse import EventStreamDecoder
from seekserve.engine.params import SamplingParams

log = logging.getLogger("seekserve.backends.remote")
MAX_ERROR_BODY = 64 * 1024      # an error body is read only to quote its message
MAX_ERROR_MESSAGE = 500         # characters of an upstream message quoted to our client
_DEFAULTS = SamplingParams()


@dataclass(frozen=True)
class RemoteModel:
    alias: str                  # the name our clients use
    upstream: str               # the upstream's name for it
    max_model_len: int = 65536
    reasoning: bool = False     # answers carry reasoning_content (deepseek-reasoner)


@dataclass(frozen=True)
class RemoteBackendConfig:
    name: str                   # names the upstream in errors and logs, e.g. "deepseek-cloud"
    base_url: str               # with or without /v1: DeepSeek serves both
    models: tuple[RemoteModel, ...]
    api_key_env: str | None = None      # tried first
    api_key_file: str | None = None
    connect_timeout: float = 5.0        # also the wait for a free pooled connection
    read_timeout: float = 60.0          # the longest gap between two reads (reasoning models pause long)
    max_connections: int = 100
    extra_headers: dict[str, str] = field(default_factory=dict, repr=False)   # may hold credentials
    ca_file: str | None = None          # PEM roots for an upstream behind an internal CA (default: certifi's)
    proxy: str | None = field(default=None, repr=False)     # http://[user:pass@]host:port; default: from env
    remote: bool = True         # data leaves our domain (routing never sends sensitive requests here)

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream {self.name}: base_url must be an http(s) URL")
        if url.username or url.password:   # it would show in every repr and log line
            raise ValueError(f"upstream {self.name}: base_url must not embed credentials; "
                             "use api_key_env or api_key_file")
        if not self.models or len({m.alias for m in self.models}) != len(self.models):
            raise ValueError(f"upstream {self.name}: models must be non-empty, with distinct aliases")
        if min(self.connect_timeout, self.read_timeout) <= 0 or self.max_connections < 1:
            raise ValueError(f"upstream {self.name}: timeouts and max_connections must be positive")


def read_api_key(config: RemoteBackendConfig) -> str | None:
    """The key from the environment variable, else the file; None if neither is configured. Errors name
    where the key was looked for, never a value."""
    if config.api_key_env and os.environ.get(config.api_key_env, "").strip():
        return os.environ[config.api_key_env].strip()
    if config.api_key_file:
        try:
            key = Path(config.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"cannot read the API key file {config.api_key_file} of upstream {config.name}: "
                             f"{e.strerror or type(e).__name__}") from None
        if not key:
            raise ValueError(f"the API key file {config.api_key_file} of upstream {config.name} is empty")
        return key
    if config.api_key_env:
        raise ValueError(f"the environment variable {config.api_key_env} (API key of upstream {config.name}) "
                         "is not set")
    return None


def upstream_body(request: GenerationRequest, upstream_model: str) -> dict[str, Any]:
    """The JSON body for {base_url}/chat/completions or /completions; always streamed, with usage."""
    p = request.params
    body: dict[str, Any] = {"model": upstream_model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": p.temperature, "top_p": p.top_p,
                            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty}
    if request.kind == "chat":
        body["messages"] = request.messages or []
        if request.chat_template_kwargs:    # vLLM/SGLang: e.g. enable_thinking
            body["chat_template_kwargs"] = dict(request.chat_template_kwargs)
    else:
        body["prompt"] = request.prompt if isinstance(request.prompt, str) else list(request.prompt or [])
    optional = {"max_tokens": p.max_tokens, "seed": p.seed, "stop": list(p.stop) or None,
                "n": p.n if p.n != 1 else None}
    body.update({k: v for k, v in optional.items() if v is not None})
    if p.logprobs is not None:
        body.update({"logprobs": True, "top_logprobs": p.logprobs} if request.kind == "chat"
                    else {"logprobs": p.logprobs})
    # vLLM/SGLang sampling extensions, only when set: DeepSeek and OpenAI ignore or refuse them
    for name in ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens"):
        if getattr(p, name) != getattr(_DEFAULTS, name):
            body[name] = getattr(p, name)
    if p.stop_token_ids:
        body["stop_token_ids"] = list(p.stop_token_ids)
    return body


class RemoteBackend:
    """The Backend protocol over one upstream; one connection pool shared by all requests."""

    def __init__(self, config: RemoteBackendConfig) -> None:
        self.config = config
        self._models = {m.alias: m for m in config.models}
        self._infos = tuple(ModelInfo(id=m.alias, owned_by=config.name, max_model_len=m.max_model_len,
                                      reasoning=m.reasoning) for m in config.models)
        self._base = config.base_url.rstrip("/")
        self._secret = read_api_key(config)
        headers = {"User-Agent": "seekserve", "Accept": "text/event-stream", **config.extra_headers}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
            url = urlsplit(self._base)
            if url.scheme == "http" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
                log.warning("upstream %s is plain http: its API key crosses the network unencrypted", config.name)
        # no cookie jar: one pool serves every tenant, so a cookie set on one tenant's answer must never ride
        # on another's request
        self._pool = ConnectionPool(self._base, connect_timeout=config.connect_timeout,
                                    read_timeout=config.read_timeout, max_connections=config.max_connections,
                                    headers=headers, ca_file=config.ca_file, proxy=config.proxy)
        self._paths = {kind: urlsplit(f"{self._base}/{path}").path
                       for kind, path in (("chat", "chat/completions"), ("completion", "completions"))}

    def __repr__(self) -> str:
        return (f"RemoteBackend(name={self.config.name!r}, base_url={self._base!r}, "
                f"models={sorted(self._models)!r})")

    # -- Backend protocol ---------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return list(self._infos)

    def is_ready(self) -> bool:
        return True     # reachability is the router's business (health probes, circuit breaking)

    def detokenize(self, token_ids: list[int]) -> str:
        raise BackendError(f"echo of a token-id prompt is not supported for models of the remote upstream "
                           f"{self.config.name}", status=400, param="echo", code="unsupported_parameter")

    async def start(self, request: GenerationRequest) -> RemoteStream:
        model = self._models.get(request.model)
        if model is None:
            raise BackendError(f"the model '{request.model}' is not served by the upstream {self.config.name}",
                               status=404, param="model", code="model_not_found", error_type="not_found_error")
        body = to_json(upstream_body(request, model.upstream))
        try:
            response = await self._pool.post(self._paths[request.kind], body,
                                             {"X-Request-Id": request.request_id})
        except HTTPClientError as e:
            raise transport_error(self.config.name, e, mid_stream=False, retryable=True) from e
        if not 200 <= response.status < 300:
            log.warning("upstream %s answered HTTP %d to %s", self.config.name, response.status,
                        request.request_id)
            raw = await _read_capped(response)
            raise status_error(self.config.name, response.status, raw, response.headers, self._secret)
        if response.headers.get("content-type", "").startswith("application/json"):
            raw = await _read_capped(response)   # an error wrapped in a 200, or streaming ignored
            message = _scrub(_upstream_error(raw)[0], self._secret)
            raise BackendError(f"the upstream {self.config.name} answered JSON instead of an event stream: "
                               f"{message}", status=502, code="upstream_error", error_type="server_error")
        return RemoteStream(response, self._chunks(response, request.params.n, coalesce=not request.streamed))

    async def close(self) -> None:
        await self._pool.aclose()

    # -- helpers ------------------------------------------------------------------------------
    async def _chunks(self, response: Response, n: int, coalesce: bool) -> AsyncGenerator[Chunk, None]:
        decoder = EventStreamDecoder(self.config.name, n, coalesce)
        yielded = False
        try:
            async for raw in response:
                if decoder.done:
                    continue    # read to the end, so the connection goes back to the pool
                for chunk in decoder.feed(raw):
                    yielded = True
                    yield chunk
                if decoder.failure is not None:    # raised once the chunks before the bad event went out
                    raise decoder.failure
            for chunk in decoder.end():
                yield chunk
            if decoder.failure is not None:
                raise decoder.failure
        except HTTPClientError as e:
            if decoder.done:    # everything was delivered; only the tail of the body went missing
                log.debug("upstream %s: the end of a finished stream failed: %r", self.config.name, e)
                return
            # once a chunk went out the request cannot be tried again elsewhere
            raise transport_error(self.config.name, e, mid_stream=True, retryable=not yielded) from e
        finally:
            await response.aclose()


class RemoteStream:
    """The chunks of one upstream response. `aclose()` (a client disconnect) closes the upstream
    connection at once, even when no chunk was read yet."""

    def __init__(self, response: Response, chunks: AsyncGenerator[Chunk, None]) -> None:
        self._response, self._chunks = response, chunks

    def __aiter__(self) -> RemoteStream:
        return self

    def __anext__(self) -> Awaitable[Chunk]:   # the generator's own awaitable: no extra frame per chunk
        return self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self._response.aclose()


def status_error(upstream: str, status: int, raw: bytes, headers: Mapping[str, str],
                 secret: str | None) -> BackendError:
    """An upstream's non-2xx answer -> the error our client sees (docs/hybrid.md has the table)."""
    message, param, code = _upstream_error(raw)
    message = _scrub(message, secret)
    retry_header = headers.get("retry-after")   # passed on: the client should wait as long as we must
    retry_headers = {"Retry-After": retry_header} if retry_header else {}
    retry_after = _retry_after(retry_header) if retry_header else None
    if status in (401, 403):   # our credentials, not the client's: no detail that could echo them
        log.error("upstream %s refused this server's credentials: check its API key", upstream)
        return BackendError(f"the upstream {upstream} refused this server's credentials", status=502,
                            code="upstream_auth_failed", error_type="server_error")
    if status == 402:
        return BackendError(f"the upstream {upstream} reports insufficient balance", status=402,
                            code="insufficient_balance", error_type="insufficient_quota")
    if status == 429:
        return BackendError(f"the upstream {upstream} is rate limiting this server: {message}", status=429,
                            code="rate_limit_exceeded", error_type="rate_limit_error", headers=retry_headers,
                            retryable=True, retry_after=retry_after)
    if status == 408:
        return BackendError(f"the upstream {upstream} timed out", status=504, code="upstream_timeout",
                            error_type="server_error", retryable=True)
    if 400 <= status < 500:
        return BackendError(f"{upstream}: {message}", status=400, param=param, code=code or "upstream_rejected")
    if status == 503:
        return BackendError(f"the upstream {upstream} is unavailable: {message}", status=503,
                            code="upstream_unavailable", error_type="service_unavailable_error",
                            headers=retry_headers, retryable=True, retry_after=retry_after)
    retryable = status >= 500    # a 3xx: redirects are not followed, the base_url is wrong
    return BackendError(f"the upstream {upstream} failed (HTTP {status}): {message}", status=502,
                        code="upstream_error", error_type="server_error", retryable=retryable)


def transport_error(upstream: str, e: HTTPClientError, mid_stream: bool, retryable: bool) -> BackendError:
    """A network failure -> BackendError: 503 when no connection, 504 on a read timeout, else 502."""
    if isinstance(e, ConnectFailed):
        what = "timed out connecting" if isinstance(e, ConnectTimedOut) else "failed to connect"
        return BackendError(f"the upstream {upstream} is unreachable ({what}: {e})", status=503,
                            code="upstream_unavailable", error_type="service_unavailable_error",
                            retryable=retryable)
    when = "mid-stream" if mid_stream else "before answering"
    if isinstance(e, ReadTimedOut):
        return BackendError(f"the upstream {upstream} timed out {when}", status=504, code="upstream_timeout",
                            error_type="server_error", retryable=retryable)
    return BackendError(f"the upstream {upstream} closed the connection {when} ({type(e).__name__})",
                        status=502, code="upstream_error", error_type="server_error", retryable=retryable)


async def _read_capped(response: Response) -> bytes:
    """The start of a (small) error body, then the response closed."""
    try:
        return await response.read(MAX_ERROR_BODY)
    except HTTPClientError as e:   # the status alone still says what happened
        log.debug("could not read an upstream error body: %r", e)
        return b""


def _upstream_error(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from the error shapes in use: OpenAI/DeepSeek {"error": {...}}, vLLM
    {"object": "error", "message"}, Ollama {"error": "..."}, FastAPI {"detail": ...}, or plain text."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or json.dumps(err)[:MAX_ERROR_MESSAGE]
            param, code = err.get("param"), err.get("code")
            return (str(message)[:MAX_ERROR_MESSAGE], param if isinstance(param, str) else None,
                    code if isinstance(code, str) else None)
        return str(err)[:MAX_ERROR_MESSAGE], None, None
    text = raw.decode("utf-8", errors="replace").strip()
    return (text[:MAX_ERROR_MESSAGE] or "no details given"), None, None


def _scrub(text: str, secret: str | None) -> str:
    """Upstreams sometimes quote the key they were sent ("Incorrect API key provided: sk-..."): never pass
    it on."""
    return text.replace(secret, "[redacted]") if secret else text


def _retry_after(value: str) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value.strip().replace(".", "", 1).isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):     # neither form: the header is passed on, but we cannot time it
        return None
