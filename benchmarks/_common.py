"""Helpers shared by the benchmark scripts (not part of the seekserve package)."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Self

import torch


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    n = threads or num_cores()
    torch.set_num_threads(n)
    return n


def special_token_ids(model: Path) -> set[int]:
    """Ids of the tokenizer's added/special tokens (never used in random prompts)."""
    try:
        data = json.loads((Path(model) / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return set()
    return {int(t["id"]) for t in data.get("added_tokens", [])}


def safe_token_range(model: Path, vocab_size: int) -> tuple[int, int]:
    """[lo, hi): a contiguous id range above every special token and inside the model's vocabulary
    (and the tokenizer's, when it is smaller)."""
    specials = special_token_ids(model)
    lo = max(specials) + 1 if specials and max(specials) < vocab_size // 2 else 0
    hi = vocab_size
    try:
        data = json.loads((Path(model) / "tokenizer.json").read_text())
        hi = min(hi, len(data["model"]["vocab"]))
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        pass
    # specials above lo (e.g. appended at the end of the vocabulary) cap the range
    above = [t for t in specials if t >= lo]
    if above:
        hi = min(hi, min(above))
    return lo, hi


class PromptMaker:
    """Random token prompts from a fixed seed: each call continues the same stream, so repeats get fresh
    prompts (no prefix-cache hits between runs) and a rerun gets the same ones."""

    def __init__(self, lo: int, hi: int, seed: int = 0) -> None:
        self.lo, self.hi, self.rng = lo, hi, random.Random(seed)

    def __call__(self, n: int, length: int) -> list[list[int]]:
        return [[self.rng.randrange(self.lo, self.hi) for _ in range(length)] for _ in range(n)]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info(device: str) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, cores=num_cores(),
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_note() -> str:
    """The 1-minute load average against the cores: OpenMP-threaded CPU runs slow down many-fold (threads
    wait at every barrier for a peer that is descheduled) when other processes share the cores."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    cores = num_cores()
    note = f"load average {load:.2f} on {cores} cores"
    if load > cores:
        note += " -- BUSY: other processes share these cores, CPU figures are unreliable (try --threads 1)"
    return note


class CpuShare:
    """Share of the cores this process got while the block ran: process CPU time / (wall time x threads).
    Well under 1 on an otherwise idle machine is normal for GPU runs; on CPU runs it means other
    processes took cores (or threads were idle)."""

    def __enter__(self) -> Self:
        t = os.times()
        self._cpu, self._wall = t.user + t.system, time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        t = os.times()
        wall = time.perf_counter() - self._wall
        self.share = (t.user + t.system - self._cpu) / max(wall * torch.get_num_threads(), 1e-9)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
