"""Reading checkpoints: the one place that loads model files (sampling and synthesis never import the trainer)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import LungDDPMError
from .unet import UNet3D, UNetConfig


class CheckpointError(LungDDPMError):
    """A checkpoint that cannot or must not be used."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused, not trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused — it cannot be loaded with torch.load(weights_only=True) because it contains "
            "arbitrary Python objects, which could run code; re-save it as plain state dicts (tensors, numbers, "
            f"strings) ({str(exc).splitlines()[0]})"
        ) from exc


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; otherwise the autocast dtype."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(checkpoint: Path, use_ema: bool = True) -> tuple[UNet3D, dict[str, Any]]:
    """A trained (or imported) network from a final ``checkpoint.pt`` (EMA weights by default), in eval mode; its
    input convention is :func:`lungddpm.convention.convention_from_checkpoint` of the returned dict."""
    ckpt = load_checkpoint(Path(checkpoint))
    missing = {"ema", "model", "unet", "diffusion"} - set(ckpt)
    if "hu_window" not in ckpt and "convention" not in ckpt:
        missing.add("hu_window")
    if missing:
        raise CheckpointError(
            f"{checkpoint}: not a lungddpm model checkpoint (missing {sorted(missing)}); rerun the train stage"
        )
    unet_cfg = dict(ckpt["unet"])
    for key in ("channel_mult", "attention_resolutions"):
        unet_cfg[key] = tuple(unet_cfg[key])
    model = UNet3D(UNetConfig(**unet_cfg))
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.eval(), ckpt
