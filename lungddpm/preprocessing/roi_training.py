"""ROIs as the lesion model's training data (DESIGN §5): the network's layout channels of an ROI, the loss weights
around its nodules, and a context model's generated region (where insertion would generate)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..config import Config
from ..diffusion.encoding import texture_levels
from ..errors import LayoutError
from ..io import read_volume
from .layout import LUNG, NODULE, check_labels, dilate_mm, face_border
from .rois import read_roi_table


def roi_channels(layout: np.ndarray, texture: np.ndarray, levels: Sequence[float], name: str) -> np.ndarray:
    """Network layout channels of an ROI: [2, D, H, W], the nodule channel at its nodules' texture levels."""
    from ..diffusion.encoding import layout_to_channels, texture_values

    return layout_to_channels(layout, name, texture_values(texture, levels))


def focus_weights(layout: np.ndarray, spacing_mm: float, weight: float, margin_mm: float) -> np.ndarray:
    """Loss weights [D, H, W]: 1 + ``weight`` inside the nodules dilated by ``margin_mm`` (:func:`dilate_mm`: every
    voxel within the margin, as insertion's generated region), 1 elsewhere."""
    nod = layout == NODULE
    if nod.any():
        nod = dilate_mm(nod, margin_mm, spacing_mm)
    return (1.0 + weight * nod).astype(np.float32)


def generated_region(
    layout: np.ndarray, spacing_mm: float, margin_mm: float, free_diameter_mm: Sequence[float], seed: int
) -> np.ndarray:
    """Where a context model (``model.context``) learns to generate in an ROI, as insertion generates: its nodules
    dilated by ``margin_mm`` (:func:`~lungddpm.preprocessing.layout.dilate_mm`, as insertion does); in a
    nodule-free ROI a ball of a seeded diameter in ``free_diameter_mm`` at a lung voxel at least its radius deep
    (the deepest one if none is) and off the faces as insertion's (``face_border``), dilated the same way.
    layout [n, n, n] -> bool [n, n, n]."""
    region = layout == NODULE
    if not region.any():
        rng = np.random.default_rng(seed)
        radius = rng.uniform(*free_diameter_mm) / 2.0 / spacing_mm
        b = face_border(margin_mm, spacing_mm) + int(np.floor(radius + 1e-9))  # the ball's least centre index
        depth, inner = ndi.distance_transform_edt(layout == LUNG), np.zeros(layout.shape, bool)
        inner[tuple(slice(b, n - b) for n in layout.shape)] = True
        depth = np.where(inner, depth, -1.0) if inner.any() else depth  # an ROI too small for the border: anywhere
        deep = np.argwhere(depth >= radius)
        centre = deep[rng.integers(len(deep))] if len(deep) else np.unravel_index(np.argmax(depth), depth.shape)
        zz, yy, xx = np.ogrid[: layout.shape[0], : layout.shape[1], : layout.shape[2]]
        region = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2 + 1e-9
    return dilate_mm(region, margin_mm, spacing_mm)


def load_roi_training_data(tables: Sequence[Path], cfg: Config, split: str = "train") -> Any:
    """Every ROI of ``tables`` (of the ``split`` subset: ``val`` feeds the preview only, so it may hold no nodule,
    or no ROI: None) as :class:`lungddpm.diffusion.data.TrainData` for the lesion model ``cfg``
    (:func:`lungddpm.config.lesion_config`): images [N, 1, n, n, n] in [-1, 1], layouts [N, 2, n, n, n] with
    texture levels (a context model: [N, 4, n, n, n], the known ROI and keep mask of :func:`generated_region`
    appended), and loss weights when ``train.focus_weight`` > 0 or the model has context (then 1 + focus inside
    the generated region, ``train.context_outside_weight`` outside)."""
    import zlib

    import torch

    from ..diffusion.data import TrainData
    from ..diffusion.encoding import context_channels, hu_to_model

    levels = texture_levels(cfg.raw["lesion"]["texture_hu"], cfg.intensity.hu_window)
    spacing = float(cfg.raw["lesion"]["roi"]["spacing_mm"])
    context, tc = bool(cfg.model.get("context")), cfg.train
    margin = float(cfg.raw["lesion"]["insert"]["margin_mm"])  # context: insertion's generated region
    images, layouts, weights, ids, groups = [], [], [], [], []
    for table in tables:
        for row in read_roi_table(Path(table)):
            folder = Path(table).parent
            ct, _geometry = read_volume(folder / row["ct"])
            layout, _ = read_volume(folder / row["layout"])
            texture, _ = read_volume(folder / row["texture_map"])
            if ct.shape != (cfg.preprocess.size[0],) * 3:
                raise LayoutError(
                    f"{folder / row['ct']}: ROI grid {ct.shape} is not lesion.roi.size {cfg.preprocess.size}; rerun "
                    "the rois rule"
                )
            check_labels(layout, str(folder / row["layout"]), "rerun the rois rule for its case")
            image = hu_to_model(ct, cfg.intensity.hu_window)
            images.append(image[None])
            channels = roi_channels(layout, texture, levels, row["roi"])
            weight = focus_weights(layout, spacing, tc.focus_weight, tc.focus_margin_mm) if tc.focus_weight else None
            if context:
                seed = int(np.random.SeedSequence([tc.seed, zlib.crc32(row["roi"].encode())]).generate_state(1)[0])
                region = generated_region(layout, spacing, margin, tc.context_free_diameter_mm, seed)
                channels = np.concatenate([channels, context_channels(image, ~region)])
                inside = weight if weight is not None else np.ones(layout.shape, np.float32)
                weight = np.where(region, inside, np.float32(tc.context_outside_weight)).astype(np.float32)
            layouts.append(channels)
            if weight is not None:
                weights.append(weight[None])
            ids.append(row["roi"])
            groups.append(row["texture_class"] or "free")
    if not ids and split != "train":
        return None
    if not ids:
        raise LayoutError(f"no ROIs in {[str(t) for t in tables]}: the train split has no ROI; check lesion.roi")
    if split == "train" and all(g == "free" for g in groups):
        raise LayoutError(
            f"{len(ids)} ROIs in {len(tables)} table(s) and no nodule among them: the train split has no labelled "
            "nodule to learn nodule appearance from; label nodules in some train CTs or set lesion.enabled: false"
        )
    return TrainData(
        torch.from_numpy(np.stack(images)),
        torch.from_numpy(np.stack(layouts)),
        tuple(ids),
        torch.from_numpy(np.stack(weights)) if weights else None,
        tuple(groups),
    )
