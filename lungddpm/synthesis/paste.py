"""Paste a generated ROI region back into the full CT on its native grid, and the native label map.

Only the generated region changes: its weight (1 deep inside, falling to 0 over ``feather_mm`` towards its
boundary, 0 outside) is interpolated from the ROI grid at every native voxel whose nearest ROI voxel is generated
(0 at every other, so nothing beyond the generated region moves), and is 1 at every native voxel the new nodule's
label covers (interpolated, a labelled rim voxel between a nodule voxel and a feathered one kept 5-15 % of the
source); a native voxel with weight 0 keeps its source value bit for bit, the others become
``round(w * generated + (1 - w) * source)``. The new nodule's native label follows the rule of every nodule label:
the native voxels it covers by at least a fraction, and its centroid's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..data.nodules import Nodule, paint
from ..io import Geometry
from ..preprocessing.grid import SliceGrid, round_half_up
from ..preprocessing.layout import LUNG, NODULE


@dataclass(frozen=True)
class NativeBox:
    """The native voxels whose centres fall inside an ROI's extent: slices of the native [K, I, J] array and
    the fractional ROI indices (z, y, x) of each of them."""

    slices: tuple[slice, slice, slice]
    roi_index: np.ndarray  # float64 [k, i, j, 3]


def native_box(grid: SliceGrid, shape: Sequence[int], roi: Geometry, size: int) -> NativeBox | None:
    """The native voxels inside the ROI ``roi`` (``size``^3); None when the ROI misses the scan."""
    corners = roi.index_to_world(np.array([[0, 0, 0], [size - 1] * 3], float))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    zs = grid.z_positions
    k = np.flatnonzero((zs >= lo[2] - 1e-6) & (zs <= hi[2] + 1e-6))
    i0 = max(0, int(np.ceil((lo[1] - grid.y0) / grid.row_spacing - 1e-9)))
    i1 = min(int(shape[1]) - 1, int(np.floor((hi[1] - grid.y0) / grid.row_spacing + 1e-9)))
    j0 = max(0, int(np.ceil((lo[0] - grid.x0) / grid.col_spacing - 1e-9)))
    j1 = min(int(shape[2]) - 1, int(np.floor((hi[0] - grid.x0) / grid.col_spacing + 1e-9)))
    if k.size == 0 or i1 < i0 or j1 < j0:
        return None
    kk, ii, jj = np.meshgrid(k, np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
    world = np.stack([grid.x0 + jj * grid.col_spacing, grid.y0 + ii * grid.row_spacing, zs[kk]], -1)
    idx = roi.world_to_index(world.reshape(-1, 3)).reshape(*world.shape)
    return NativeBox((slice(int(k[0]), int(k[-1]) + 1), slice(i0, i1 + 1), slice(j0, j1 + 1)), idx)


def feather_weight(generated: np.ndarray, spacing_mm: float, feather_mm: float) -> np.ndarray:
    """Paste weight [D, H, W] on the ROI grid: 0 outside ``generated``, rising linearly with the depth inside it
    (distance to the nearest kept voxel, minus half a voxel) to 1 at ``feather_mm``; a hard 0/1 for 0."""
    if feather_mm <= 0:
        return generated.astype(np.float32)
    depth = ndi.distance_transform_edt(generated, sampling=spacing_mm) - spacing_mm / 2
    return np.clip(depth / feather_mm, 0.0, 1.0).astype(np.float32) * generated


def _at(volume: np.ndarray, idx: np.ndarray, order: int) -> np.ndarray:
    flat = idx.reshape(-1, 3).T
    return ndi.map_coordinates(volume, flat, order=order, mode="constant", cval=0.0).reshape(idx.shape[:-1])


def paste_back(
    native: np.ndarray, box: NativeBox, generated_hu: np.ndarray, weight: np.ndarray, whole: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Blend ``generated_hu`` (the ROI after inpainting, [n, n, n] HU) into ``native`` [K, I, J] in place through
    ``weight`` (:func:`feather_weight`), interpolated onto the native voxels; a 0/1 weight (``feather_mm`` 0) is taken
    nearest-neighbour: a hard paste. ``whole`` (bool [k, i, j], the box's native voxels labelled as the new nodule:
    :func:`nodule_in_box`) takes weight 1, so that every voxel the label map calls the new nodule is wholly generated.
    Returns (the native weights in the box, the number of voxels whose value changed)."""
    inside = nearest_in_box(box, weight > 0)
    if np.isin(weight, (0.0, 1.0)).all():
        w = inside.astype(np.float32)
    else:
        w = np.clip(_at(weight.astype(np.float32), box.roi_index, 1), 0.0, 1.0)
        w[(w < 1e-6) | ~inside] = 0.0  # interpolation reaches a voxel past the region: not there
    if whole is not None:
        w[whole] = 1.0
    gen = _at(generated_hu.astype(np.float32), box.roi_index, 1)
    region = native[box.slices]
    mixed = np.round(w * gen + (1 - w) * region.astype(np.float32)).astype(native.dtype)
    changed = (w > 0) & (mixed != region)
    region[changed] = mixed[changed]
    return w, int(changed.sum())


