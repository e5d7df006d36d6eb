from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seekserve.engine import EngineConfig, LLMEngine
from tests.factory import make_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied embeddings, GQA (4 heads, 2 KV heads), no bias."""
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings, q/k/v bias, GQA."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", rope_theta=1_000_000.0)


def make_engine(path: Path, **kw) -> LLMEngine:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    kw.setdefault("kv_cache_memory_gb", 0.05)
    return LLMEngine(EngineConfig(model_path=str(path), **kw))


@pytest.fixture(scope="session")
def llama_engine(llama_path: Path) -> LLMEngine:
    return make_engine(llama_path)


@pytest.fixture(scope="session")
def qwen2_engine(qwen2_path: Path) -> LLMEngine:
    return make_engine(qwen2_path)
