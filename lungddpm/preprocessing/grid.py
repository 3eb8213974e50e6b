"""Grids and resampling: a series of possibly irregular slices (:class:`SliceGrid`) sampled onto axis-aligned grids
(anti-aliased, cropped to what the target reaches), nodule masks as coverage fractions and instance labels on a
coarse grid. :mod:`lungddpm.preprocessing.preprocess` puts them together into a case's model-grid volumes.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from ..data.dicom import DicomSeries
from ..data.labels import MAX_NODULES
from ..data.nodules import Nodule
from ..errors import LayoutError
from ..io import IDENTITY_DIRECTION, Geometry

log = logging.getLogger(__name__)

BEYOND = -1e6  # the slice index of a point beyond a series' slices: far outside, so sampling gives the fill value


@dataclass(frozen=True)
class SliceGrid:
    """Geometry of an axial series whose slices may be irregularly spaced: voxel [k, i, j] sits at LPS
    (x0 + j * col_spacing, y0 + i * row_spacing, z_positions[k])."""

    z_positions: np.ndarray  # [Z] ascending mm
    row_spacing: float
    col_spacing: float
    x0: float
    y0: float
    z_step: float = 0.0  # slice spacing (mm) where the slices cannot tell it: a one-slice grid (0: 1 mm)

    @classmethod
    def of_series(cls, series: DicomSeries) -> SliceGrid:
        return cls(series.z_positions, series.pixel_spacing[0], series.pixel_spacing[1], *series.origin_xy)

    @classmethod
    def of_regular(cls, geometry: Geometry, n_slices: int) -> SliceGrid:
        """The grid of ``n_slices`` slices of a regular, axis-aligned ``geometry`` (another direction is refused)."""
        if not np.allclose(geometry.direction, IDENTITY_DIRECTION, atol=1e-5):
            raise LayoutError(f"a grid of direction {geometry.direction} is not LPS-ordered (identity direction); "
                              "resample it first")  # fmt: skip
        zs = geometry.origin[2] + np.arange(n_slices) * geometry.spacing[0]
        return cls(zs, geometry.spacing[1], geometry.spacing[2], geometry.origin[0], geometry.origin[1],
                   float(geometry.spacing[0]))  # fmt: skip

    @property
    def slice_step(self) -> float:
        """The (median) slice spacing, mm: from the slices, else ``z_step``, else 1."""
        zs = self.z_positions
        return float(np.median(np.diff(zs))) if zs.size > 1 else (self.z_step or 1.0)

    def geometry(self) -> Geometry:
        """The axis-aligned geometry of this grid: voxel [0, 0, 0] at its origin, the slices ``slice_step`` apart
        (exact for regularly spaced slices)."""
        return Geometry(spacing=(self.slice_step, self.row_spacing, self.col_spacing),
                        origin=(self.x0, self.y0, float(self.z_positions[0])))  # fmt: skip

    def world_to_index(self, world_xyz: np.ndarray, flag_beyond: bool = True) -> np.ndarray:
        """[N, 3] LPS (x, y, z) -> [N, 3] fractional (k, i, j); points beyond the slices get k = :data:`BEYOND`
        (``flag_beyond``) or the nearest slice's k."""
        w = np.asarray(world_xyz, dtype=np.float64)
        zs = self.z_positions
        k = np.interp(w[:, 2], zs, np.arange(zs.size, dtype=np.float64))
        if flag_beyond:  # a slice holds half a slice spacing either side of its centre
            half = self.slice_step / 2
            k[(w[:, 2] < zs[0] - half) | (w[:, 2] > zs[-1] + half)] = BEYOND
        return np.stack([k, (w[:, 1] - self.y0) / self.row_spacing, (w[:, 0] - self.x0) / self.col_spacing], 1)

    def crop(self, k0: int, i0: int, j0: int, nk: int) -> SliceGrid:
        """The ``nk`` slices from ``k0``, rows from ``i0``, columns from ``j0``; a one-slice crop keeps the
        series' slice spacing (a nodule drawn on one slice is a slice thick, not 1 mm)."""
        return replace(
            self,
            z_positions=self.z_positions[k0 : k0 + nk],
            x0=self.x0 + j0 * self.col_spacing,
            y0=self.y0 + i0 * self.row_spacing,
            z_step=self.slice_step,
        )


