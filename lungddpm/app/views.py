"""What the studio shows: three linked planes of a native CT in a lung window with its label map overlaid and a
cursor, the magnified ROI before and after an edit; and a click on a plane back to a native voxel. RGB uint8
arrays, drawn with numpy alone (fast enough to redraw on every click)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..preprocessing.layout import LUNG, NODULE
from ..viz import LUNG_WINDOW

PLANES = ("axial", "coronal", "sagittal")
LUNG_RGB, LUNG_ALPHA = np.array([60.0, 140.0, 255.0]), 0.18
NODULE_RGB, NODULE_ALPHA = np.array([255.0, 50.0, 50.0]), 0.45
CURSOR_RGB = np.array([255, 220, 0], np.uint8)


def window_rgb(hu: np.ndarray, window: Sequence[float] = LUNG_WINDOW) -> np.ndarray:
    """HU [H, W] -> grey RGB uint8 [H, W, 3] in ``window`` (lo, hi)."""
    lo, hi = float(window[0]), float(window[1])
    grey = np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(rgb: np.ndarray, labels: np.ndarray, show_lung: bool = True) -> np.ndarray:
    """Tint lung (blue) and nodules (red) of ``labels`` [H, W] over float ``rgb`` [H, W, 3] -> uint8."""
    out = rgb.astype(np.float32)
    if show_lung:
        lung = labels == LUNG
        out[lung] = (1 - LUNG_ALPHA) * out[lung] + LUNG_ALPHA * LUNG_RGB
    nod = labels == NODULE
    out[nod] = (1 - NODULE_ALPHA) * out[nod] + NODULE_ALPHA * NODULE_RGB
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def display_rows(n: int, voxel_mm: float, pixel_mm: float) -> np.ndarray:
    """Source row of each display row when ``n`` rows of ``voxel_mm`` are drawn at ``pixel_mm`` per pixel."""
    rows = max(1, round(n * voxel_mm / pixel_mm))
    return np.minimum((np.arange(rows) * n) // rows, n - 1)


def _plane(volume: np.ndarray, plane: str, cursor: Sequence[int]) -> np.ndarray:
    """The 2D slice of ``plane`` through ``cursor`` (k, i, j), superior up for coronal and sagittal."""
    k, i, j = cursor
    if plane == "axial":
        return volume[k]
    if plane == "coronal":
        return volume[:, i, :][::-1]
    if plane == "sagittal":
        return volume[:, :, j][::-1]
    raise ValueError(f"unknown plane {plane!r}: one of {PLANES}")


def _row_spacing(plane: str, spacing: Sequence[float]) -> tuple[float, float]:
    """(mm per source row, mm per source column) of ``plane`` for native ``spacing`` (dz, dy, dx)."""
    dz, dy, dx = spacing
    return {"axial": (dy, dx), "coronal": (dz, dx), "sagittal": (dz, dy)}[plane]


def render_plane(
    ct: np.ndarray,
    labels: np.ndarray,
    plane: str,
    cursor: Sequence[int],
    spacing: Sequence[float],
    show_lung: bool = True,
    window: Sequence[float] = LUNG_WINDOW,
) -> np.ndarray:
    """One plane of the CT [K, I, J] with the label map and a cursor cross, rows stretched to true proportions."""
    row_mm, col_mm = _row_spacing(plane, spacing)
    rows = display_rows(_plane(ct, plane, cursor).shape[0], row_mm, col_mm)
    img = overlay(window_rgb(_plane(ct, plane, cursor)[rows], window), _plane(labels, plane, cursor)[rows], show_lung)
    k, i, j = cursor
    n_rows = _plane(ct, plane, cursor).shape[0]
    src_row = {"axial": i, "coronal": n_rows - 1 - k, "sagittal": n_rows - 1 - k}[plane]
    col = {"axial": j, "coronal": j, "sagittal": i}[plane]
    r = np.flatnonzero(rows == src_row)
    gap = 6  # the cross leaves the site itself visible
    if r.size:
        y = int(r[r.size // 2])  # one display row, the middle of the source row's
        img[y, : max(0, col - gap)] = CURSOR_RGB
        img[y, col + gap + 1 :] = CURSOR_RGB
        img[: max(0, y - gap), col] = CURSOR_RGB
        img[y + gap + 1 :, col] = CURSOR_RGB
    return img


def click_to_index(
    plane: str, x: int, y: int, cursor: Sequence[int], shape: Sequence[int], spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The native voxel (k, i, j) under display pixel (``x``, ``y``) of ``plane`` (the other axis from ``cursor``)."""
    k, i, j = (int(v) for v in cursor)
    row_mm, col_mm = _row_spacing(plane, spacing)
    n_rows = {"axial": shape[1], "coronal": shape[0], "sagittal": shape[0]}[plane]
    rows = display_rows(n_rows, row_mm, col_mm)
    src = int(rows[min(max(int(y), 0), rows.size - 1)])
    if plane == "axial":
        i, j = src, int(x)
    elif plane == "coronal":
        k, j = n_rows - 1 - src, int(x)
    else:
        k, i = n_rows - 1 - src, int(x)
    return (min(max(k, 0), shape[0] - 1), min(max(i, 0), shape[1] - 1), min(max(j, 0), shape[2] - 1))


def roi_panel(before: np.ndarray, after: np.ndarray, layout: np.ndarray, zoom: int = 6) -> np.ndarray:
    """The ROI magnified ``zoom`` x: rows axial / coronal through the new nodule's centre, columns before, after,
    after with the edited layout -> RGB uint8."""
    nod = layout == NODULE
    centre = np.round(np.argwhere(nod).mean(axis=0)).astype(int) if nod.any() else np.array(layout.shape) // 2
    tiles = []
    for plane in ("axial", "coronal"):
        row = [
            overlay(window_rgb(_plane(before, plane, centre)), np.zeros_like(_plane(layout, plane, centre)), False),
            overlay(window_rgb(_plane(after, plane, centre)), np.zeros_like(_plane(layout, plane, centre)), False),
            overlay(window_rgb(_plane(after, plane, centre)), _plane(layout, plane, centre), True),
        ]
        sep = np.full((row[0].shape[0], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([row[0], sep, row[1], sep, row[2]], axis=1))
    sep = np.full((2, tiles[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([tiles[0], sep, tiles[1]], axis=0)
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
