"""Llama-family decoder (LlamaForCausalLM, Qwen2ForCausalLM): RMSNorm, GQA attention with rotary
embeddings and optional q/k/v bias, SwiGLU MLP. q/k/v and gate/up are fused into one GEMM each;
`checkpoint_targets()` maps Hugging Face tensor names onto the fused parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seekserve.engine import kernels
from seekserve.engine.attention import AttentionMetadata, paged_attention, write_kv
from seekserve.engine.models.arch import ModelArchConfig
from seekserve.engine.models.rope import RotaryEmbedding, apply_rotary


@dataclass
class WeightTarget:
    """Where one checkpoint tensor goes: a parameter, or a row range of a fused parameter."""
    param: torch.Tensor
    rows: slice | None = None

    def view(self) -> torch.Tensor:
        return self.param if self.rows is None else self.param[self.rows]


@dataclass
class Rope:
    """One step's rotary inputs: token positions and the model's float32 cos/sin tables."""
    positions: torch.Tensor     # (T,) int64
    cos_cache: torch.Tensor     # (max_model_len, D)
    sin_cache: torch.Tensor

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) each, cast like Hugging Face does before the multiply (PyTorch fallback path)."""
        return self.cos_cache[self.positions].to(dtype), self.sin_cache[self.positions].to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, with `residual`: residual += x, then (norm(residual), residual)."""
        out = kernels.rms_norm(x, self.weight, self.eps, residual)  # fused, in place on residual
        if out is not None:
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 like Hugging Face, then cast back before the weight multiply
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Linear(nn.Module):
    """y = x W^T + b. On CPU in bfloat16, `pack_for_cpu()` swaps W for a oneDNN prepacked copy (AMX/AVX-512
    blocked layout): without it every call reorders the weight, which costs ~1.5x in decode GEMMs."""

    PACK_BATCH_HINT = 2048  # oneDNN picks the blocking for this many rows; measured fine for 1..2048

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(n_out, n_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return nn.functional.linear(x, self.weight, self.bias)

    def pack_for_cpu(self, source: torch.Tensor | None = None, keep_weight: bool = False) -> None:
        weight = source if source is not None else self.weight
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.PACK_BATCH_HINT)
        if not keep_weight:
            self.weight = None  # the packed copy replaces it


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: Rope, kv: tuple[torch.Tensor, ...],
                meta: AttentionMetadata) -> torch.Tensor:
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                                    # (T, (H + 2 KVH) D)
        if kernels.rotary_(qkv, rope.positions, rope.cos_cache, rope.sin_cache, H + KVH, D):
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = q.view(T, H, D), k.view(T, KVH, D)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            cos, sin = rope.cos_sin(x.dtype)
            q = apply_rotary(q.view(T, H, D), cos, sin)                          # (T, H, D)
            k = apply_rotary(k.view(T, KVH, D), cos, sin)                        # (T, KVH, D)
        k_cache, v_cache = kv
        v = v.view(T, KVH, D)
        write_kv(k_cache, v_cache, k, v, meta)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)        # (T, H, D)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = kernels.silu_mul(gate_up)
        if act is None:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = nn.functional.silu(gate) * up
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope, kv: tuple[torch.Tensor, ...],
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual carried separately (fused add + norm)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Also Qwen2ForCausalLM: the same graph with q/k/v bias (set in ModelArchConfig)."""

    def __init__(self, cfg: ModelArchConfig, max_model_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.embed_tokens.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size),
                                                requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings, max_model_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, ...]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> final hidden states (T, hidden)."""
        x = self.embed_tokens(input_ids)
        rope = Rope(positions, self.rotary.cos_cache, self.rotary.sin_cache)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden) -> float32 logits (N, vocab)."""
        return self.lm_head(hidden).float()

    def pack_for_cpu(self) -> None:
        """Prepack every GEMM weight for oneDNN (CPU, bfloat16). The embedding keeps its plain table."""
        for module in self.modules():
            if isinstance(module, Linear) and module is not self.lm_head:
                module.pack_for_cpu()
        tied = self.cfg.tie_word_embeddings
        self.lm_head.pack_for_cpu(self.embed_tokens.weight if tied else None, keep_weight=tied)

    def checkpoint_targets(self) -> dict[str, WeightTarget]:
        """Hugging Face tensor name -> destination. Tied models take no lm_head tensor."""
        cfg, targets = self.cfg, {"model.embed_tokens.weight": WeightTarget(self.embed_tokens.weight),
                                  "model.norm.weight": WeightTarget(self.norm.weight)}
        if not cfg.tie_word_embeddings:
            targets["lm_head.weight"] = WeightTarget(self.lm_head.weight)
        for i, layer in enumerate(self.layers):
            p, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            targets[p + "input_layernorm.weight"] = WeightTarget(layer.input_layernorm.weight)
            targets[p + "post_attention_layernorm.weight"] = WeightTarget(layer.post_attention_layernorm.weight)
            q, kv = attn.q_size, attn.kv_size
            fused = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
            for name, rows in fused.items():
                targets[f"{p}self_attn.{name}.weight"] = WeightTarget(attn.qkv_proj.weight, rows)
                if cfg.qkv_bias:
                    targets[f"{p}self_attn.{name}.bias"] = WeightTarget(attn.qkv_proj.bias, rows)
            targets[p + "self_attn.o_proj.weight"] = WeightTarget(attn.o_proj.weight)
            if cfg.o_bias:
                targets[p + "self_attn.o_proj.bias"] = WeightTarget(attn.o_proj.bias)
            inter = mlp.intermediate_size
            for name, rows in {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter)}.items():
                targets[f"{p}mlp.{name}.weight"] = WeightTarget(mlp.gate_up_proj.weight, rows)
                if cfg.mlp_bias:
                    targets[f"{p}mlp.{name}.bias"] = WeightTarget(mlp.gate_up_proj.bias, rows)
            targets[p + "mlp.down_proj.weight"] = WeightTarget(mlp.down_proj.weight)
            if cfg.mlp_bias:
                targets[p + "mlp.down_proj.bias"] = WeightTarget(mlp.down_proj.bias)
        return targets
