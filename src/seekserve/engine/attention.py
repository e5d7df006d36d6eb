"""Paged attention over a flat token batch, in plain PyTorch (SDPA).

A step's tokens are laid out decodes first (one token each), then prefill chunks sequence by sequence.
Each group is attended in one padded SDPA call: queries gathered to (B, Qmax), keys/values gathered from
the paged cache by slot id to (B, Kmax). Keeping decodes apart stops one long prefill chunk from padding
every decode row to its length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnGroup:
    num_tokens: int                 # real query tokens in this group (flat, contiguous in the batch)
    query_index: torch.Tensor       # (B, Qmax) flat token index per padded query; pads point at token 0
    query_valid: torch.Tensor | None  # (B, Qmax) bool, None when every query is real (decodes)
    kv_slots: torch.Tensor          # (B, Kmax) slot ids of each sequence's keys; pads point at slot 0
    mask: torch.Tensor | None       # (B, 1, Qmax, Kmax) bool, True = may attend; None = attend to all


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # (T,) cache slot written by each new token
    decode: AttnGroup | None        # tokens [0, decode.num_tokens)
    prefill: AttnGroup | None       # the remaining tokens


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache: (num_slots, KVH, D); k: (T, KVH, D)."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttnGroup,
            scale: float) -> torch.Tensor:
    """q: (T_all, H, D) -> (group.num_tokens, H, D)."""
    q_pad = q[group.query_index].transpose(1, 2)          # (B, H, Qmax, D)
    k_pad = k_cache[group.kv_slots].transpose(1, 2)       # (B, KVH, Kmax, D)
    v_pad = v_cache[group.kv_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=group.mask, scale=scale,
                                         enable_gqa=q_pad.shape[1] != k_pad.shape[1])
    out = out.transpose(1, 2)                             # (B, Qmax, H, D)
    if group.query_valid is None:
        return out.reshape(-1, out.shape[-2], out.shape[-1])
    return out[group.query_valid]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (T, H, D), new keys already written to the cache -> (T, H, D)."""
    parts = [_attend(q, k_cache, v_cache, g, scale) for g in (meta.decode, meta.prefill) if g is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
