"""Settings: one object for the whole server. Sources, highest first: command-line flags, environment
variables `SEEKSERVE_*` (nested with `__`), a YAML file (`--config FILE`, else /etc/seekserve/config.yaml
when it exists), then the defaults below."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = Path("/etc/seekserve/config.yaml")
# the file passed to load_settings (--config): scoped to that call, so it never leaks into the process
# environment or into later Settings() built in the same process
_CONFIG_FILE: ContextVar[str | None] = ContextVar("seekserve_config_file", default=None)


class ConfigFileError(ValueError):
    """The YAML config file is unreadable or not a mapping."""


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
