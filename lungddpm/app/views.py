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
    """Source row of each display row when ``n`` rows of ``voxel_mm`` are drawn at ``pixel_mm`` per pixel; never
    fewer display rows than source rows, so that every source row is drawn (and can be clicked)."""
    rows = max(n, 1, round(n * voxel_mm / pixel_mm))
    return np.minimum((np.arange(rows) * n) // rows, n - 1)


def _display_axes(plane: str, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Source row and column of each display row and column of ``plane`` of a [K, I, J] volume: both drawn at the
    finer of the two spacings, so that the proportions are true and every row and column is drawn."""
    k, i, j = shape
    n_rows, n_cols = {"axial": (i, j), "coronal": (k, j), "sagittal": (k, i)}[plane]
    row_mm, col_mm = _row_spacing(plane, spacing)
    pixel_mm = min(row_mm, col_mm)
    return display_rows(n_rows, row_mm, pixel_mm), display_rows(n_cols, col_mm, pixel_mm)


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
    """One plane of the CT [K, I, J] with the label map and a cursor cross, stretched to true proportions."""
    rows, cols = _display_axes(plane, ct.shape, spacing)
    pick = np.ix_(rows, cols)
    img = overlay(window_rgb(_plane(ct, plane, cursor)[pick], window), _plane(labels, plane, cursor)[pick], show_lung)
    k, i, j = cursor
    n_rows = _plane(ct, plane, cursor).shape[0]
    src_row = {"axial": i, "coronal": n_rows - 1 - k, "sagittal": n_rows - 1 - k}[plane]
    src_col = {"axial": j, "coronal": j, "sagittal": i}[plane]
    r, c = np.flatnonzero(rows == src_row), np.flatnonzero(cols == src_col)
    gap = 6  # the cross leaves the site itself visible
    if r.size and c.size:
        y, col = int(r[r.size // 2]), int(c[c.size // 2])  # one display row and column, the middle of the voxel's
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
    rows, cols = _display_axes(plane, shape, spacing)
    n_rows = {"axial": shape[1], "coronal": shape[0], "sagittal": shape[0]}[plane]
    src = int(rows[min(max(int(y), 0), rows.size - 1)])
    col = int(cols[min(max(int(x), 0), cols.size - 1)])
    if plane == "axial":
        i, j = src, col
    elif plane == "coronal":
        k, j = n_rows - 1 - src, col
    else:
        k, i = n_rows - 1 - src, col
    return (min(max(k, 0), shape[0] - 1), min(max(i, 0), shape[1] - 1), min(max(j, 0), shape[2] - 1))


def roi_panel(
    before: np.ndarray, after: np.ndarray, layout: np.ndarray, nodule: np.ndarray | None = None, zoom: int = 6
) -> np.ndarray:
    """The ROI magnified ``zoom`` x: rows axial / coronal through the centre of ``nodule`` (bool: the new nodule;
    default every nodule of ``layout``), columns before, after, after with the edited layout -> RGB uint8."""
    nod = layout == NODULE if nodule is None else np.asarray(nodule, bool)
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
