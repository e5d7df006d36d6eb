"""Rotary position embeddings with the scaling types the Llama and Qwen2 families ship
(default, linear, dynamic NTK, YaRN, llama3). Frequencies follow Hugging Face's formulas so greedy
output matches `transformers`; the cos/sin table is built once for `max_model_len` positions."""

from __future__ import annotations

import math
from typing import Any

import torch

from seekserve.engine.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(base: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # share of the unscaled frequency kept per dimension
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(base: float, dim: int, p: dict[str, Any]) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(base: float, dim: int, scaling: dict[str, Any] | None, max_position_embeddings: int,
                     max_model_len: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq (dim/2,), attention_scaling applied to cos/sin)."""
    p = dict(scaling or {})
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type == "default":
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(base, dim) / p["factor"], 1.0
    if rope_type == "dynamic":
        # Hugging Face rescales per forward once the sequence outgrows the trained length; a paged batch
        # mixes lengths, so (as vLLM does) we fix the scale for the longest sequence we allow. Within the
        # trained length this equals the unscaled frequencies.
        seq_len = max(max_model_len, max_position_embeddings)
        factor = p["factor"]
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "yarn":
        return _yarn(base, dim, p, max_position_embeddings)
    if rope_type == "llama3":
        return _llama3(base, dim, p), 1.0
    raise ModelLoadError(f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(torch.nn.Module):
    """Neox-style (rotate-half) rotary embedding over a precomputed cos/sin table."""

    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None,
                 max_position_embeddings: int, max_model_len: int) -> None:
        super().__init__()
        inv_freq, attention_scaling = compute_inv_freq(base, head_dim, scaling, max_position_embeddings,
                                                       max_model_len)
        positions = torch.arange(max_model_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)   # (L, D)
        self.register_buffer("cos_cache", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * attention_scaling, persistent=False)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, D); cos/sin: (T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
