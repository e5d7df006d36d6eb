"""Loading Hugging Face folders: both architectures, sharded weights, rope scaling types, dtypes,
legacy config keys, chat templates, streaming memory use, and clear start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from seekserve.engine import ModelLoadError, SamplingParams
from tests.engine.conftest import make_engine
from tests.factory import make_checkpoint

PROMPT = [0] + list(range(20, 60))


def hf_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_same_logprobs(path: Path, engine_kwargs: dict | None = None, atol: float = 1e-4) -> None:
    """Six greedy steps: the engine's logprobs of every top-5 token equal transformers' within atol."""
    engine = make_engine(path, **(engine_kwargs or {}))
    out = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True))[0]
    ref = hf_logprobs(path, PROMPT + out.token_ids)
    for step, lp in enumerate(out.logprobs):
        row = ref[len(PROMPT) - 1 + step]
        for token, value in lp.top:
            assert abs(value - row[token].item()) < atol, (step, token, value, row[token].item())
        assert lp.token_id == int(row.argmax())


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 128},
])
def test_rope_scaling_types_match_transformers(tmp_path: Path, rope: dict) -> None:
    path = make_checkpoint(tmp_path / "m", "llama", rope_scaling=rope, rope_theta=500000.0)
    assert_same_logprobs(path)


def test_sharded_untied_llama_with_bias_and_legacy_config(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "llama", max_shard_size="40KB", attention_bias=True, mlp_bias=True,
                           tie_word_embeddings=False, chat_template_file=True)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 3
    assert_same_logprobs(path)
    # transformers < 5 writes rope_theta / rope_scaling / torch_dtype at the top level
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"], cfg["torch_dtype"] = rope["rope_theta"], None, cfg.pop("dtype")
    (path / "config.json").write_text(json.dumps(cfg))
    engine = make_engine(path, dtype="auto")
    assert engine.resolved.dtype == torch.float32
    assert engine.arch.rope_theta == rope["rope_theta"]
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|begin_of_text|><|user|>hi<|assistant|>"


def test_qwen2_tied_with_bias_matches(qwen2_path: Path) -> None:
    assert_same_logprobs(qwen2_path)


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 0.15), ("float16", 0.05)])
def test_half_precision_dtypes(qwen2_path: Path, dtype: str, atol: float) -> None:
    engine = make_engine(qwen2_path, dtype=dtype)
    assert engine.resolved.dtype == getattr(torch, dtype)
    assert engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))[0]
    ref = hf_logprobs(qwen2_path, PROMPT)[-1]
    for token, value in out.logprobs[0].top:
        assert abs(value - ref[token].item()) < atol


def test_bf16_checkpoint_auto_dtype(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "qwen2", dtype=torch.bfloat16)
    engine = make_engine(path, dtype="auto")
    assert engine.resolved.dtype == torch.bfloat16
    engine32 = make_engine(path, dtype="float32")   # upcast on load, streamed in chunks
    out = engine32.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def _break(path: Path, what: str) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if what == "arch":
        cfg["architectures"] = ["MambaForCausalLM"]
    elif what == "shape":
        cfg["intermediate_size"] = 100
    elif what == "field":
        del cfg["hidden_size"]
    cfg_path.write_text(json.dumps(cfg))
    if what == "tokenizer":
        (path / "tokenizer.json").unlink()
    elif what == "weights":
        (path / "model.safetensors").unlink()
    elif what == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "config":
        cfg_path.unlink()


@pytest.mark.parametrize("what,message", [
    ("arch", r"MambaForCausalLM.*supported architectures: LlamaForCausalLM, Qwen2ForCausalLM"),
    ("shape", r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"),
    ("field", r"config\.json: required field 'hidden_size' is missing"),
    ("tokenizer", r"tokenizer\.json is missing"),
    ("weights", r"no \*\.safetensors weights in"),
    ("truncated", r"model\.safetensors is truncated: tensor '"),
    ("config", r"config\.json is missing"),
])
def test_load_errors_name_the_file_and_tensor(tmp_path: Path, what: str, message: str) -> None:
    path = make_checkpoint(tmp_path / "m", "llama")
    _break(path, what)
    with pytest.raises(ModelLoadError, match=message):
        make_engine(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama", tie_word_embeddings=False)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.weight"):
        make_engine(path)


def test_missing_model_folder() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        make_engine(Path("/nonexistent/model"))


def test_streaming_load_peak_rss(tmp_path: Path) -> None:
    """Peak RSS growth while loading stays within 1.3x the weights' size (measured in a fresh process)."""
    path = make_checkpoint(tmp_path / "big", "llama", vocab_size=8000, hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from seekserve.engine.loader import load_weights
        from seekserve.engine.models.arch import parse_arch_config
        from seekserve.engine.models.registry import SUPPORTED_ARCHITECTURES, build_model
        def status(key):  # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak
            with open('/proc/self/status') as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
        path = Path({str(path)!r})
        arch = parse_arch_config(path / 'config.json', SUPPORTED_ARCHITECTURES)
        model = build_model(arch, 512)   # parameters allocated, not yet touched (not resident)
        torch.zeros(8) @ torch.zeros(8)  # fault in torch's own lazily loaded code first
        before = status('VmRSS')
        load_weights(path, model.checkpoint_targets())
        print(before, status('VmHWM'))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, peak = map(int, res.stdout.split())
    assert weights > 50e6
    assert peak - before <= 1.3 * weights, (peak - before) / weights
