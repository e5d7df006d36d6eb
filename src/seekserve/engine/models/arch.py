"""ModelArchConfig: the fields of a Hugging Face config.json that the engine's models use, parsed
and checked once, with errors that name the file and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seekserve.engine.errors import ModelLoadError


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers < 5 writes rope_theta + rope_scaling; >= 5 writes rope_parameters."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or params or None
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rope_type
        if rope_type in ("llama3", "yarn"):
            scaling.setdefault("original_max_position_embeddings",
                               raw.get("original_max_position_embeddings", raw.get("max_position_embeddings")))
        if rope_type == "default":
            scaling = None
    return theta, scaling


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def parse_arch_config(path: Path, supported: tuple[str, ...]) -> ModelArchConfig:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: a model folder needs a Hugging Face config.json") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in supported), None)
    if arch is None:
        raise ModelLoadError(f"{path}: architecture {archs or '(none given)'} is not supported; "
                             f"supported architectures: {', '.join(supported)}")
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        is_qwen2 = arch == "Qwen2ForCausalLM"
        if raw.get("use_sliding_window") and raw.get("sliding_window"):
            raise ModelLoadError(f"{path}: use_sliding_window=true is not supported (set it to false; "
                                 "DeepSeek-R1-Distill-Qwen ships it false)")
        theta, scaling = _rope(raw)
        return ModelArchConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else bool(raw.get("attention_bias", False)),
            o_bias=False if is_qwen2 else bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: a field has the wrong type: {e}") from None
