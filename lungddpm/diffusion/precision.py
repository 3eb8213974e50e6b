"""Numerical precision: the autocast dtype a ``precision`` setting means on a device, and the autocast context."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), so that oneDNN's bf16 kernels are faster than
    fp32 (about 2x measured for the UNet) instead of emulated (slower)."""
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(callable(p) for p in probes):
        return any(p() for p in probes)  # type: ignore[misc]
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.is_file() else set()
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; otherwise the autocast dtype (``auto``: bf16 on a GPU and on a CPU with native bf16, else fp32)."""
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