def grid_geometry(centre_xyz: np.ndarray, spacing: tuple[float, float, float], size: tuple[int, int, int]) -> Geometry:
    """Axis-aligned grid of ``size`` (z, y, x) voxels at ``spacing`` (z, y, x) mm centred on LPS ``centre_xyz``."""
    half = (np.asarray(size[::-1], dtype=float) - 1) / 2 * np.asarray(spacing[::-1])
    return Geometry(spacing=tuple(float(s) for s in spacing), origin=tuple(float(v) for v in centre_xyz - half))


def grid_points(geometry: Geometry, size: tuple[int, int, int]) -> np.ndarray:
    """World (x, y, z) of every voxel centre of a ``size`` grid, C order -> [prod(size), 3]."""
    idx = np.indices(size, dtype=np.float64).reshape(3, -1).T
    return geometry.index_to_world(idx)


def axis_points(geometry: Geometry, size: tuple[int, int, int]) -> np.ndarray | None:
    """For an axis-aligned ``geometry``, world (x, y, z) along each axis -> [max(size), 3]: row n holds the x of
    column n, the y of row n and the z of slice n (past an axis's size, unused). Each value is bit-identical to
    :func:`grid_points`' (the direction's zeros add exact zeros), at the cost of one row per voxel edge rather than
    one per voxel. None for an oblique ``geometry``."""
    if not np.array_equal(geometry.direction, IDENTITY_DIRECTION):
        return None
    return geometry.index_to_world(np.repeat(np.arange(max(size), dtype=np.float64)[:, None], 3, axis=1))


