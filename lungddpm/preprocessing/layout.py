"""Semantic layouts: 0 background, 1 lung, 2 nodule (Lung-DDPM's convention), with loud sanity checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..config import LayoutConfig
from ..errors import LayoutError
from ..io import Geometry, read_json, read_volume, write_volume

log = logging.getLogger(__name__)

BACKGROUND, LUNG, NODULE = 0, 1, 2
LABELS = (BACKGROUND, LUNG, NODULE)


# A reach in voxels within this (relative) of a whole number is that number: a spacing read back from NIfTI is float32
# (1.2 mm is 1.2000000477), so 3.6 mm / 1.2 mm fell just short of 3 voxels at insertion and not in training.
VOXEL_RTOL = 1e-6


def ball(radius_vox: float) -> np.ndarray:
    """Bool sphere structuring element of ``radius_vox`` voxels (centre voxel included), [2r+1]^3."""
    r = int(np.ceil(radius_vox - VOXEL_RTOL * radius_vox))
    zz, yy, xx = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return zz**2 + yy**2 + xx**2 <= radius_vox**2 * (1 + 2 * VOXEL_RTOL) + 1e-9


def dilate_mm(mask: np.ndarray, margin_mm: float, spacing_mm: float) -> np.ndarray:
    """``mask`` [D, H, W] grown by a ball of ``margin_mm`` on an isotropic grid of ``spacing_mm`` (as is for 0): the
    lesion scale's generated region around a nodule, at insertion and in a context model's training."""
    return ndi.binary_dilation(mask, structure=ball(margin_mm / spacing_mm)) if margin_mm else mask


def face_border(margin_mm: float, spacing_mm: float) -> int:
    """Voxels to keep between a nodule and the grid's faces so that :func:`dilate_mm` by ``margin_mm`` leaves at least
    one kept voxel outside it on every side: the reach of its ball along an axis, plus one."""
    return int(np.floor(margin_mm / spacing_mm * (1 + VOXEL_RTOL) + 1e-9)) + 1


REWRITE_LAYOUT = (
    "rerun the stage that wrote it (layout for a real case, rois for a real ROI; sample or synthesize_lesion for a "
    "synthetic item)"
)


def check_labels(layout: np.ndarray, name: str, fix: str = "rerun the layout stage") -> None:
    """Raise :class:`LayoutError` unless ``layout`` holds only the labels 0/1/2; ``fix``: how to remake the file."""
    found = set(np.unique(layout).tolist())
    if not found <= set(LABELS):
        raise LayoutError(f"{name}: labels {sorted(found)} found, expected a subset of {{0, 1, 2}}; {fix}")


def read_case_pair(ct_path: Path, layout_path: Path) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A preprocessed CT (HU) and its layout -> (ct, uint8 layout, geometry); refuses labels other than 0/1/2 or
    a layout grid different from the CT's."""
    ct, geometry = read_volume(ct_path)
    layout, lay_geometry = read_volume(layout_path)
    if layout.shape != ct.shape or not lay_geometry.same_grid(geometry):

        def grid(shape: tuple[int, ...], g: Geometry) -> str:
            return f"{shape} at {g.spacing} mm, origin {g.origin}, direction {g.direction}"

        raise LayoutError(
            f"{layout_path}: grid {grid(layout.shape, lay_geometry)} differs from its CT {ct_path}: "
            f"{grid(ct.shape, geometry)}; {REWRITE_LAYOUT.replace('that wrote it', 'that wrote them')}"
        )
    check_labels(layout, str(layout_path), REWRITE_LAYOUT)
    return ct, layout.astype(np.uint8), geometry


def compose_layout(lung: np.ndarray, nodules: np.ndarray) -> np.ndarray:
    """lung: bool [Z, Y, X]; nodules: instance labels [Z, Y, X] (0 = none) -> uint8 layout.

    Nodules are always labelled 2 and are part of the lung region (a nodule voxel outside the lung mask is
    added to it, never dropped).
    """
    if lung.shape != nodules.shape:
        raise LayoutError(f"lung mask {lung.shape} and nodule mask {nodules.shape} differ in shape")
    layout = np.where(lung | (nodules > 0), LUNG, BACKGROUND).astype(np.uint8)
    layout[nodules > 0] = NODULE
    return layout