def paste_nodule(
    native: np.ndarray,
    labels: np.ndarray,
    box: NativeBox,
    grid: SliceGrid,
    roi: Geometry,
    nodule: np.ndarray,
    generated: np.ndarray,
    generated_hu: np.ndarray,
    feather_mm: float,
    fraction: float,
) -> int:
    """Paste an inpainted ROI (``generated_hu`` [n, n, n] on ``roi``; its ``generated`` region feathered over
    ``feather_mm``) into ``native`` and label its new ``nodule`` in ``labels`` (both [K, I, J] on ``grid``, in place):
    the lesion run's and the studio's one insertion, every labelled voxel at weight 1 (:func:`nodule_in_box` at
    ``fraction``, :func:`paste_back`). Returns the number of native voxels whose value changed."""
    new = nodule_in_box(box, grid, roi, nodule, fraction)
    weight = feather_weight(generated, float(roi.spacing[0]), feather_mm)
    _, changed = paste_back(native, box, generated_hu, weight, whole=new)
    labels[box.slices][new] = NODULE
    return changed


def nearest_in_box(box: NativeBox, roi_mask: np.ndarray) -> np.ndarray:
    """``roi_mask`` [n, n, n] looked up nearest-neighbour at the box's native voxels -> bool [k, i, j]; a native
    voxel halfway between two ROI voxels takes the upper one (half up, as :func:`lungddpm.preprocessing.grid.coverage`
    rounds: ``np.round``'s half to even made a hard paste's extent depend on the region's index parity)."""
    idx = round_half_up(box.roi_index)
    inside = np.all((idx >= 0) & (idx < np.asarray(roi_mask.shape)), axis=-1)
    out = np.zeros(idx.shape[:-1], bool)
    out[inside] = roi_mask[tuple(idx[inside].T)]
    return out


def nodule_in_box(box: NativeBox, grid: SliceGrid, roi: Geometry, nodule: np.ndarray, fraction: float) -> np.ndarray:
    """The native voxels of ``box`` (on ``grid``, regular slices) that the ROI ``nodule`` [n, n, n] (on ``roi``)
    covers by at least ``fraction``, and the voxel of each of its components' centroids -> bool [k, i, j]: a thin
    nodule between two native slices is not lost (a nearest-neighbour lookup could miss it whole)."""
    from ..data.nodules import components
    from ..preprocessing.grid import nodule_labels

    k, i, j = (sl.start for sl in box.slices)
    shape = tuple(sl.stop - sl.start for sl in box.slices)
    roi_grid = SliceGrid.of_regular(roi, nodule.shape[0])
    nods = components(nodule, tuple(float(v) for v in roi.spacing))
    labels, _ = nodule_labels(nods, roi_grid, grid.crop(k, i, j, shape[0]).geometry(), shape, fraction)
    return labels > 0


def native_labels(
    shape: Sequence[int], grid: SliceGrid, lung_fine: np.ndarray, fine: Geometry, nodules: Sequence[Nodule]
) -> np.ndarray:
    """Label map 0/1/2 on the native grid: the fine lung mask looked up nearest-neighbour per axis, the consensus
    nodules at their native masks (nodules are lung too). The fine grid ends up to a fine step short of the series'
    far edges (:func:`lungddpm.preprocessing.grid.fine_geometry`): native voxels there take its last voxel."""
    _, i, j = (int(n) for n in shape)
    fz = round_half_up((grid.z_positions - fine.origin[2]) / fine.spacing[0])  # ties up: a lung slab kept its extent
    fy = round_half_up((grid.y0 + np.arange(i) * grid.row_spacing - fine.origin[1]) / fine.spacing[1])
    fx = round_half_up((grid.x0 + np.arange(j) * grid.col_spacing - fine.origin[0]) / fine.spacing[2])
    ok = [(f >= 0) & (f <= n) for f, n in zip((fz, fy, fx), lung_fine.shape)]  # n: within its last step
    lung = lung_fine[np.clip(fz, 0, lung_fine.shape[0] - 1)][:, np.clip(fy, 0, lung_fine.shape[1] - 1)][
        :, :, np.clip(fx, 0, lung_fine.shape[2] - 1)
    ].astype(bool, copy=False)
    lung &= ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]
    return paint(lung.view(np.uint8) * np.uint8(LUNG), nodules, NODULE)  # uint8 throughout (np.where made int64)


def seam_gradient_ratio(
    volume: np.ndarray, spacing: Sequence[float], weight: np.ndarray, box: NativeBox, lung: np.ndarray
) -> float:
    """Mean gradient magnitude (HU/mm) across the paste boundary — native voxels of the box with 0 < w < 1 or
    touching the changed region — over the same statistic in unedited lung of the case (lung voxels outside the
    box). A cube edge or a hard seam makes it large; a seamless paste keeps it near 1."""
    grads = np.gradient(volume.astype(np.float32), *spacing)
    mag = np.sqrt(sum(g**2 for g in grads))
    changed = weight > 0
    shell = ndi.binary_dilation(changed, iterations=1) & ~ndi.binary_erosion(changed, iterations=1)
    seam = float(mag[box.slices][shell].mean())
    outside = lung.copy()
    outside[box.slices] = False
    return seam / float(mag[outside].mean())
