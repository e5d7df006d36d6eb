#!/usr/bin/env python3
"""Offline throughput: seekserve vs transformers `generate`, on the same random-token prompts.

For each batch size N: N prompts of --input-len random token ids, --output-len greedy output tokens
each (ignore_eos; EOS also masked until the last token, as the vLLM anchor and transformers'
min_new_tokens do), output tokens/s = N*M / wall time of one `generate` call, median of --repeat runs
after a warm-up. Then a single request's decode rate (tokens/s after the first token) for both, and
seekserve's effective weight bandwidth at N=1 (weight bytes x decode steps/s). The vLLM CPU anchor
figures are printed for reference: quoted from the issue unless --vllm-results points at the JSONL
that /work/shared/anchors/vllm_cpu_anchor.sh writes.

  python benchmarks/throughput.py --model bench_models/qwen2-150m
  python benchmarks/throughput.py --model bench_models/qwen2-150m --skip-hf --repeat 1
  python benchmarks/throughput.py --model bench_models/qwen2-150m --profile-only   # where time goes
  python benchmarks/throughput.py --model bench_models/qwen2-150m --device cuda

Last line of stdout: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    CpuShare,
    PromptMaker,
    load_note,
    machine_info,
    median,
    safe_token_range,
    set_threads,
    sync,
)

from seekserve.engine import EngineConfig, LLMEngine, SamplingParams

# vLLM's CPU build on this kind of machine (2 cores, AMX bf16), qwen2-150m, 128 prompt x 128 output
# tokens, greedy, ignore_eos: from the issue / vllm_cpu_anchor.sh header. Not measured by this script.
VLLM_QUOTED = {"model": "qwen2-150m", "prompt_len": 128, "new_tokens": 128,
               "output_tok_s": {64: (1000.0, 1150.0), 1: (44.0, 44.0)}}


# -- seekserve -------------------------------------------------------------------------------------
def make_engine(a: argparse.Namespace, max_batch: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=a.model, dtype=a.dtype, device=a.device,
                                  max_num_seqs=max(64, max_batch), max_model_len=a.max_model_len,
                                  max_num_batched_tokens=a.max_num_batched_tokens,
                                  kv_cache_memory_gb=a.kv_cache_gb))


def sampling(a: argparse.Namespace, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, min_tokens=0 if a.no_min_tokens else max_tokens,
                          temperature=0.0, ignore_eos=True)


def seekserve_generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
                       device: str) -> tuple[float, list[list[int]], float]:
    """(wall seconds, output tokens, CPU share)."""
    engine.block_manager.reset_prefix_cache()   # no hits from an earlier run (prompts are fresh anyway)
    sync(device)
    with CpuShare() as cpu:
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        sync(device)
        dt = time.perf_counter() - t
    toks = [o.token_ids for o in outs]
    assert all(len(x) == params.max_tokens for x in toks), [len(x) for x in toks]
    assert all(o.num_cached_tokens == 0 for o in outs), "unexpected prefix-cache hits"
    return dt, toks, cpu.share


def seekserve_single(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> dict:
    """One request through the step API: TTFT, decode rate (tokens after the first / their time)."""
    engine.block_manager.reset_prefix_cache()
    rid = f"single-{time.monotonic_ns()}"
    with CpuShare() as cpu:
        t0 = time.perf_counter()
        engine.add_request(rid, prompt, params)
        stamps: list[tuple[float, int]] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid and out.token_ids:
                    stamps.append((time.perf_counter(), len(out.token_ids)))
    n = sum(k for _, k in stamps)
    assert n == params.max_tokens, n
    first, last = stamps[0][0], stamps[-1][0]
    return dict(ttft_s=first - t0, total_s=last - t0, cpu_share=cpu.share,
                decode_tok_s=(n - stamps[0][1]) / (last - first) if last > first else float("nan"))


# -- transformers ----------------------------------------------------------------------------------
def load_hf(a: argparse.Namespace):
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    return model


class _Stamp:
    """A logits processor that only records when each step's logits are ready."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_generate(model, prompts: list[list[int]], max_new: int, device: str,
                stamp: _Stamp | None = None) -> tuple[float, list[list[int]], float]:
    """(wall seconds, output tokens, CPU share)."""
    from transformers import LogitsProcessorList
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                  attention_mask=torch.ones_like(ids),
                  pad_token_id=model.generation_config.pad_token_id or 0)
    if stamp is not None:
        kwargs["logits_processor"] = LogitsProcessorList([stamp])
    sync(device)
    with CpuShare() as cpu:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        sync(device)
        dt = time.perf_counter() - t
    return dt, out[:, ids.shape[1]:].tolist(), cpu.share