def check_layout(
    layout: np.ndarray, geometry: Geometry, cfg: LayoutConfig, name: str, midline_x_mm: float | None = None
) -> dict[str, Any]:
    """Raise :class:`LayoutError` unless ``layout`` has only labels 0/1/2, a plausible lung volume and two lungs:
    each side of the patient's midline (LPS x in mm; default the centre of the lungs' bounding box) holds at
    least ``min_side_fraction`` of the lung volume. Returns stats."""
    check_labels(layout, name)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000
    lung = layout > 0
    lung_ml = float(lung.sum()) * voxel_ml
    if not lung.any():  # layout.min_lung_ml: 0 lets an empty one through the bounds
        raise LayoutError(f"{name}: no lung voxel; the lung segmentation failed — inspect lung_fine.nii.gz")
    if not cfg.min_lung_ml <= lung_ml <= cfg.max_lung_ml:
        raise LayoutError(
            f"{name}: lung volume {lung_ml:.0f} mL outside [{cfg.min_lung_ml}, {cfg.max_lung_ml}] mL; the lung "
            "segmentation failed or the crop (preprocess.size x spacing_mm) cuts the lungs — inspect "
            "lung_fine.nii.gz, or adjust layout.min_lung_ml / max_lung_ml"
        )
    if midline_x_mm is None:
        xs = np.flatnonzero(lung.any(axis=(0, 1)))
        mid = (int(xs[0]) + int(xs[-1]) + 1) // 2
    else:
        mid = int(np.ceil(geometry.world_to_index(np.array([[midline_x_mm, 0.0, 0.0]]))[0, 2]))
        mid = min(max(mid, 0), layout.shape[2])
    left_fraction = float(lung[..., :mid].sum()) / float(lung.sum())
    if min(left_fraction, 1 - left_fraction) < cfg.min_side_fraction:
        raise LayoutError(
            f"{name}: only {min(left_fraction, 1 - left_fraction):.0%} of the lung volume on one side; two lungs "
            f"were not found (need {cfg.min_side_fraction:.0%} each) — inspect lung_fine.nii.gz or lower "
            "layout.min_side_fraction"
        )
    return {
        "lung_ml": round(lung_ml, 1),
        "nodule_ml": round(float((layout == NODULE).sum()) * voxel_ml, 1),
        "side_fractions": [round(left_fraction, 3), round(1 - left_fraction, 3)],
    }


def runs_off_both_ends(mask: np.ndarray) -> bool:
    """Whether ``mask`` [Z, Y, X] reaches both its first and its last slice."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return bool(zs.size) and zs[0] == 0 and zs[-1] == mask.shape[0] - 1


def check_source_lungs(
    lung: np.ndarray, air: np.ndarray, spacing: tuple[float, float, float], cfg: LayoutConfig, ct: str,
    label: str | None = None, label_nodules: int = 0,
) -> None:  # fmt: skip
    """Refuse, before anything is written, lungs under ``layout.min_lung_ml`` whose cause lies in the source: a CT
    that stops inside the chest (``air``, the body's air [Z, Y, X], runs off both ends and, trachea and bowel gas
    included, holds less than ``min_lung_ml``: a full scan's holds litres) or a label map's lung label
    (with no nodule label, most likely a 0/1 nodule mask read as ``lung_nodule``). A full scan whose segmentation
    falls short is left to :func:`check_layout`, after ``lung_fine.nii.gz`` is written for inspection.
    lung, air: bool [Z, Y, X] on the fine grid of ``spacing`` (z, y, x) mm; ``label``: the label map's path."""
    voxel_ml = float(np.prod(spacing)) / 1000
    lung_ml = float(lung.sum()) * voxel_ml
    if lung_ml >= cfg.min_lung_ml:
        return
    short = f"{ct}: lungs of {lung_ml:.1f} mL, under layout.min_lung_ml {cfg.min_lung_ml:g} mL"
    if label is not None and not label_nodules:
        raise LayoutError(
            f"{short}, from label 1 of {label}, which has no nodule label 2: if that map is a 0/1 nodule mask, set "
            "data.images.label_convention: binary; if it marks the lungs, label the whole lungs"
        )
    if runs_off_both_ends(air) and float(air.sum()) * voxel_ml < cfg.min_lung_ml:
        raise LayoutError(
            f"{short}; the scan's {air.shape[0] * spacing[0]:.0f} mm in z stop inside the chest (its air runs off "
            "both ends): use a CT of the whole chest"
        )
    if label is not None:
        raise LayoutError(
            f"{short}, from the lung label of {label}: label the whole lungs, or keep only the nodule label so that "
            "lungddpm segments the lungs (a map of nodule instances 1..n: nodule = label > 0, label_convention: "
            "binary)"
        )


def make_layout(case_dir: Path, out_path: Path, cfg: LayoutConfig) -> dict[str, Any]:
    """Read ``lung.nii.gz``, ``nodules.nii.gz`` and ``meta.json`` (body midline) of a preprocessed case, write the
    checked layout NIfTI."""
    lung, geometry = read_volume(case_dir / "lung.nii.gz")
    nodules, nod_geometry = read_volume(case_dir / "nodules.nii.gz")
    if lung.shape != nodules.shape or not geometry.same_grid(nod_geometry):  # spacing and direction too
        raise LayoutError(f"{case_dir}: lung.nii.gz and nodules.nii.gz are on different grids; rerun preprocess")
    layout = compose_layout(lung > 0, nodules)
    midline = read_json(case_dir / "meta.json").get("body_midline_x_mm")
    stats = check_layout(layout, geometry, cfg, str(case_dir), midline)
    write_volume(out_path, layout, geometry)
    log.info("%s: layout lung %.0f mL, nodules %.1f mL", case_dir.name, stats["lung_ml"], stats["nodule_ml"])
    return stats
