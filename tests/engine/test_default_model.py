"""The shipped demo model (src/seekserve/engine/default_model, built by scripts/train_default_model.py)
answers held-out arithmetic questions through seekserve's engine, stops with EOS, and stays small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import seekserve.engine
from seekserve.engine import EngineConfig, LLMEngine, SamplingParams

MODEL_DIR = Path(seekserve.engine.__file__).resolve().parent / "default_model"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "README.md", "heldout.json")
MAX_BYTES = 25 * 2**20

@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=str(MODEL_DIR), dtype="float32", device="cpu",
                                  kv_cache_memory_gb=0.2))


def test_folder_is_complete_and_small() -> None:
    for name in REQUIRED_FILES:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"default model is {total / 2**20:.1f} MiB (limit 25 MiB)"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    tok_config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert tok_config["eos_token"] == "<｜end▁of▁sentence｜>"
    assert "<｜Assistant｜>" in tok_config["chat_template"]


def test_chat_template_and_digit_tokens(engine: LLMEngine) -> None:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 37 + 45?"},
                                    {"role": "assistant", "content": "82"},
                                    {"role": "user", "content": "Thanks"}])
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 37 + 45?<｜Assistant｜>82"
                    "<｜end▁of▁sentence｜><｜User｜>Thanks<｜Assistant｜>")
    ids = tok.encode("What is 37 + 45?", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert {"3", "7", "4", "5"} <= set(pieces)  # one token per digit
    assert engine.eos_token_ids >= {tok.eos_token_id}


def test_heldout_arithmetic(engine: LLMEngine) -> None:
    heldout = json.loads((MODEL_DIR / "heldout.json").read_text())
    assert len(heldout) == 200
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": h["question"]}]),
                          add_special_tokens=False) for h in heldout]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    wrong = [(h["question"], h["answer"], o.text, o.finish_reason) for h, o in zip(heldout, outs)
             if not (o.text.strip() == h["answer"] and o.finish_reason == "stop")]
    accuracy = 1 - len(wrong) / len(heldout)
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.1%}; first misses: {wrong[:5]}"
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= 0.95 * len(outs)
    assert all(o.token_ids[-1] == tok.eos_token_id for o in stopped)  # answers end with EOS


def test_greeting(engine: LLMEngine) -> None:
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello"}]), add_special_tokens=False)
    [out] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=48))
    assert out.finish_reason == "stop"
    assert "seekserve" in out.text
