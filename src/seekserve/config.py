"""Settings: one object for the whole server. Sources, highest first: command-line flags, environment
variables `SEEKSERVE_*` (nested with `__`), a YAML file (`--config FILE`, else /etc/seekserve/config.yaml
when it exists), then the defaults below."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = Path("/etc/seekserve/config.yaml")
# the file passed to load_settings (--config): scoped to that call, so it never leaks into the process
# environment or into later Settings() built in the same process
_CONFIG_FILE: ContextVar[str | None] = ContextVar("seekserve_config_file", default=None)


# settings without a command-line flag: nested sections (config file or SEEKSERVE_<SECTION>__<KEY>) and the
# key pepper (a secret: a flag would show in `ps`)
FILE_ONLY_SETTINGS = ("key_pepper", "oidc", "tenant_limits", "upstreams", "routes", "retry", "sensitivity",
                      "response_cache", "model_prices", "sync")


class ConfigFileError(ValueError):
    """The YAML config file is unreadable or not a mapping."""


def default_data_dir() -> Path:
    """Where the embedded store (SQLite) and the generated key pepper live: $XDG_DATA_HOME/seekserve."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "seekserve"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitSettings(_Strict):
    """Limits of one tenant (shared by all its keys); unset = unlimited."""
    rps: float | None = Field(None, gt=0)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)


class RemoteModelSettings(_Strict):
    alias: str                      # the name clients use
    upstream: str | None = None     # the upstream's name for it (default: the alias)
    max_model_len: int = Field(65536, ge=16)
    reasoning: bool = False         # answers carry reasoning_content (deepseek-reasoner)


class UpstreamSettings(_Strict):
    """An OpenAI-compatible upstream: DeepSeek cloud, a vLLM/SGLang fleet, Ollama (docs/hybrid.md)."""
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    base_url: str
    models: Annotated[list[RemoteModelSettings], Field(min_length=1)]
    api_key_env: str | None = None
    api_key_file: str | None = None
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    max_connections: int = Field(100, ge=1)
    ca_file: str | None = None      # PEM roots for an upstream behind an internal CA (default: certifi's)
    proxy: SecretStr | None = None  # http://[user:pass@]host:port (default: HTTPS_PROXY/HTTP_PROXY/NO_PROXY)
    remote: bool = True             # data leaves the domain: never used for sensitive requests


class RetrySettings(_Strict):
    max_attempts: int = Field(2, ge=1)
    base_backoff: float = Field(0.1, ge=0)
    max_backoff: float = Field(2.0, ge=0)
    max_retry_after: float = Field(5.0, ge=0)
    first_chunk_timeout: float = Field(30.0, gt=0)
    failure_threshold: int = Field(5, ge=1)      # circuit breaker: consecutive failures that open it
    reset_timeout: float = Field(30.0, ge=0)     # seconds open before one half-open probe


class SensitivitySettings(_Strict):
    keywords: list[str] = Field(default_factory=list)
    patterns: dict[str, str] = Field(default_factory=dict)
    tenant_levels: dict[str, Literal["public", "internal", "confidential"]] = Field(default_factory=dict)
    pii_level: Literal["public", "internal", "confidential"] = "confidential"
    keyword_level: Literal["public", "internal", "confidential"] = "confidential"
    default_level: Literal["public", "internal", "confidential"] = "public"
    detectors: list[str] | None = None          # default: all (cn_id, cn_mobile, bank_card, email, ip, passport)


class ResponseCacheSettings(_Strict):
    enabled: bool = False
    ttl: float = Field(3600.0, gt=0)
    max_entries: int = Field(10_000, ge=1)
    max_bytes: int = Field(256 * 2**20, ge=1024)
    sensitive_tenants: list[str] = Field(default_factory=list)


class SyncSettings(_Strict):
    """Publish usage and audit events to Kafka (through the durable outbox)."""
    bootstrap_servers: str
    usage_topic: str = "seekserve.usage"
    audit_topic: str = "seekserve.audit"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password_env: str | None = None
    ssl_cafile: str | None = None
    enable_idempotence: bool = True       # Tansu (the test broker) refuses it: set false there
    batch_size: int = Field(500, ge=1)
    poll_interval: float = Field(0.5, gt=0)
    max_backoff: float = Field(30.0, gt=0)
    send_timeout: float = Field(30.0, gt=0)
    retain_delivered: float = Field(86400.0, ge=0, description="seconds delivered outbox rows are kept")


