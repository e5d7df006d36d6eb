#!/usr/bin/env python3
"""Build a reference benchmark model reproducibly, with no network: a random-init Hugging Face
checkpoint (safetensors) plus a byte-level BPE tokenizer trained on local text (the Python standard
library's .py/.txt/.rst files, sorted, capped in size).

Shapes:
  qwen2-150m        (default) Qwen2ForCausalLM, 168M params, bfloat16: hidden 1024, 12 layers,
                    16 heads / 4 KV heads, intermediate 2816, vocab 32000, tied embeddings,
                    max_position_embeddings 4096, rope_theta 10000, use_sliding_window false.
                    Same recipe and seed as /work/shared/anchors/make_ref_models.py, so the vLLM
                    anchor and seekserve benchmarks run the same shapes (and, with the same
                    stdlib/torch/transformers, the same weights).
  tiny-llama        LlamaForCausalLM, ~7M params, float32, vocab 8000: for quick smoke runs.
  qwen2-1.5b-shape  DeepSeek-R1-Distill-Qwen-1.5B shape (vocab 151936, 28 layers), bfloat16.

Usage:
  python scripts/make_bench_model.py                      # -> bench_models/qwen2-150m
  python scripts/make_bench_model.py --shape tiny-llama   # -> bench_models/tiny-llama
  python scripts/make_bench_model.py --out DIR [--force]
bench_models/ is git-ignored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

SEED = 1234
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# ids 0..5. <|endoftext|> keeps transformers' Qwen2Tokenizer (picked by AutoTokenizer for model_type
# qwen2) from appending its default unk token past the vocabulary.
SPECIALS = [BOS, EOS, PAD, IM_START, IM_END, EOT]
NUM_SPECIAL = len(SPECIALS)
# Qwen2's pre-tokenizer split, so raw tokenizer.json, transformers and vLLM tokenize alike.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                     r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CORPUS_MAX_MIB = 40.0

SHAPES: dict[str, dict] = {
    "qwen2-150m": dict(
        arch="qwen2", dtype=torch.bfloat16, vocab_size=32000,
        config=dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=2816, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False)),
    "tiny-llama": dict(
        arch="llama", dtype=torch.float32, vocab_size=8000,
        config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=688, max_position_embeddings=4096, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False)),
    "qwen2-1.5b-shape": dict(
        arch="qwen2", dtype=torch.bfloat16, vocab_size=151936,
        config=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    intermediate_size=8960, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False,
                    sliding_window=4096, max_window_layers=21)),
}


def corpus_files(max_bytes: int) -> tuple[list[Path], int]:
    """Deterministic list of local text files: the stdlib's .py/.txt/.rst files, sorted, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: set[Path] = set()
    for pattern in ("*.py", "*.txt", "*.rst"):
        files.update(p for p in root.rglob(pattern) if "site-packages" not in p.parts and p.is_file())
    out, total = [], 0
    for p in sorted(files):
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if total + size > max_bytes:
            break
        out.append(p)
        total += size
    return out, total


def iter_texts(paths: list[Path]):
    for p in paths:
        try:
            yield p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            pass


def train_tokenizer(vocab_size: int, paths: list[Path]):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_texts(paths), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[IM_START, IM_END, EOT], model_max_length=4096,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(shape: str, tok):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = SHAPES[shape]
    bos, eos, pad, im_end = tok.convert_tokens_to_ids([BOS, EOS, PAD, IM_END])
    kwargs = dict(spec["config"], vocab_size=spec["vocab_size"], bos_token_id=bos, eos_token_id=eos,
                  pad_token_id=pad)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if spec["arch"] == "qwen2" else (LlamaConfig,
                                                                                          LlamaForCausalLM)
    cfg = cfg_cls(**kwargs)
    dtype = spec["dtype"]
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[eos, im_end], pad_token_id=pad,
                                               do_sample=False)
    return model, cfg


def check_tokenizer(out: Path, vocab_size: int) -> None:
    """The raw tokenizer.json (what seekserve reads) and AutoTokenizer must agree and round-trip."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out)
    sample = "def hello(x):\n    return 42 + x  # it's 12345 bytes\n\tdone, ok? 你好"
    r_ids, a_ids = raw.encode(sample).ids, auto(sample, add_special_tokens=False).input_ids
    assert r_ids == a_ids, (type(auto).__name__, r_ids, a_ids)
    assert len(auto) <= vocab_size, (len(auto), vocab_size)
    assert auto.decode(a_ids) == sample, auto.decode(a_ids)
    assert [raw.token_to_id(s) for s in SPECIALS] == list(range(NUM_SPECIAL))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-150m")
    ap.add_argument("--out", default=None, help="output folder (default bench_models/<shape>)")
    ap.add_argument("--corpus-max-mib", type=float, default=DEFAULT_CORPUS_MAX_MIB,
                    help="cap on the tokenizer training text (default %(default)s, as the vLLM anchor)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder already has a model")
    a = ap.parse_args(argv)

    out = Path(a.out or f"bench_models/{a.shape}")
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and not a.force:
        print(f"{out}: already built (use --force to rebuild)")
        return 0
    spec = SHAPES[a.shape]
    t0 = time.perf_counter()
    paths, nbytes = corpus_files(int(a.corpus_max_mib * 2**20))
    digest = hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()[:12]
    print(f"corpus: {len(paths)} stdlib files, {nbytes / 1e6:.1f} MB (list sha256 {digest})", flush=True)
    tok = train_tokenizer(spec["vocab_size"], paths)
    print(f"tokenizer: vocab {len(tok)} (target {spec['vocab_size']}), trained in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    t1 = time.perf_counter()
    model, _ = build_model(a.shape, tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    check_tokenizer(out, spec["vocab_size"])
    nparams = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = dict(shape=a.shape, path=str(out), params=nparams, weight_bytes=weight_bytes, disk_bytes=size,
                   dtype=str(spec["dtype"]).removeprefix("torch."), seed=SEED, corpus_files=len(paths),
                   corpus_bytes=nbytes, corpus_list_sha256=digest, torch=torch.__version__,
                   python=sys.version.split()[0])
    (out / "bench_model_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{a.shape}: {nparams / 1e6:.1f}M params ({weight_bytes / 1e6:.0f} MB of weights), "
          f"{size / 1e6:.1f} MB on disk, model built in {time.perf_counter() - t1:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
