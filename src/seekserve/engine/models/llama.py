"""Llama-family decoder (LlamaForCausalLM, Qwen2ForCausalLM): RMSNorm, GQA attention with rotary
embeddings and optional q/k/v bias, SwiGLU MLP. q/k/v and gate/up are fused into one GEMM each;
`checkpoint_targets()` maps Hugging Face tensor names onto the fused parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 like Hugging Face, then cast back before the weight multiply
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias, device="meta")
    layer.weight = nn.Parameter(torch.empty(n_out, n_in), requires_grad=False)
    if bias:
        layer.bias = nn.Parameter(torch.empty(n_out), requires_grad=False)
    return layer


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = _linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = _linear(self.q_size, cfg.hidden_size, cfg.o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: tuple[torch.Tensor, ...],
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(T, self.num_heads, self.head_dim), cos, sin)      # (T, H, D)
        k = apply_rotary(k.view(T, self.num_kv_heads, self.head_dim), cos, sin)   # (T, KVH, D)
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v.view(T, self.num_kv_heads, self.head_dim), meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)              # (T, H, D)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = _linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: tuple[torch.Tensor, ...],
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.lm_head_weight = (self.embed_tokens.weight if cfg.tie_word_embeddings
                               else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size),
                                                 requires_grad=False))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings, max_model_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, ...]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> final hidden states (T, hidden)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden) -> float32 logits (N, vocab)."""
        return torch.matmul(hidden, self.lm_head_weight.t()).float()

    def checkpoint_targets(self) -> dict[str, WeightTarget]:
        """Hugging Face tensor name -> destination. Tied models take no lm_head tensor."""
        cfg, targets = self.cfg, {"model.embed_tokens.weight": WeightTarget(self.embed_tokens.weight),
                                  "model.norm.weight": WeightTarget(self.norm.weight)}
        if not cfg.tie_word_embeddings:
            targets["lm_head.weight"] = WeightTarget(self.lm_head_weight)
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
