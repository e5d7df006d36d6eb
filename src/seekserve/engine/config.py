"""EngineConfig: what the user asked for (frozen). Values derived at start-up (the resolved dtype,
max_model_len, number of KV blocks) live in `ResolvedConfig`, returned by the engine, never written back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekserve.engine.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    dtype: str = "auto"                     # auto | float32 | bfloat16 | float16
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    max_num_seqs: int = 64                  # --batch-size: sequences per step
    max_model_len: int | None = None        # --max-sequence-length; None = the model's limit
    max_num_batched_tokens: int = 2048      # token budget per step (prefill chunks + decodes)
    block_size: int = 16                    # tokens per KV block
    kv_cache_memory_gb: float | None = None # KV budget; None = derived from free memory
    kv_cache_memory_fraction: float | None = None  # share of free memory without a budget: 0.3 CPU, 0.85 GPU
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1           # --tensor-parallel
    preempt_for_priority: bool = True       # a waiting higher-priority request may preempt a running one
    num_reserved_slots: int = 0             # batch slots kept for priority-0 (vip) requests
    seed: int = 0                           # global sampling seed for requests without their own
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        def check(ok: bool, param: str, why: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        check(self.dtype == "auto" or self.dtype in DTYPES, "dtype",
              f"must be auto or one of {sorted(DTYPES)}")
        check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", "must be a power of two <= 128")
        check(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0, "kv_cache_memory_gb",
              "must be > 0")
        check(self.kv_cache_memory_fraction is None or 0 < self.kv_cache_memory_fraction <= 0.95,
              "kv_cache_memory_fraction", "must be in (0, 0.95]")
        check(0 <= self.num_reserved_slots < self.max_num_seqs, "num_reserved_slots",
              "must be >= 0 and below max_num_seqs")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        if self.tensor_parallel_size > 1:
            raise InvalidRequestError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet: this build runs a "
                "model on one device; use 1, or front a vLLM/SGLang fleet through a remote backend",
                param="tensor_parallel_size")


@dataclass(frozen=True)
class ResolvedConfig:
    device: torch.device
    dtype: torch.dtype
    max_model_len: int          # the effective context limit (prompt + output)
    num_blocks: int             # KV blocks allocated
    block_size: int
    kv_cache_bytes: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device=cuda was asked for but no CUDA device is available", param="device")
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device must be cpu or cuda, got {name!r}", param="device")
    return device


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto` takes the checkpoint's dtype; float16 on CPU becomes bfloat16 (CPU float16 GEMMs are slow
    and lose range), and a float32 checkpoint stays float32."""
    if name != "auto":
        return DTYPES[name]
    dtype = DTYPES.get(checkpoint_dtype or "", torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.bfloat16
    return dtype
