"""How much memory the KV cache may take: an explicit budget, or a share of what is free now."""

from __future__ import annotations

import torch


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), also honouring a cgroup v2 memory limit."""
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        available = 8 << 30
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def kv_cache_budget_bytes(memory_gb: float | None, fraction: float | None, device: torch.device) -> int:
    """An explicit budget wins; otherwise a share of what is free after the weights were loaded: a GPU
    is the model's alone (0.85), host memory is shared with everything else (0.3)."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * (fraction or 0.85))
    return int(available_host_memory() * (fraction or 0.3))