class OIDCSettings(_Strict):
    """Bearer JWTs from one OAuth2/OIDC issuer (see docs/security.md)."""
    issuer: str
    audience: Annotated[list[str], Field(min_length=1)]
    jwks_url: str | None = None
    jwks_file: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    clock_skew: float = Field(60.0, ge=0, le=300)
    role_claim: str = "role"
    tenant_claim: str = "tenant"
    tier_claim: str = "tier"
    models_claim: str | None = None
    default_role: Literal["developer", "admin", "auditor"] | None = "developer"
    default_tier: Literal["vip", "standard", "batch"] = "standard"
    default_tenant: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEEKSERVE_", env_nested_delimiter="__", extra="forbid",
                                      frozen=True)

    # -- listening
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8080, ge=0, le=65535, description="port to bind (0 = any free port)")
    # -- the model (container-era names)
    model_path: str | None = Field(None, description="Hugging Face model folder or hub id; "
                                                     "unset: the tiny model shipped with seekserve")
    served_model_name: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                         description="names clients use for the model (first is canonical); "
                                                     "default: the folder name, seekserve-tiny for the "
                                                     "shipped model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights dtype")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(64, ge=1, description="max sequences per engine step")
    max_sequence_length: int | None = Field(None, ge=16, description="max prompt + output tokens per request; "
                                                                      "default: the model's limit")
    tensor_parallel: int = Field(1, ge=1, description="devices per model (only 1 is supported)")
    kv_cache_memory: float | None = Field(None, gt=0, description="KV cache budget in GiB; "
                                                                  "default: a share of free memory")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one engine step")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of shared prompt prefixes")
    reasoning_parser: Literal["auto", "deepseek-r1", "none"] = Field(
        "auto", description="split <think>...</think> into reasoning_content; auto: when the chat template "
                            "uses <think>")
    # -- serving
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="static API keys accepted as Bearer tokens; "
                                                                  "none: no authentication")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for a slot before 429")
    max_request_body_bytes: int = Field(8 * 2**20, ge=1024, description="larger request bodies get 413")
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM")
    keepalive_interval: float = Field(10.0, gt=0, description="seconds between SSE keep-alive comments "
                                                                "while a streamed request waits")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    # -- gateway: identity, store, limits
    data_dir: Path = Field(default_factory=default_data_dir,
                           description="folder of the embedded SQLite store and the generated key pepper")
    database_url: SecretStr | None = Field(None, description="SQLAlchemy URL of the store, e.g. "
                                                             "postgresql+psycopg://user:pw@host/db; "
                                                             "default: SQLite in --data-dir")
    key_pepper: SecretStr | None = Field(None, description="server secret mixed into API-key hashes; default: "
                                                           "generated once into <data-dir>/pepper (0600)")
    allow_unauthenticated: bool = Field(False, description="serve without any key or issuer on a "
                                                           "non-loopback address")
    oidc: OIDCSettings | None = Field(None, description="accept JWTs from this OAuth2/OIDC issuer "
                                                        "(config file or SEEKSERVE_OIDC__* env)")
    redis_url: SecretStr | None = Field(None, description="Redis shared by all replicas for rate limits "
                                                          "(and the response cache); default: in-process")
    rate_limit_failure_mode: Literal["open", "closed"] = Field(
        "open", description="when Redis is unreachable: open = admit without limits, closed = refuse (503)")
    tenant_limits: dict[str, LimitSettings] = Field(default_factory=dict,
                                                    description="limits per tenant, shared by its keys")
    default_max_tokens_reservation: int = Field(
        1024, ge=1, description="tokens reserved against tokens-per-minute for a request without max_tokens")
    vip_reserved_share: float = Field(0.0, ge=0, lt=1, description="share of --batch-size slots kept for "
                                                                    "vip-tier requests")
    site: str = Field(default_factory=lambda: os.uname().nodename,
                      description="this deployment's name in audit and usage records")
    # -- hybrid: upstreams, routing, sensitivity, cache, sync (config file; docs/hybrid.md)
    upstreams: list[UpstreamSettings] = Field(default_factory=list,
                                              description="OpenAI-compatible upstreams (DeepSeek cloud, vLLM ...)")
    routes: list[dict[str, Any]] = Field(default_factory=list, description="routing rules, first match wins; "
                                         "default: everything local")
    retry: RetrySettings = Field(default_factory=RetrySettings, description="retries and circuit breakers")
    sensitivity: SensitivitySettings = Field(default_factory=SensitivitySettings,
                                             description="what makes a request sensitive")
    response_cache: ResponseCacheSettings = Field(default_factory=ResponseCacheSettings,
                                                  description="cache of deterministic responses")
    model_prices: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                      description="USD per 1M tokens by model: input, "
                                                                  "cached_input, output")
    sync: SyncSettings | None = Field(None, description="Kafka sync of usage and audit events")

    def effective_database_url(self) -> str:
        """The store's URL: --database-url, else the SQLite file in --data-dir."""
        from seekserve.store.db import default_database_url

        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return default_database_url(self.data_dir)

    def num_reserved_slots(self) -> int:
        """vip_reserved_share of the batch, at least one slot when asked for, never the whole batch."""
        if self.vip_reserved_share <= 0:
            return 0
        return min(self.batch_size - 1, max(1, round(self.vip_reserved_share * self.batch_size)))

    @field_validator("served_model_name", "api_key", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """Environment variables give one string: 'a,b' means two values."""
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """The config file given to load_settings (--config), else SEEKSERVE_CONFIG, else the default path."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        explicit = _CONFIG_FILE.get() or os.environ.get("SEEKSERVE_CONFIG")
        path = Path(explicit) if explicit else DEFAULT_CONFIG_FILE
        if not path.exists():
            if explicit:
                raise ConfigFileError(f"config file {path} does not exist")
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigFileError(f"config file {path} cannot be read: {e}") from None
        if not isinstance(data, dict):
            raise ConfigFileError(f"config file {path} must hold a mapping of setting: value")
        return {k.replace("-", "_"): v for k, v in data.items()}


def load_settings(flags: dict[str, Any], config_file: str | None = None) -> Settings:
    """Flags given on the command line (None values dropped) over env over the YAML file over defaults."""
    token = _CONFIG_FILE.set(config_file)
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    finally:
        _CONFIG_FILE.reset(token)