def hf_single(model, prompt: list[int], max_new: int, device: str) -> dict:
    stamp = _Stamp(device)
    t0 = time.perf_counter()
    dt, toks, share = hf_generate(model, [prompt], max_new, device, stamp)
    assert len(toks[0]) == max_new
    first, last = stamp.times[0], stamp.times[-1]
    return dict(ttft_s=first - t0, total_s=dt, cpu_share=share,
                decode_tok_s=(len(stamp.times) - 1) / (last - first) if last > first else float("nan"))


def agreement(a_toks: list[list[int]], b_toks: list[list[int]]) -> tuple[float, float]:
    """(share of sequences identical, mean length of the common prefix / length)."""
    same = sum(x == y for x, y in zip(a_toks, b_toks)) / len(a_toks)
    prefix = []
    for x, y in zip(a_toks, b_toks):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return same, sum(prefix) / len(prefix)


# -- vLLM anchor -----------------------------------------------------------------------------------
def vllm_anchor(a: argparse.Namespace) -> dict:
    """n_prompts -> (low, high) output tok/s, plus where the figures come from."""
    name = Path(a.model).resolve().name
    if a.vllm_results:
        rows = [json.loads(line) for line in Path(a.vllm_results).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("prompt_len") == a.input_len and r.get("new_tokens") == a.output_len]
        same_model = [r for r in rows if r.get("model") == name]
        note = f"measured by vllm_cpu_anchor.sh ({a.vllm_results})"
        if not same_model and rows:
            note += f"; WARNING: no rows for model {name!r}, using {rows[-1].get('model')!r}"
        rows = same_model or rows
        by_n: dict[int, list[float]] = {}
        for r in rows:
            by_n.setdefault(int(r["n_prompts"]), []).append(float(r["output_tok_s"]))
        return dict(source=note, model=rows[-1].get("model") if rows else None, applies=bool(rows),
                    output_tok_s={n: (min(v), max(v)) for n, v in by_n.items()})
    applies = (name == VLLM_QUOTED["model"] and a.input_len == VLLM_QUOTED["prompt_len"]
               and a.output_len == VLLM_QUOTED["new_tokens"] and a.device == "cpu")
    note = "quoted from the issue, not measured in this run"
    if not applies:
        note += f" (for {VLLM_QUOTED['model']} 128x128 on CPU: does NOT match this run's model/shape/device)"
    return dict(source=note, model=VLLM_QUOTED["model"], applies=applies,
                output_tok_s=dict(VLLM_QUOTED["output_tok_s"]))


# -- profile ---------------------------------------------------------------------------------------
PHASES = ("seekserve::schedule", "seekserve::prepare_inputs", "seekserve::model_forward",
          "seekserve::compute_logits", "seekserve::sample")
MODEL_PARTS = ("seekserve::rmsnorm", "seekserve::attention", "seekserve::attention.write_kv",
               "seekserve::attention.paged_attention", "seekserve::mlp")
NESTED = ("seekserve::attention.write_kv", "seekserve::attention.paged_attention")  # inside attention


def _label(obj, attr: str, name: str) -> None:
    """Wrap obj.attr (on the instance / module, the package is not edited) in a profiler range."""
    fn = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    setattr(obj, attr, wrapped)
    return fn


