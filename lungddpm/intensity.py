"""The one place that maps HU to the model's [-1, 1] range and layouts to network channels (DESIGN §2).

This is lungddpm's own convention; :mod:`lungddpm.convention` wraps it beside the released Lung-DDPM model's, and
a checkpoint names which of the two its network expects.
"""

from __future__ import annotations

import numpy as np
import torch

from .layout import LUNG, NODULE, check_labels


def hu_to_model(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """hu [...] -> float32 in [-1, 1], clipped to the HU ``window`` (low, high)."""
    lo, hi = window
    return (np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def model_to_hu(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`hu_to_model` (values outside [-1, 1] are clipped first)."""
    lo, hi = window
    return (np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo


def layout_to_channels(layout: np.ndarray, name: str = "layout") -> np.ndarray:
    """layout [D, H, W] labels 0/1/2 -> float32 [2, D, H, W]: lung (label 1) and nodule (label 2) in {-1, 1}."""
    check_labels(layout, name)
    return np.stack([layout == LUNG, layout == NODULE]).astype(np.float32) * 2.0 - 1.0


def channels_to_layout(channels: torch.Tensor | np.ndarray) -> np.ndarray:
    """[2, D, H, W] channels in {-1, 1} (or soft) -> uint8 labels; nodule wins where both are on."""
    c = np.asarray(channels)
    out = np.where(c[0] > 0, LUNG, 0).astype(np.uint8)
    out[c[1] > 0] = NODULE
    return out
