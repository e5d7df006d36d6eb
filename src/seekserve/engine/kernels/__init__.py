"""Native CPU kernels (paged decode attention, fused RMSNorm / SiLU-mul / rotary), compiled on first use
with the system C compiler and loaded with ctypes.

Building needs only `cc` (no PyTorch headers: a second or two). The shared object is cached under
$SEEKSERVE_CACHE_DIR (default ~/.cache/seekserve/kernels), keyed by the source's hash and the machine.
When no compiler is available, or SEEKSERVE_DISABLE_KERNELS=1, callers fall back to plain PyTorch."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("seekserve.engine")
_SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.c", "elementwise.c")]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_BUILD = "2: -ffast-math at compile time only"   # part of the cache key: change it when the build changes


def _cache_dir() -> Path:
    return Path(os.environ.get("SEEKSERVE_CACHE_DIR", Path.home() / ".cache" / "seekserve")) / "kernels"


@cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one log line saying why) when it cannot be had."""
    if os.environ.get("SEEKSERVE_DISABLE_KERNELS") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    source = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(source + _BUILD.encode() + platform.machine().encode()
                         + platform.node().encode()).hexdigest()[:16]
    target = _cache_dir() / f"seekserve-kernels-{key}.so"
    if not target.exists():
        if compiler is None:
            log.warning("no C compiler found: using the PyTorch attention path (slower decode on CPU)")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            # -march=native: the library is built on (and cached for) the machine that runs it.
            # -ffast-math lets expf vectorize (glibc libmvec); the kernels never rely on inf/NaN semantics.
            # It is given when compiling only: linking with it would add crtfastmath.o, which turns on
            # flush-to-zero for the whole process when the library loads.
            objects = []
            for source in _SOURCES:
                obj = Path(tmp) / (source.stem + ".o")
                objects.append(str(obj))
                result = subprocess.run([compiler, "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c",
                                         str(source), "-o", str(obj)], capture_output=True, text=True)
                if result.returncode != 0:
                    break
            else:
                result = subprocess.run([compiler, "-shared", "-fopenmp", *objects, "-o", str(built), "-lm"],
                                        capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("compiling the CPU kernels failed, using PyTorch instead: %s",
                            result.stderr.strip()[-500:])
                return None
            os.replace(built, target)
    torch.get_num_threads()  # torch (and its libgomp) is loaded first, so the kernel shares its OpenMP runtime
    lib = ctypes.CDLL(str(target))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "paged_decode_attention": (ctypes.c_int, [P] * 6 + [I] * 6 + [ctypes.c_float, I]),
        "rms_norm": (None, [P, P, P, P, I64, I64, ctypes.c_float, I]),
        "silu_mul": (None, [P, P, I64, I64, I]),
        "rotary": (None, [P, P, P, P, I64, I64, I64, I64, I]),
        "argmax_rows": (None, [P, P, I64, I64]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def kernels_for(t: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library when it applies to this tensor (CPU, float32/bfloat16, contiguous)."""
    if t.device.type != "cpu" or t.dtype not in _KERNEL_DTYPES:
        return None
    return load_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """x: (T, H). With `residual`, first `residual += x` in place, then normalize it. None: not applicable."""
    lib = kernels_for(x)
    if lib is None or not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        return None
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                 x.shape[0], x.shape[1], float(eps), int(x.dtype == torch.bfloat16))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """(T, 2I) -> silu(gate) * up, (T, I). None: not applicable."""
    lib = kernels_for(gate_up)
    if lib is None or not gate_up.is_contiguous():
        return None
    T, two_i = gate_up.shape
    out = torch.empty((T, two_i // 2), dtype=gate_up.dtype)
    lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), T, two_i // 2, int(gate_up.dtype == torch.bfloat16))
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """Row-wise argmax of float32 (N, V) logits (torch's CPU argmax is ~20x slower). None: not applicable."""
    lib = kernels_for(logits)
    if lib is None or logits.dtype != torch.float32 or not logits.is_contiguous() or logits.dim() != 2:
        return None
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    lib.argmax_rows(logits.data_ptr(), out.data_ptr(), logits.shape[0], logits.shape[1])
    return out


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
            head_dim: int) -> bool:
    """Rotate heads [0, num_heads) of each row of x (T, row width) in place. False: not applicable."""
    lib = kernels_for(x)
    if lib is None or not x.is_contiguous() or positions.dtype != torch.int64:
        return False
    lib.rotary(x.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.shape[0], x.shape[1],
               num_heads, head_dim, int(x.dtype == torch.bfloat16))
    return True


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                           block_size: int) -> torch.Tensor | None:
    """q: (B, H, D) -> (B, H, D), reading keys/values in place. None if the kernel does not apply."""
    lib = kernels_for(q)
    if lib is None or block_size > 128:
        return None
    q = q.contiguous()
    B, H, D = q.shape
    KVH = k_cache.shape[1]  # k_cache: (num_blocks, KVH, D, block_size); v_cache: (num_blocks, KVH, block_size, D)
    out = torch.empty_like(q)
    status = lib.paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                        block_tables.data_ptr(), kv_lens.data_ptr(), out.data_ptr(), B, H, KVH, D,
                                        block_size, block_tables.shape[1], float(scale),
                                        int(q.dtype == torch.bfloat16))
    if status != 0:
        raise MemoryError(f"paged attention kernel failed (status {status})")
    return out
