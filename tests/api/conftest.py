"""API test fixtures: tiny random-init checkpoints, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from seekserve.api.app import create_app
from seekserve.backends.local import LocalBackend
from seekserve.config import Settings
from seekserve.engine import EngineConfig, LLMEngine
from tests.factory import make_checkpoint

DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end_of_text|>"
    "{% elif m['role'] == 'tool' %}<|tool|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REASONING_TEMPLATE = DEEPSEEK_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>{% endif %}",
                                               "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
API_KEY = "sk-test-0123456789"


def _with_template(path: Path, template: str) -> Path:
    import json

    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_template(make_checkpoint(tmp_path_factory.mktemp("chat"), "llama", max_position_embeddings=256),
                          DEEPSEEK_TEMPLATE)


@pytest.fixture(scope="session")
def reasoning_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_template(make_checkpoint(tmp_path_factory.mktemp("r1"), "qwen2", max_position_embeddings=256),
                          REASONING_TEMPLATE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_app(model: Path, **settings: Any) -> tuple[Settings, LocalBackend, Any]:
    """The app `seekserve serve` would build for the tiny model (its own store): (settings, backend, app)."""
    settings.setdefault("kv_cache_memory", 0.05)
    settings.setdefault("dtype", "float32")
    settings.setdefault("device", "cpu")
    if "data_dir" not in settings:     # each server its own store, never the user's home folder
        settings["data_dir"] = tempfile.mkdtemp(prefix="seekserve-test-")
    cfg = Settings(model_path=str(model), port=free_port(), **settings)
    engine = LLMEngine(EngineConfig(model_path=cfg.model_path, dtype=cfg.dtype, device=cfg.device,
                                    max_num_seqs=cfg.batch_size, kv_cache_memory_gb=cfg.kv_cache_memory,
                                    max_model_len=cfg.max_sequence_length,
                                    num_reserved_slots=cfg.num_reserved_slots()))
    backend = LocalBackend(engine, cfg.served_model_name or [model.name], cfg.reasoning_parser,
                           cfg.max_queued_requests)
    return cfg, backend, create_app(cfg, backend)


@contextlib.contextmanager
def running_server(model: Path, **settings: Any) -> Iterator[tuple[str, LocalBackend, Any]]:
    """A real server on 127.0.0.1:<free port> in a thread; yields (base_url, backend, app)."""
    cfg, backend, app = make_app(model, **settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{cfg.port}", backend, app
    finally:
        server.should_exit = True
        thread.join(10)
        backend.async_engine.shutdown()


@pytest.fixture(scope="module")
def server(chat_model: Path) -> Iterator[tuple[str, LocalBackend, Any]]:
    with running_server(chat_model, served_model_name=["tiny-chat", "tiny-alias"], api_key=[API_KEY]) as s:
        yield s


@pytest.fixture()
def client(server):
    from openai import OpenAI

    base, _, _ = server
    return OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=30)


CHINESE_SCRIPT = "深度求索是一家人工智能公司。"
REASONING_SCRIPT = "Sum: 37+45.</think>Answer 82"


@pytest.fixture(scope="session")
def chinese_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Greedy output is exactly CHINESE_SCRIPT (multi-byte characters split across tokens), then EOS."""
    from tests.factory import make_scripted_checkpoint

    return make_scripted_checkpoint(tmp_path_factory.mktemp("zh"), CHINESE_SCRIPT, DEEPSEEK_TEMPLATE)


@pytest.fixture(scope="session")
def scripted_reasoning_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An R1-style template (generation prompt opens <think>); greedy output is REASONING_SCRIPT, then EOS."""
    from tests.factory import make_scripted_checkpoint

    return make_scripted_checkpoint(tmp_path_factory.mktemp("r1s"), REASONING_SCRIPT, REASONING_TEMPLATE)


def metric_value(metrics: str, name: str, **labels: str) -> float:
    """The value of one series in a /metrics text; 0.0 when it is absent (a counter never incremented)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0