def profile_decode(engine: LLMEngine, a: argparse.Namespace, make_prompts: PromptMaker, n: int,
                   steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    import seekserve.engine.models.llama as llama_mod

    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    engine.block_manager.reset_prefix_cache()
    rids = [f"prof-{i}" for i in range(n)]
    for rid, p in zip(rids, make_prompts(n, a.input_len)):
        engine.add_request(rid, p, params)
    started: set[str] = set()
    while len(started) < n:                       # prefill everything: afterwards every step is N decodes
        started.update(o.request_id for o in engine.step())
    for _ in range(2):
        engine.step()
    sync(a.device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(a.device)
    plain_step_s = (time.perf_counter() - t) / steps

    originals = []
    originals.append((engine.scheduler, "schedule", _label(engine.scheduler, "schedule", PHASES[0])))
    originals.append((engine.runner, "_prepare", _label(engine.runner, "_prepare", PHASES[1])))
    originals.append((engine.runner.model, "forward", _label(engine.runner.model, "forward", PHASES[2])))
    originals.append((engine.runner.model, "compute_logits",
                      _label(engine.runner.model, "compute_logits", PHASES[3])))
    originals.append((engine.sampler, "sample", _label(engine.sampler, "sample", PHASES[4])))
    originals.append((llama_mod, "write_kv", _label(llama_mod, "write_kv", MODEL_PARTS[2])))
    originals.append((llama_mod, "paged_attention", _label(llama_mod, "paged_attention", MODEL_PARTS[3])))
    for layer in engine.runner.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            originals.append((norm, "forward", _label(norm, "forward", MODEL_PARTS[0])))
        originals.append((layer.self_attn, "forward", _label(layer.self_attn, "forward", MODEL_PARTS[1])))
        originals.append((layer.mlp, "forward", _label(layer.mlp, "forward", MODEL_PARTS[4])))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                with record_function("seekserve::step"):
                    engine.step()
            sync(a.device)
    finally:
        for obj, attr, fn in reversed(originals):
            if obj is llama_mod:
                setattr(obj, attr, fn)           # module global: put the function back
            else:
                obj.__dict__.pop(attr, None)     # instance attribute: the class method shows again
        for rid in rids:
            engine.abort(rid)

    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    use_cuda = a.device.startswith("cuda")

    def total_ms(key: str) -> float:
        e = by_name.get(key)
        if e is None:
            return 0.0
        return e.cpu_time_total / 1000.0 / steps

    step_ms = total_ms("seekserve::step")
    print(f"\n== profile: {steps} decode steps at N={n} (every sequence decoding, context ~{a.input_len}) ==")
    print(f"unprofiled decode step: {plain_step_s * 1e3:.1f} ms  ({n / plain_step_s:.0f} tok/s); "
          f"profiled step: {step_ms:.1f} ms")
    print("\nphases of one step (CPU wall time inside each range, per step; nested ranges overlap):")
    rows = [("step (total)", step_ms)]
    phase_sum = 0.0
    for key in PHASES:
        ms = total_ms(key)
        phase_sum += ms
        rows.append(("  " + key.split("::")[1], ms))
    rows.append(("  other (postprocess, detokenize, bookkeeping)", max(step_ms - phase_sum, 0.0)))
    fwd = total_ms(PHASES[2])
    parts_sum = 0.0
    for key in MODEL_PARTS:
        ms = total_ms(key)
        parts_sum += 0.0 if key in NESTED else ms
        label = key.split("::")[1]
        if key == "seekserve::attention":
            label += " (qkv, rope, kv write, attend, o_proj)"
        rows.append((("      " if key in NESTED else "    forward/") + label, ms))
    rows.append(("    forward/other (embed, rotary tables, final norm)", max(fwd - parts_sum, 0.0)))
    for label, ms in rows:
        share = 100 * ms / step_ms if step_ms else 0
        print(f"  {label:<52s} {ms:8.2f} ms  {share:5.1f}%")
    sort_key = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
    print(f"\ntop ops by {sort_key} ({steps} steps):")
    print(events.table(sort_by=sort_key, row_limit=a.profile_rows, max_name_column_width=48))
    print(f"top ops by shape ({sort_key}):")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key, row_limit=12,
                                                             max_name_column_width=40,
                                                             max_shapes_column_width=60))
    top = sorted((e for e in events if not e.key.startswith("seekserve::")),
                 key=lambda e: e.self_device_time_total if use_cuda else e.self_cpu_time_total, reverse=True)
    def self_ms(e) -> float:
        return (e.self_device_time_total if use_cuda else e.self_cpu_time_total) / 1e3 / steps

    return dict(n=n, steps=steps, plain_step_ms=round(plain_step_s * 1e3, 2),
                profiled_step_ms=round(step_ms, 2),
                phases_ms={k.split("::")[1]: round(total_ms(k), 2) for k in PHASES + MODEL_PARTS},
                top_ops=[dict(op=e.key, self_ms_per_step=round(self_ms(e), 3), calls_per_step=e.count / steps)
                         for e in top[:12]])


def rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {str(k): rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


# -- main ------------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=64, help="the headline batch (default %(default)s)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,16,<num-prompts>)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per batch size, median reported")
    ap.add_argument("--skip-hf", action="store_true", help="do not load or time transformers")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    ap.add_argument("--seed", type=int, default=0, help="prompt RNG seed")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="as the vLLM anchor (default %(default)s)")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--no-min-tokens", action="store_true",
                    help="seekserve: ignore_eos only (default also masks EOS until the last token, "
                         "as vLLM's anchor min_tokens and transformers' min_new_tokens do)")
    ap.add_argument("--vllm-results", default=None, help="JSONL from /work/shared/anchors/vllm_cpu_anchor.sh")
    ap.add_argument("--profile", action="store_true", help="also profile decode steps at N=--num-prompts")
    ap.add_argument("--profile-only", action="store_true", help="only the profile (no throughput runs)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING)

    threads = set_threads(a.threads)
    sizes = [int(x) for x in (a.batch_sizes or f"1,16,{a.num_prompts}").split(",")]
    P, M = a.input_len, a.output_len
    t0 = time.perf_counter()
    engine = make_engine(a, max(sizes + [a.num_prompts]))
    load_s = time.perf_counter() - t0
    wbytes = engine.weight_bytes  # bytes loaded (a tied embedding / lm_head counts once)
    lo, hi = safe_token_range(Path(a.model), engine.arch.vocab_size)
    make_prompts = PromptMaker(lo, hi, a.seed)
    info = machine_info(a.device)
    print(f"seekserve throughput: model={a.model} ({wbytes / 1e6:.0f} MB of weights, {a.dtype}) "
          f"device={a.device} threads={threads}/{info['cores']} cores cpu={info['cpu']!r}"
          + (f" gpu={info['gpu']!r}" if "gpu" in info else ""))
    print(f"prompts: {P} random token ids in [{lo}, {hi}) (seed {a.seed}), {M} output tokens, greedy, "
          f"ignore_eos{'' if a.no_min_tokens else ' + min_tokens'}; batch sizes {sizes}, repeat {a.repeat}; "
          f"engine: KV {engine.resolved.num_blocks} blocks x {engine.resolved.block_size}, "
          f"max_num_batched_tokens {a.max_num_batched_tokens}; load {load_s:.1f}s; {load_note()}", flush=True)

    result: dict = dict(model=Path(a.model).resolve().name, dtype=a.dtype, device=a.device, threads=threads,
                        input_len=P, output_len=M, repeat=a.repeat, weight_bytes=wbytes, machine=info)
    if a.profile_only:
        result["profile"] = profile_decode(engine, a, make_prompts, a.num_prompts, a.profile_steps)
        print(json.dumps(rounded(result)))
        return 0

    hf = None
    if not a.skip_hf:
        t = time.perf_counter()
        hf = load_hf(a)
        print(f"transformers: loaded in {time.perf_counter() - t:.1f}s "
              f"(attn_implementation={getattr(hf.config, '_attn_implementation', '?')})", flush=True)

    rows = []
    for n in sizes:
        # warm-up at this batch size (kernels for these shapes), then timed runs on fresh prompts
        engine.generate(make_prompts(n, P), sampling(a, 4))
        if hf is not None:
            hf_generate(hf, make_prompts(n, P), 4, a.device)
        ss_rates, hf_rates, same, prefix, ss_cpu, hf_cpu = [], [], [], [], [], []
        for _ in range(a.repeat):
            prompts = make_prompts(n, P)
            dt, ss_toks, share = seekserve_generate(engine, prompts, sampling(a, M), a.device)
            ss_rates.append(n * M / dt)
            ss_cpu.append(share)
            if hf is not None:
                dt_hf, hf_toks, share = hf_generate(hf, prompts, M, a.device)
                hf_rates.append(n * M / dt_hf)
                hf_cpu.append(share)
                s, p = agreement(ss_toks, hf_toks)
                same.append(s)
                prefix.append(p)
        row = dict(n=n, seekserve_tok_s=median(ss_rates), seekserve_runs=[round(x, 1) for x in ss_rates],
                   hf_tok_s=median(hf_rates) if hf_rates else None,
                   hf_runs=[round(x, 1) for x in hf_rates],
                   ratio_vs_hf=median(ss_rates) / median(hf_rates) if hf_rates else None,
                   # each repeat runs both back to back: the median of paired ratios resists machine drift
                   paired_ratio_median=median([s / h for s, h in zip(ss_rates, hf_rates)]) if hf_rates else None,
                   greedy_same_seqs=median(same) if same else None,
                   greedy_common_prefix=median(prefix) if prefix else None,
                   seekserve_cpu_share=min(ss_cpu), hf_cpu_share=min(hf_cpu) if hf_cpu else None)
        rows.append(row)
        print(f"  N={n:<4d} seekserve {row['seekserve_tok_s']:8.1f} tok/s (cpu {100 * min(ss_cpu):.0f}%)   "
              f"transformers {fmt(row['hf_tok_s'])} tok/s"
              + (f" (cpu {100 * min(hf_cpu):.0f}%)" if hf_cpu else "")
              + f"   ratio {fmt(row['ratio_vs_hf'], '.2f')}", flush=True)

    # single request: TTFT and decode rate through the step API (seekserve) / a timing logits processor (HF)
    ss_single, hf_single_runs = [], []
    for _ in range(a.repeat):
        prompt = make_prompts(1, P)[0]
        ss_single.append(seekserve_single(engine, prompt, sampling(a, M)))
        if hf is not None:
            hf_single_runs.append(hf_single(hf, prompt, M, a.device))

    def med(runs: list[dict], key: str) -> float | None:
        return median([r[key] for r in runs]) if runs else None

    single = dict(seekserve_decode_tok_s=med(ss_single, "decode_tok_s"),
                  seekserve_ttft_ms=med(ss_single, "ttft_s"),
                  seekserve_cpu_share=min(r["cpu_share"] for r in ss_single),
                  hf_cpu_share=min(r["cpu_share"] for r in hf_single_runs) if hf_single_runs else None,
                  hf_decode_tok_s=med(hf_single_runs, "decode_tok_s"),
                  hf_ttft_ms=med(hf_single_runs, "ttft_s"))
    for k in ("seekserve_ttft_ms", "hf_ttft_ms"):
        single[k] = single[k] * 1e3 if single[k] is not None else None
    single["ratio_vs_hf"] = (single["seekserve_decode_tok_s"] / single["hf_decode_tok_s"]
                             if single["hf_decode_tok_s"] else None)
    bw = wbytes * single["seekserve_decode_tok_s"]
    single["seekserve_weight_gb_s"] = bw / 1e9

    anchor = vllm_anchor(a)
    print(f"\n== output tokens/s ({P} in / {M} out per prompt, median of {a.repeat}) ==")
    print(f"{'N':>5} | {'seekserve':>10} | {'transformers':>12} | {'ss/hf':>6} | {'greedy =hf':>10} | "
          f"{'vLLM anchor':>13} | {'ss/vLLM':>11}")
    print("-" * 88)
    for r in rows:
        v = anchor["output_tok_s"].get(r["n"]) if anchor["applies"] else None
        v_txt = "-" if v is None else (f"{v[0]:.0f}" if v[0] == v[1] else f"{v[0]:.0f}-{v[1]:.0f}")
        ratio_txt = "-"
        if v is not None:
            lo_r, hi_r = r["seekserve_tok_s"] / v[1], r["seekserve_tok_s"] / v[0]
            ratio_txt = f"{lo_r:.2f}" if v[0] == v[1] else f"{lo_r:.2f}-{hi_r:.2f}"
            r["ratio_vs_vllm"] = [round(lo_r, 3), round(hi_r, 3)]
        same_txt = "-" if r["greedy_same_seqs"] is None else f"{100 * r['greedy_same_seqs']:.0f}%"
        print(f"{r['n']:>5} | {r['seekserve_tok_s']:>10.1f} | {fmt(r['hf_tok_s']):>12} | "
              f"{fmt(r['ratio_vs_hf'], '.2f'):>6} | {same_txt:>10} | {v_txt:>13} | {ratio_txt:>11}")
    print(f"vLLM anchor: {anchor['source']}")
    print("greedy =hf: share of sequences whose tokens equal transformers' (bf16 random-init models drift; "
          "informational)")
    shares = [x for r in rows for x in (r["seekserve_cpu_share"], r["hf_cpu_share"]) if x is not None]
    shares += [r["cpu_share"] for r in ss_single + hf_single_runs]
    if a.device == "cpu" and shares and min(shares) < 0.8:
        print(f"WARNING: a timed run got only {100 * min(shares):.0f}% of its {threads} threads' CPU time: "
              "other processes shared the cores, and OpenMP runs slow down many-fold then; rerun on a quiet "
              "machine or with --threads 1 before trusting these figures")
    print(f"end: {load_note()}")
    print(f"\n== single request ({P} prompt tokens, {M} output tokens, median of {a.repeat}) ==")
    print(f"  seekserve:    decode {fmt(single['seekserve_decode_tok_s'])} tok/s, "
          f"TTFT {fmt(single['seekserve_ttft_ms'])} ms")
    print(f"  transformers: decode {fmt(single['hf_decode_tok_s'])} tok/s, "
          f"TTFT {fmt(single['hf_ttft_ms'])} ms"
          f"   (ratio {fmt(single['ratio_vs_hf'], '.2f')})")
    print(f"  seekserve effective weight bandwidth at N=1: {wbytes / 1e6:.0f} MB x "
          f"{single['seekserve_decode_tok_s']:.1f} steps/s = {bw / 1e9:.2f} GB/s")

    result.update(batches=rows, single=single,
                  vllm_anchor=dict(source=anchor["source"], model=anchor["model"], applies=anchor["applies"],
                                   output_tok_s={str(k): v for k, v in anchor["output_tok_s"].items()}))
    if a.profile:
        result["profile"] = profile_decode(engine, a, make_prompts, a.num_prompts, a.profile_steps)
    print(json.dumps(rounded(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
