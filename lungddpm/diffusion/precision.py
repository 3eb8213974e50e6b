"""Numerical precision: the autocast dtype a ``precision`` setting means on a device, and the autocast context."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; otherwise the autocast dtype (``auto``: bf16 on a GPU, fp32 on the CPU)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