def resample(
    volume: np.ndarray,
    grid: SliceGrid,
    target: Geometry,
    size: tuple[int, int, int],
    order: int,
    fill: float,
    antialias: bool = True,
    crop: bool = True,
) -> np.ndarray:
    """Sample ``volume`` [K, I, J] (on ``grid``) at the voxel centres of ``target`` -> float32 ``size`` (z, y, x).

    ``antialias`` low-passes before downsampling: block averages in-plane, then a Gaussian of sigma
    (factor - 1) / 2 voxels per axis, so a 0.7 mm CT becomes a clean 10 mm grid and a mask a coverage fraction.
    ``crop`` filters only the part of ``volume`` the target reaches (its filter and interpolation support
    included): the same values, much faster for an ROI of a whole CT. Target voxels outside the field of view (more
    than half a pixel or half a slice beyond the edge voxels) get ``fill``; inside it, the edge values extend.
    """
    block, sigma = 1, [0.0, 0.0, 0.0]
    if antialias:
        block = max(1, int(min(target.spacing[1] / grid.row_spacing, target.spacing[2] / grid.col_spacing)))
        if min(volume.shape[1:]) < block:
            block = 1
        dz = float(np.median(np.diff(grid.z_positions))) if grid.z_positions.size > 1 else target.spacing[0]
        steps = (dz, grid.row_spacing * block, grid.col_spacing * block)
        sigma = [max(0.0, (t / d - 1) / 2) for t, d in zip(target.spacing, steps)]
        if max(sigma) <= 0.05:
            sigma = [0.0, 0.0, 0.0]
    axes = axis_points(target, size)  # an axis-aligned target: per-axis coordinates, broadcast at the end
    points = grid_points(target, size) if axes is None else axes
    full = grid.world_to_index(points)  # on the whole volume: k is BEYOND beyond its slices
    n_i, n_j = volume.shape[1:3]
    # per axis (k, i, j): beyond the slices, or the FOV, which ends half a pixel past the edge pixels
    beyond = (full[:, 0] == BEYOND, np.abs(full[:, 1] - (n_i - 1) / 2) > n_i / 2,
              np.abs(full[:, 2] - (n_j - 1) / 2) > n_j / 2)  # fmt: skip
    k0 = 0
    ranges = _support(grid, target, size, volume.shape, block, sigma) if crop else None
    if ranges and any(r != (0, n) for r, n in zip(ranges, volume.shape)):
        (k0, k1), (i0, i1), (j0, j1) = ranges
        volume = volume[k0:k1, i0:i1, j0:j1]
        grid = grid.crop(k0, i0, j0, k1 - k0)
    vol = np.asarray(volume, dtype=np.float32)
    if block > 1:  # a trailing partial block is padded with its edge values: the FOV's edge keeps its own values
        k, i, j = vol.shape
        i2, j2 = -(-i // block) * block, -(-j // block) * block
        vol = np.pad(vol, ((0, 0), (0, i2 - i), (0, j2 - j)), mode="edge")
        vol = vol.reshape(k, i2 // block, block, j2 // block, block).mean(axis=(2, 4))
        grid = replace(
            grid,
            row_spacing=grid.row_spacing * block,
            col_spacing=grid.col_spacing * block,
            x0=grid.x0 + (block - 1) / 2 * grid.col_spacing,
            y0=grid.y0 + (block - 1) / 2 * grid.row_spacing,
        )
    if max(sigma) > 0:
        vol = ndi.gaussian_filter(vol, sigma=sigma, mode="nearest")
    idx = grid.world_to_index(points, flag_beyond=False)
    idx[:, 0] = full[:, 0] - k0  # the whole volume's slice positions, as the crop's slices
    if axes is None:
        outside, coords = beyond[0] | beyond[1] | beyond[2], idx.T
    else:  # k from the slice's z, i from the row's y, j from the column's x
        nz, ny, nx = size
        outside = beyond[0][:nz, None, None] | beyond[1][None, :ny, None] | beyond[2][None, None, :nx]
        coords = np.empty((3, *size))
        coords[0], coords[1], coords[2] = idx[:nz, 0, None, None], idx[None, :ny, 1, None], idx[None, None, :nx, 2]
    coords[:, outside] = 0.0  # filled below
    out = ndi.map_coordinates(vol, coords, order=order, mode="nearest", prefilter=False)
    out[outside] = fill
    return out.reshape(size).astype(np.float32)


def _support(
    grid: SliceGrid,
    target: Geometry,
    size: tuple[int, int, int],
    shape: tuple[int, ...],
    block: int,
    sigma: list[float],
) -> tuple[tuple[int, int], ...]:
    """Per axis (k, i, j), the index range [start, stop) of a ``shape`` volume on ``grid`` that sampling it at the
    voxel centres of ``target`` reads: their span (from the target's corners, clamped to the volume: points beyond
    it read its edge), grown by the Gaussian's radius (scipy's 4 sigma) and the interpolation's support, in-plane
    in whole blocks from the volume's first voxel (so the blocks are the whole volume's)."""
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in size])), dtype=np.float64)
    idx = grid.world_to_index(target.index_to_world(corners), flag_beyond=False)
    last = np.asarray(shape[:3], dtype=np.float64) - 1
    lo, hi = np.clip(idx.min(axis=0), 0, last), np.clip(idx.max(axis=0), 0, last)
    ranges = []
    for axis in range(3):
        b = 1 if axis == 0 else block
        reach = (int(4.0 * sigma[axis] + 0.5) + 2) * b + b  # in voxels of the unblocked volume
        start = max(0, int(np.floor(lo[axis])) - reach) // b * b
        stop = min(shape[axis], int(np.ceil(hi[axis])) + reach + 1)
        if stop < shape[axis]:
            stop = min(shape[axis], start + -(-(stop - start) // b) * b)
        ranges.append((start, stop))
    return tuple(ranges)


def resample_regular(
    volume: np.ndarray,
    source: Geometry,
    target: Geometry,
    size: tuple[int, int, int],
    order: int,
    fill: float,
    antialias: bool = True,
) -> np.ndarray:
    """Like :func:`resample` for a source on a regular, axis-aligned grid."""
    return resample(volume, SliceGrid.of_regular(source, volume.shape[0]), target, size, order, fill, antialias)


def fine_geometry(
    grid: SliceGrid, shape: tuple[int, int, int], spacing_mm: float
) -> tuple[Geometry, tuple[int, int, int]]:
    """Isotropic grid covering the whole series at ``spacing_mm``."""
    extent = np.array(
        [
            grid.z_positions[-1] - grid.z_positions[0],
            (shape[1] - 1) * grid.row_spacing,
            (shape[2] - 1) * grid.col_spacing,
        ]
    )
    size = tuple(int(n) for n in np.floor(extent / spacing_mm).astype(int) + 1)
    geometry = Geometry(spacing=(spacing_mm,) * 3, origin=(grid.x0, grid.y0, float(grid.z_positions[0])))
    return geometry, size  # type: ignore[return-value]


def round_half_up(index: np.ndarray) -> np.ndarray:
    """Fractional voxel indices -> int, a tie to the upper voxel (``np.round``'s ties to even favoured even voxels,
    so a region's extent depended on its index parity)."""
    return np.floor(np.asarray(index) + 0.5).astype(int)


def coverage(
    mask: np.ndarray, grid: SliceGrid, target: Geometry, size: tuple[int, int, int], subsamples: int = 5
) -> np.ndarray:
    """Fraction of each ``target`` voxel covered by ``mask`` [K, I, J] (on ``grid``) -> float32 ``size``.

    Each voxel is probed at ``subsamples``^3 points looked up nearest-neighbour in the mask: an exact-in-the-limit
    area fraction, with no blur, so a nodule keeps its volume and position on coarse grids.
    """
    out = np.zeros(size, dtype=np.float32)
    nz = np.argwhere(mask)
    if nz.size == 0:
        return out
    lo, hi = nz.min(axis=0), nz.max(axis=0)
    nk = grid.z_positions.size

    def z_of(k: int) -> float:  # beyond the end slices, whole slices on (np.interp would clamp to the end slice)
        return float(np.interp(k, np.arange(nk), grid.z_positions)) + (k - min(max(k, 0), nk - 1)) * grid.slice_step

    corners = np.array(
        [
            [grid.x0 + j * grid.col_spacing, grid.y0 + i * grid.row_spacing, z_of(k)]
            for k in (lo[0] - 1, hi[0] + 1)
            for i in (lo[1] - 1, hi[1] + 1)
            for j in (lo[2] - 1, hi[2] + 1)
        ]
    )
    tidx = target.world_to_index(corners)
    first = np.clip(np.floor(tidx.min(axis=0) - 0.5).astype(int), 0, np.asarray(size))
    last = np.clip(np.ceil(tidx.max(axis=0) + 0.5).astype(int) + 1, 0, np.asarray(size))
    if np.any(last <= first):
        return out
    block = tuple(int(n) for n in last - first)
    offsets = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    voxels = np.indices(block, dtype=np.float64).reshape(3, -1).T + first
    sub = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)
    points = (voxels[:, None, :] + sub[None]).reshape(-1, 3)
    src = round_half_up(grid.world_to_index(target.index_to_world(points)))  # a probe on a boundary: the upper voxel
    inside = np.all((src >= 0) & (src < np.asarray(mask.shape)), axis=1)
    hit = np.zeros(len(src), dtype=bool)
    hit[inside] = mask[tuple(src[inside].T)]
    out[first[0] : last[0], first[1] : last[1], first[2] : last[2]] = (
        hit.reshape(-1, sub.shape[0]).mean(1).reshape(block)
    )
    return out


def nodule_labels(
    nodules: list[Nodule],
    grid: SliceGrid,
    target: Geometry,
    size: tuple[int, int, int],
    min_fraction: float,
) -> tuple[np.ndarray, list[int]]:
    """Instance labels (1..n, in ``nodules`` order) on the model grid -> (uint8 ``size``, voxels per nodule).

    A voxel is nodule ``n`` when nodule ``n`` covers at least ``min_fraction`` of it (:func:`coverage`); each
    non-empty nodule keeps at least the voxel holding its centroid, so small nodules survive coarse grids.
    Later nodules win overlaps.
    """
    if len(nodules) > MAX_NODULES:
        raise LayoutError(f"{len(nodules)} nodules: at most {MAX_NODULES} fit the model grid's uint8 labels; merge or "
                          "drop some")  # fmt: skip
    labels = np.zeros(size, dtype=np.uint8)
    for n, nod in enumerate(nodules, start=1):
        if not nod.mask.any():
            continue
        local = grid.crop(nod.offset[0], nod.offset[1], nod.offset[2], nod.mask.shape[0])
        mine = coverage(nod.mask, local, target, size) >= min_fraction
        c = round_half_up(target.world_to_index(nodule_centroid_world(nod, grid)[None])[0])  # as coverage
        if all(0 <= c[a] < size[a] for a in range(3)):
            mine[tuple(c)] = True
        labels[mine] = n
    counts = [int((labels == n).sum()) for n in range(1, len(nodules) + 1)]
    return labels, counts


def nodule_centroid_world(nod: Nodule, grid: SliceGrid) -> np.ndarray:
    k, i, j = nod.centroid_index
    z = float(np.interp(k, np.arange(grid.z_positions.size), grid.z_positions))
    return np.array([grid.x0 + j * grid.col_spacing, grid.y0 + i * grid.row_spacing, z])
