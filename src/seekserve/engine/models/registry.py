"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

from torch import nn

from seekserve.engine.models.arch import ModelArchConfig
from seekserve.engine.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_CLASSES)


def build_model(cfg: ModelArchConfig, max_model_len: int) -> LlamaForCausalLM:
    """Parameters are created uninitialized on the current default device/dtype; the loader fills them."""
    return MODEL_CLASSES[cfg.architecture](cfg, max_model_len)  # type: ignore[return-value]
