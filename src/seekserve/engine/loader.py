"""Hugging Face folder -> weights. Tensors are streamed from `*.safetensors` straight into the model's
preallocated parameters (no second copy of the model in memory: peak RSS stays near the weights' size),
converting dtype in small chunks when the checkpoint's dtype differs from the engine's."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from seekserve.engine.errors import ModelLoadError
from seekserve.engine.models.llama import WeightTarget

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CONVERT_CHUNK_BYTES = 16 << 20  # dtype conversion reads at most this much at a time


@dataclass(frozen=True)
class LoadStats:
    num_tensors: int
    num_bytes: int          # bytes written into parameters


def resolve_model_path(model: str) -> Path:
    """A local folder, or a Hugging Face repo id (`org/name`) downloaded with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; --model-path takes a Hugging Face model folder")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ModelLoadError(f"{model!r} is not a local folder, and downloading it needs "
                                 "`pip install huggingface_hub`") from None
        try:
            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                 "tokenizer.model"]))
        except Exception as e:  # network, auth, unknown repo: report, don't crash with a traceback
            raise ModelLoadError(f"could not download {model!r} from the Hugging Face hub: {e}") from None
    raise ModelLoadError(f"model folder {path} does not exist")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is malformed: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin weights: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise ModelLoadError(f"no *.safetensors weights in {folder}{hint}")
    return files


def read_header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    """Returns (tensor name -> {dtype, shape, data_offsets}, byte offset where data starts)."""
    head = f.read(8)
    if len(head) != 8:
        raise ModelLoadError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", head)
    if size > 100 << 20:
        raise ModelLoadError(f"{path} is not a safetensors file (header size {size})")
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _readinto(f: BinaryIO, dest: torch.Tensor) -> None:
    """Fill a contiguous CPU tensor with the next bytes of f."""
    view = memoryview(dest.view(torch.uint8).reshape(-1).numpy())
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise EOFError
        done += n


def _stream_tensor(f: BinaryIO, src_dtype: torch.dtype, shape: list[int], dest: torch.Tensor) -> None:
    """Copy one tensor from the current file position into dest, converting dtype/device as needed."""
    if dest.device.type == "cpu" and dest.dtype == src_dtype and dest.is_contiguous():
        _readinto(f, dest)
        return
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if shape else 1
    row_bytes = max(row_numel * src_dtype.itemsize, 1)
    step = max(1, CONVERT_CHUNK_BYTES // row_bytes)
    flat_dest = dest.reshape(rows, row_numel) if shape else dest.reshape(1, 1)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        buf = torch.empty((n, row_numel), dtype=src_dtype)
        _readinto(f, buf)
        flat_dest[start:start + n].copy_(buf)


def load_weights(folder: Path, targets: dict[str, WeightTarget]) -> LoadStats:
    """Stream every checkpoint tensor into its target; fail naming the file and tensor on any mismatch."""
    loaded: set[str] = set()
    num_bytes = 0
    for path in safetensors_files(folder):
        with open(path, "rb", buffering=0) as f:
            header, data_start = read_header(f, path)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                target = targets.get(name)
                if target is None:
                    continue  # e.g. rotary inv_freq buffers, or lm_head in a tied checkpoint
                dest = target.view()
                shape = list(info["shape"])
                if tuple(shape) != tuple(dest.shape):
                    raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(shape)}, the model "
                                         f"expects {tuple(dest.shape)} (does config.json match the weights?)")
                src_dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if src_dtype is None or not src_dtype.is_floating_point:
                    raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                if end - begin != math.prod(shape) * src_dtype.itemsize:
                    raise ModelLoadError(f"{path}: tensor {name!r} has a byte size that does not match its shape")
                f.seek(data_start + begin)
                try:
                    _stream_tensor(f, src_dtype, shape, dest)
                except EOFError:
                    raise ModelLoadError(f"{path} is truncated: tensor {name!r} ends past the file") from None
                loaded.add(name)
                num_bytes += dest.numel() * dest.element_size()
        _drop_page_cache(path)
    missing = sorted(set(targets) - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{folder}: checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")
    return LoadStats(num_tensors=len(loaded), num_bytes=num_bytes)


def _drop_page_cache(path: Path) -> None:
    """Weights are read once; tell the kernel it may drop them from the page cache."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
