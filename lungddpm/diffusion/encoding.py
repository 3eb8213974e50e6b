"""The one place that maps HU to the model's [-1, 1] range and layouts to network channels (DESIGN §2).

This is lungddpm's own convention; :mod:`lungddpm.diffusion.convention` wraps it beside the released Lung-DDPM
model's, and a checkpoint names which of the two its network expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..config_checks import TEXTURE_LEVEL_BOUNDS
from ..preprocessing.layout import LUNG, NODULE, check_labels

if TYPE_CHECKING:  # torch is not needed at run time: the ROI and metric jobs import this module without it
    import torch


def hu_to_model(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """hu [...] -> float32 in [-1, 1], clipped to the HU ``window`` (low, high)."""
    lo, hi = window
    return (np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def model_to_hu(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`hu_to_model` (values outside [-1, 1] are clipped first)."""
    lo, hi = window
    return (np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo


TEXTURE_CLASSES = ("ground-glass", "part-solid", "solid")
UNKNOWN_TEXTURE = "unknown"  # the class of a nodule whose source has no texture rating (a label map's components)
ANY_TEXTURE = 1.0  # the nodule channel's value for "nodule, texture not given" (the whole-volume scale's only one)
NODULE_THRESHOLD = -0.95  # nodule channel above this = nodule: any texture level or ANY_TEXTURE; -1 outside them


def texture_levels(texture_hu: Sequence[float], window: tuple[float, float]) -> tuple[float, float, float]:
    """Nodule-channel values of the texture classes: their typical HU (``lesion.texture_hu``) in model units; each
    lies below :data:`ANY_TEXTURE` and above the channel's -1 outside the nodules."""
    levels = tuple(float(v) for v in hu_to_model(np.asarray(texture_hu, np.float32), window))
    if not all(TEXTURE_LEVEL_BOUNDS[0] < v < TEXTURE_LEVEL_BOUNDS[1] for v in levels):
        raise ValueError(f"lesion.texture_hu {list(texture_hu)} maps to {levels}: keep it inside intensity.hu_window")
    return levels  # type: ignore[return-value]


def texture_class(rating: int) -> int:
    """LIDC texture rating 1..5 -> class index into :data:`TEXTURE_CLASSES` (1-2 ground-glass, 3 part-solid,
    4-5 solid)."""
    if not 1 <= int(rating) <= 5:
        raise ValueError(f"LIDC texture rating {rating} outside 1..5")
    return 0 if rating <= 2 else 1 if rating == 3 else 2


def texture_values(texture: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """A texture map (an ROI's ``_texture.nii.gz``: 0 = no class known, 1 + class index) -> float32 nodule-channel
    values of the same shape: :data:`ANY_TEXTURE` where no class is known, else the class's level."""
    return np.array([ANY_TEXTURE, *levels], np.float32)[np.asarray(texture, np.intp)]


def layout_to_channels(layout: np.ndarray, name: str = "layout", nodule_level: np.ndarray | None = None) -> np.ndarray:
    """layout [D, H, W] labels 0/1/2 -> float32 [2, D, H, W]: lung (label 1) and nodule (label 2) in {-1, 1}.

    ``nodule_level`` [D, H, W] (lesion scale) gives the nodule channel's value inside the nodules — the texture
    class's level (:func:`texture_levels`) or :data:`ANY_TEXTURE`; outside them the channel is -1.
    """
    check_labels(layout, name)
    channels = np.stack([layout == LUNG, layout == NODULE]).astype(np.float32) * 2.0 - 1.0
    if nodule_level is not None:
        channels[1] = np.where(layout == NODULE, nodule_level, -1.0)
    return channels


CONTEXT_CHANNELS = 2  # mask-conditioned inpainting (lesion model.context): the known image and the keep mask


def context_channels(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The extra input of a context model (mask-conditioned inpainting): image [D, H, W] in model units, keep bool
    [D, H, W] (True = known, kept) -> float32 [2, D, H, W]: the image where kept and 0 in the generated region, and
    the keep mask in {-1, 1}. Appended after the layout channels."""
    keep = np.asarray(keep, bool)
    return np.stack([np.where(keep, image, 0.0), keep * 2.0 - 1.0]).astype(np.float32)


def channels_to_layout(channels: torch.Tensor | np.ndarray) -> np.ndarray:
    """[2, D, H, W] channels in {-1, 1} (or soft) -> uint8 labels; nodule wins where both are on."""
    c = np.asarray(channels)
    out = np.where(c[0] > 0, LUNG, 0).astype(np.uint8)
    out[c[1] > NODULE_THRESHOLD] = NODULE  # the lesion scale's texture levels lie in (-0.9, 0.95)
    return out
