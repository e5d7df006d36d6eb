#!/usr/bin/env python3
"""Sensitivity classifier: accuracy on the labelled corpus and latency per 4 KB prompt.

Accuracy (item level): an item is predicted sensitive when the default policy classifies it
confidential, and labelled sensitive when it holds PII. Targets: recall >= 0.99, precision >= 0.95.
Per-kind recall counts an item as caught for kind K when a finding of kind K was made.
Latency: prompts of --prompt-bytes UTF-8 bytes (default 4096) built by concatenating shuffled corpus
items; median and p99 of --runs classify() calls (target: median <= 1 ms).

  python benchmarks/sensitivity.py [--runs 2000] [--show-text]

Exit status 1 when recall or precision misses its target. Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from seekserve.gateway.sensitivity import SensitivityClassifier

ROOT = Path(__file__).resolve().parent.parent
TARGET_RECALL, TARGET_PRECISION, TARGET_MEDIAN_MS = 0.99, 0.95, 1.0


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy(clf: SensitivityClassifier, items: list[dict], show_text: bool) -> dict:
    tp = fp = fn = 0
    labelled, caught = Counter(), Counter()
    for i, item in enumerate(items):
        result = clf.classify([item["text"]], tenant="benchmark")
        found = sorted({f.kind for f in result.findings})
        for kind in item["kinds"]:
            labelled[kind] += 1
            caught[kind] += kind in found
        if result.sensitive == item["pii"]:
            tp += item["pii"]
            continue
        fp, fn = fp + result.sensitive, fn + item["pii"]
        what = "false positive" if result.sensitive else "false negative"
        print(f"  #{i:<4} {what}: labelled {item['kinds']}, found {found}"
              + (f"  {item['text']!r}" if show_text else ""))
    recall = tp / (tp + fn) if tp + fn else 1.0
    precision = tp / (tp + fp) if tp + fp else 1.0
    per_kind = {k: round(caught[k] / labelled[k], 4) for k in sorted(labelled)}
    return {"items": len(items), "positives": tp + fn, "tp": tp, "fp": fp, "fn": fn, "recall": recall,
            "precision": precision, "per_kind_recall": per_kind,
            "per_kind_items": dict(sorted(labelled.items()))}


def make_prompts(items: list[dict], size: int, count: int, seed: int) -> list[str]:
    """`count` prompts of exactly `size` UTF-8 bytes (cut at a character boundary), each a shuffled run
    of corpus items joined by newlines, as a long chat history would be."""
    rng, prompts = random.Random(seed), []
    for _ in range(count):
        parts, used = [], 0
        while used < size:
            text = rng.choice(items)["text"]
            parts.append(text)
            used += len(text.encode()) + 1
        prompts.append("\n".join(parts).encode()[:size].decode(errors="ignore"))
    return prompts


def latency(clf: SensitivityClassifier, prompts: list[str], runs: int) -> dict:
    """Median/p99/max wall milliseconds of classify() per prompt, and the median CPU milliseconds: on a
    shared machine the wall time also holds time spent waiting for a core."""
    for p in prompts:   # warm-up: regex caches, the NFKC table
        clf.classify([p], tenant="benchmark")
    wall, cpu = [], []
    for i in range(runs):
        p = prompts[i % len(prompts)]
        t0, c0 = time.perf_counter(), time.process_time()
        clf.classify([p], tenant="benchmark")
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(wall), "p99": statistics.quantiles(wall, n=100)[98], "max": max(wall),
            "cpu_median": statistics.median(cpu), "runs": runs,
            "mean_chars": statistics.mean(len(p) for p in prompts),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}


def print_accuracy(acc: dict) -> None:
    if acc["fp"] + acc["fn"] == 0:
        print("  none")
    print("per-kind recall:")
    for kind, r in acc["per_kind_recall"].items():
        print(f"  {kind:<10} {r:7.2%}  ({acc['per_kind_items'][kind]} items)")
    print(f"recall     {acc['recall']:7.2%}  (target >= {TARGET_RECALL:.0%}; {acc['fn']} missed)")
    print(f"precision  {acc['precision']:7.2%}  (target >= {TARGET_PRECISION:.0%}; {acc['fp']} false alarms)")


def print_latency(lat: dict, prompt_bytes: int) -> None:
    verdict = "MEETS" if lat["median"] <= TARGET_MEDIAN_MS else "BELOW"
    print(f"latency    median {lat['median']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.3f} ms per "
          f"{prompt_bytes}-byte prompt (~{lat['mean_chars']:.0f} chars), {lat['runs']} runs -> "
          f"{verdict} target (median <= {TARGET_MEDIAN_MS} ms)")
    print(f"           CPU time median {lat['cpu_median']:.3f} ms; load average {lat['load_average']:.2f} "
          f"on {os.cpu_count()} cores (a busy machine inflates wall times)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "tests" / "data" / "sensitivity_corpus.jsonl")
    ap.add_argument("--runs", type=int, default=2000, help="timed calls (>= 1000 for a stable p99)")
    ap.add_argument("--prompt-bytes", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=100, help="distinct prompts the timed runs cycle through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show-text", action="store_true", help="also print misclassified items' (fake) text")
    a = ap.parse_args(argv)

    # remember=0: every call scans its text. The server's classifier remembers the findings of recent texts,
    # and the timed runs cycle through --prompts texts: they would time look-ups, not classification
    clf = SensitivityClassifier(remember=0)
    items = load(a.corpus)
    langs = Counter(item["lang"] for item in items)
    print(f"sensitivity: corpus {a.corpus.name}: {len(items)} items "
          f"({sum(i['pii'] for i in items)} with PII; {dict(langs)})")
    print("misclassified items (index in the corpus):")
    acc = accuracy(clf, items, a.show_text)
    print_accuracy(acc)
    ok = acc["recall"] >= TARGET_RECALL and acc["precision"] >= TARGET_PRECISION
    lat = latency(clf, make_prompts(items, a.prompt_bytes, a.prompts, a.seed), a.runs)
    print_latency(lat, a.prompt_bytes)
    print("ACCURACY OK" if ok else "ACCURACY BELOW TARGET")
    lat_ms = {k: round(v, 4) for k, v in lat.items()} | {"prompt_bytes": a.prompt_bytes}
    print(json.dumps({"corpus": a.corpus.name,
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in acc.items()},
                      "latency_ms": lat_ms,
                      "targets": {"recall": TARGET_RECALL, "precision": TARGET_PRECISION,
                                  "median_ms": TARGET_MEDIAN_MS},
                      "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
