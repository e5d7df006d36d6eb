#!/usr/bin/env python3
"""Correctness of seekserve against transformers on one device (CUDA by default; --device cpu works too).

For each model:
  float32  seekserve greedy tokens == transformers greedy tokens (generate, do_sample=False) for a handful
           of random-token prompts. A divergence where seekserve's top-2 logprobs are within --tie-tol of
           each other (a near-tie that either order of float additions may break) is reported, not failed.
  bfloat16 closeness: seekserve's bf16 logprobs (chosen token + top-k, teacher-forced on its own output)
           against a float32 transformers reference, next to transformers' own bf16 error on the same
           tokens. Passes when seekserve's max error <= --bf16-factor x transformers' + --bf16-slack.

  python benchmarks/gpu_check.py --models bench_models/tiny-llama,bench_models/qwen2-150m [--device cuda]

Exit status 0 when every check passes. Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PromptMaker, machine_info, safe_token_range, set_threads

from seekserve.engine import EngineConfig, LLMEngine, SamplingParams

TOPK = 5


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_seekserve(model: str, dtype: str, device: str, prompts: list[list[int]], new: int):
    engine = LLMEngine(EngineConfig(model_path=model, dtype=dtype, device=device, max_num_seqs=64,
                                    max_model_len=1024, kv_cache_memory_gb=0.5))
    outs = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True,
                                                   logprobs=TOPK))
    toks = [o.token_ids for o in outs]
    lps = [o.logprobs for o in outs]
    vocab = engine.arch.vocab_size
    del engine
    free_memory()
    return toks, lps, vocab


def load_hf(model: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()


@torch.inference_mode()
def hf_greedy(hf, prompts: list[list[int]], new: int, device: str) -> list[list[int]]:
    ids = torch.tensor(prompts, device=device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=hf.generation_config.pad_token_id or 0)
    return out[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def hf_teacher_forced(hf, prompts: list[list[int]], outputs: list[list[int]],
                      device: str) -> list[torch.Tensor]:
    """Per prompt: float32 log-softmax (new, vocab) of the distributions that produced `outputs`."""
    res = []
    for p, o in zip(prompts, outputs):
        ids = torch.tensor([p + o[:-1]], device=device)
        logits = hf(input_ids=ids).logits[0, len(p) - 1:].float()
        res.append(torch.log_softmax(logits, dim=-1).cpu())
    return res


def check_fp32(model: str, device: str, prompts, new: int, tie_tol: float) -> dict:
    ss_toks, ss_lps, _ = run_seekserve(model, "float32", device, prompts, new)
    hf = load_hf(model, torch.float32, device)
    hf_toks = hf_greedy(hf, prompts, new, device)
    del hf
    free_memory()
    rows, ok = [], True
    for i, (a, b) in enumerate(zip(ss_toks, hf_toks)):
        if a == b:
            rows.append(dict(prompt=i, equal=True))
            continue
        k = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        top = ss_lps[i][k].top
        margin = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
        tie = margin <= tie_tol
        ok &= tie
        rows.append(dict(prompt=i, equal=False, first_diff=k, top2_margin=margin, near_tie=tie))
    return dict(ok=ok, prompts=rows)


def check_bf16(model: str, device: str, prompts, new: int, factor: float, slack: float) -> dict:
    ss_toks, ss_lps, _ = run_seekserve(model, "bfloat16", device, prompts, new)
    ref = load_hf(model, torch.float32, device)
    ref_lp = hf_teacher_forced(ref, prompts, ss_toks, device)
    del ref
    free_memory()
    hf16 = load_hf(model, torch.bfloat16, device)
    hf16_lp = hf_teacher_forced(hf16, prompts, ss_toks, device)
    hf16_greedy = hf_greedy(hf16, prompts, new, device)
    del hf16
    free_memory()
    ss_err, hf_err, ss_top_err, top1_same, n = 0.0, 0.0, 0.0, 0, 0
    for i, toks in enumerate(ss_toks):
        for j, t in enumerate(toks):
            r = ref_lp[i][j]
            ss_err = max(ss_err, abs(ss_lps[i][j].logprob - float(r[t])))
            hf_err = max(hf_err, abs(float(hf16_lp[i][j][t]) - float(r[t])))
            ref_top = r.topk(TOPK).values.tolist()
            ss_top = [v for _, v in ss_lps[i][j].top]
            ss_top_err = max(ss_top_err, max(abs(x - y) for x, y in zip(ss_top, ref_top)))
            top1_same += int(t == int(r.argmax()))
            n += 1
    ok = ss_err <= factor * hf_err + slack and ss_top_err <= factor * max(hf_err, 1e-6) + slack
    same = sum(a == b for a, b in zip(ss_toks, hf16_greedy))
    return dict(ok=ok, max_abs_logprob_err_seekserve=ss_err, max_abs_logprob_err_transformers_bf16=hf_err,
                max_abs_topk_logprob_err_seekserve=ss_top_err, greedy_matches_fp32_argmax=top1_same / n,
                seqs_equal_to_transformers_bf16_greedy=f"{same}/{len(ss_toks)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bench_models/tiny-llama,bench_models/qwen2-150m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--tie-tol", type=float, default=1e-4)
    ap.add_argument("--bf16-factor", type=float, default=2.0)
    ap.add_argument("--bf16-slack", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("CUDA is not available", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False   # a float32 check must be float32
        torch.backends.cudnn.allow_tf32 = False
    set_threads(a.threads)
    print(f"gpu_check: device={a.device} {machine_info(a.device)}", flush=True)
    results, all_ok = {}, True
    for model in a.models.split(","):
        from seekserve.engine.models.arch import parse_arch_config
        from seekserve.engine.models.registry import SUPPORTED_ARCHITECTURES
        arch = parse_arch_config(Path(model) / "config.json", SUPPORTED_ARCHITECTURES)
        lo, hi = safe_token_range(Path(model), arch.vocab_size)
        prompts = PromptMaker(lo, hi, seed=7)(a.num_prompts, a.input_len)
        fp32 = check_fp32(model, a.device, prompts, a.output_len, a.tie_tol)
        bf16 = check_bf16(model, a.device, prompts, a.output_len, a.bf16_factor, a.bf16_slack)
        name = Path(model).name
        results[name] = dict(float32=fp32, bfloat16=bf16)
        all_ok &= fp32["ok"] and bf16["ok"]
        eq = sum(r["equal"] for r in fp32["prompts"])
        ties = [r for r in fp32["prompts"] if not r["equal"]]
        print(f"{name}: float32 greedy {eq}/{len(prompts)} equal to transformers"
              + (f" (divergences: {ties})" if ties else "") + f" -> {'OK' if fp32['ok'] else 'FAIL'}")
        print(f"{name}: bfloat16 max |logprob err| vs fp32 reference: seekserve "
              f"{bf16['max_abs_logprob_err_seekserve']:.4f} "
              f"(top-{TOPK} {bf16['max_abs_topk_logprob_err_seekserve']:.4f}),"
              f" transformers bf16 {bf16['max_abs_logprob_err_transformers_bf16']:.4f}; greedy = fp32 argmax "
              f"{100 * bf16['greedy_matches_fp32_argmax']:.0f}%, seqs = transformers bf16 greedy "
              f"{bf16['seqs_equal_to_transformers_bf16_greedy']} -> {'OK' if bf16['ok'] else 'FAIL'}",
              flush=True)
    print("ALL OK" if all_ok else "SOME CHECKS FAILED")
    print(json.dumps(dict(ok=all_ok, device=a.device, results=results)))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
