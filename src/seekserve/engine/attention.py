"""Paged attention over a flat token batch, in plain PyTorch (SDPA) plus a native CPU decode kernel.

A layer's cache: keys (num_blocks, KVH, D, block_size), stored transposed per block so the native kernel's
scores vectorize over tokens; values (num_blocks, KVH, block_size, D).
A step's tokens are laid out decodes first (one token each), then prefill chunks sequence by sequence.
Decodes read the cache in place (native kernel on CPU; gathered SDPA elsewhere). Prefill chunks are
attended in one padded SDPA call: queries gathered to (B, Qmax), each sequence's blocks gathered to
(B, KVH, Kmax, D). Keeping decodes apart stops one long prefill chunk from padding every decode row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekserve.engine.kernels import paged_decode_attention


@dataclass
class AttnGroup:
    num_tokens: int                 # real query tokens in this group (flat, contiguous in the batch)
    query_index: torch.Tensor | None  # (B, Qmax) flat token index per padded query; pads point at token 0
                                    # (None: a row-wise group for the native kernel, one query per row)
    query_valid: torch.Tensor | None  # (B, Qmax) bool, None when every query is real (decodes)
    mask: torch.Tensor | None       # (B, 1, Qmax, max_blocks * block_size) bool, True = may attend
    block_tables: torch.Tensor      # (B, max_blocks) block ids per sequence (pads: block 0, masked)
    kv_lens: torch.Tensor           # (B,) keys per sequence, the new ones included
    is_fresh: bool = False          # no sequence has earlier keys: attend to the new k/v, no cache gather
    is_uniform: bool = False        # ... and all have the same length: plain causal attention, no mask


@dataclass
class AttentionMetadata:
    write_blocks: torch.Tensor      # (T,) block of each new token's key/value
    write_offsets: torch.Tensor     # (T,) offset inside that block
    decode: AttnGroup | None        # tokens [0, decode.num_tokens), one query per row: decodes (and, with the
                                    # native kernel, the tokens of small prefill chunks)
    prefill: AttnGroup | None       # the remaining tokens: padded prefill chunks
    block_size: int


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """k_cache: (num_blocks, KVH, D, bs); v_cache: (num_blocks, KVH, bs, D); k, v: (T, KVH, D)."""
    k_cache[meta.write_blocks, :, :, meta.write_offsets] = k
    v_cache[meta.write_blocks, :, meta.write_offsets] = v


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Cache blocks of the sequences' tables -> (B, KVH, max_blocks * bs, D)."""
    blocks = cache[block_tables]                                  # (B, nb, KVH, bs, D) or (B, nb, KVH, D, bs)
    if transposed:
        blocks = blocks.transpose(-1, -2)
    B, nb, kvh, bs, d = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(B, kvh, nb * bs, d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            group: AttnGroup, scale: float) -> torch.Tensor:
    """q: (T_all, H, D), k/v: (T_all, KVH, D) this step's -> (group.num_tokens, H, D)."""
    q_pad = q[group.query_index].transpose(1, 2)                  # (B, H, Qmax, D)
    if group.is_fresh:   # prompts from their first token: their keys are all in this step's k/v
        k_pad = k[group.query_index].transpose(1, 2)              # (B, KVH, Qmax, D)
        v_pad = v[group.query_index].transpose(1, 2)
        mask = None if group.is_uniform else group.mask[..., :q_pad.shape[2]]
    else:
        k_pad = _gather(k_cache, group.block_tables, transposed=True)  # (B, KVH, Kmax, D)
        v_pad = _gather(v_cache, group.block_tables, transposed=False)
        mask = group.mask
    out = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=mask, scale=scale,
                                         is_causal=group.is_fresh and group.is_uniform,
                                         enable_gqa=q_pad.shape[1] != k_pad.shape[1])
    out = out.transpose(1, 2)                                     # (B, Qmax, H, D)
    if group.query_valid is None:
        return out.reshape(-1, out.shape[-2], out.shape[-1])
    return out[group.query_valid]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (T, H, D) and this step's k, v: (T, KVH, D), already written to the cache -> (T, H, D)."""
    parts = []
    if meta.decode is not None:
        g = meta.decode
        out = paged_decode_attention(q[:g.num_tokens], k_cache, v_cache, g.block_tables, g.kv_lens, scale,
                                     meta.block_size)
        parts.append(out if out is not None else _attend(q, k, v, k_cache, v_cache, g, scale))
    if meta.prefill is not None:
        parts.append(_attend(q, k, v, k_cache, v_cache, meta.prefill, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
