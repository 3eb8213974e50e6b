"""Procedural chest CT ("phantom") at the geometry of a real LIDC scan, with nodules at real consensus masks,
written as a DICOM CT series that a normal loader reads like a real LIDC series.

Anatomy is a set of approximate signed-distance shapes in LPS millimetres (patient centred near x = 0, +y
posterior, +z superior), composed as partial-volume occupancies ``clip(0.5 - d / h, 0, 1)`` on a coarse grid
(in-plane ``coarse_factor`` x the pixel spacing, z at the slice positions or a coarse uniform grid), then
upsampled to the full matrix by separable linear interpolation, with the scanner blur folded into the same
matrices. The true lung mask is the same lung occupancy upsampled without blur and thresholded at 0.5, so its
border is where the image crosses half-way between lung and soft tissue. Cranio-caudal positions are fractions
of the scan's z range; in-plane sizes scale with the body, whose half-width is ``min(170 mm, 0.46 * FOV)``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage, special

from ..errors import ConfigError, DicomError

log = logging.getLogger(__name__)

_FAR = np.float32(1.0e4)  # "no shape here" distance (mm)
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["lungddpm phantom DICOM writer"])
_CHUNK_SLICES = 8  # slices per block when upsampling / adding noise (bounds the temporary memory)


# ---------------------------------------------------------------------------------------------------------------
# Public configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScanGeometry:
    """Geometry of one LIDC series. Pixel (row i, col j) of slice k lies at LPS
    ``(x0 + j * ps, y0 + i * ps, slice_zvals[k])`` with ``x0 = -ps * cols / 2``, ``y0 = -ps * rows / 2``."""

    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float  # mm, rows and columns
    slice_zvals: np.ndarray  # [Z] ascending z (mm, +z superior), possibly irregular
    slice_thickness: float
    rows: int = 512
    cols: int = 512

    def __post_init__(self) -> None:
        z = np.array(self.slice_zvals, dtype=np.float64).reshape(-1)
        if z.size == 0 or not np.all(np.isfinite(z)) or np.any(np.diff(z) <= 0):
            raise ConfigError(
                f"{self.patient_id}: slice_zvals must be a non-empty, strictly ascending list of z "
                "positions (mm); sort the slices by z and drop duplicates"
            )
        if not self.pixel_spacing > 0 or self.rows < 8 or self.cols < 8:
            raise ConfigError(
                f"{self.patient_id}: pixel_spacing {self.pixel_spacing} mm, rows {self.rows}, cols "
                f"{self.cols}: need a positive spacing and at least 8x8 pixels"
            )
        z.setflags(write=False)
        object.__setattr__(self, "slice_zvals", z)

    @property
    def x0(self) -> float:
        return -self.pixel_spacing * self.cols / 2

    @property
    def y0(self) -> float:
        return -self.pixel_spacing * self.rows / 2

    @property
    def fov_mm(self) -> float:
        """Diameter of the circular reconstruction field of view."""
        return self.pixel_spacing * min(self.rows, self.cols)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slice_zvals), self.rows, self.cols)


@dataclass(frozen=True, eq=False)
class NoduleSpec:
    """One nodule: a boolean mask in a local box of the full ``[Z, Y, X]`` volume."""

    mask: np.ndarray  # bool [z, y, x] local box
    offset: tuple[int, int, int]  # (k0, i0, j0): full-volume index of mask[0, 0, 0]
    texture: int  # LIDC texture 1 (ground glass) .. 5 (solid), median of the readers

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim != 3:
            raise ConfigError(f"nodule mask has shape {mask.shape}; expected a [Z, Y, X] box")
        if int(self.texture) not in range(1, 6):
            raise ConfigError(f"nodule texture {self.texture} outside 1..5 (LIDC rating)")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "offset", tuple(int(o) for o in self.offset))
        object.__setattr__(self, "texture", int(self.texture))


@dataclass(frozen=True)
class PhantomConfig:
    """Every constant of the phantom. Anatomical lengths in mm at a body half-width of ``body_half_width_mm``
    (they scale with smaller bodies; scanner, table, nodule, minimal radii and segment-length constants do not),
    HU values, cranio-caudal positions as fractions of the scan's z range (``*_frac``, 0 = top slice) or of the
    lung height (apex to the mean dome height, ``*_lung_frac``)."""

    # scanner
    noise_hu: float = 20.0  # std of the (spatially correlated) image noise
    blur_mm: float = 1.0  # Gaussian sigma of the reconstruction blur
    coarse_factor: int = 4  # anatomy grid = coarse_factor x pixel spacing in-plane ...
    coarse_max_mm: float = 4.0  # ... reduced so that the grid step stays below this (coarse pixels)
    # HU
    air_hu: float = -1000.0
    table_hu: float = 200.0
    skin_hu: float = 20.0
    fat_hu: float = -100.0
    muscle_hu: float = 50.0
    mediastinum_hu: float = 40.0  # mediastinal / neck / upper-abdominal soft tissue
    mediastinal_fat_hu: float = -90.0  # pericardial fat and the sheath of the great vessels
    heart_hu: float = 40.0
    great_vessel_hu: float = 45.0
    liver_hu: float = 60.0
    bone_cortex_hu: float = 700.0
    bone_marrow_hu: float = 250.0
    cartilage_hu: float = 120.0
    disc_hu: float = 80.0
    spinal_canal_hu: float = 20.0
    lung_hu: float = -850.0
    lung_gravity_hu: float = 50.0  # posterior minus anterior lung HU
    lung_texture_hu: float = 15.0  # peak amplitude (about 2 std) of the low-frequency lung texture
    lung_texture_mm: float = 10.0  # correlation length (Gaussian sigma) of that texture
    lung_vessel_hu: float = 40.0
    airway_wall_hu: float = 50.0
    # body (mm at full size)
    body_half_width_mm: float = 170.0
    body_fov_fraction: float = 0.46  # body half-width <= this fraction of the FOV diameter
    body_fov_fraction_max: float = 0.49  # ... widened up to this so every nodule lies inside the rib cage
    nodule_cavity_margin_mm: float = 4.0  # a nodule centre must lie this deep inside the rib cage
    body_aspect: float = 0.65  # AP half-depth / half-width
    body_y_offset_mm: float = 10.0  # body centre posterior of the image centre
    skin_mm: float = 2.0
    fat_mm: float = 12.0
    muscle_mm: float = 10.0
    back_muscle_mm: float = 25.0  # extra muscle depth at the back (erector spinae)
    pleural_gap_mm: float = 1.0
    table_gap_mm: float = 12.0
    table_thickness_mm: float = 8.0
    table_radius_mm: float = 600.0  # radius of curvature of the table's cradle
    # bones
    rib_thickness_mm: float = 8.0
    rib_height_mm: float = 11.0
    rib_count: int = 12
    rib_pitch_lung_frac: float = 0.1  # posterior rib spacing / lung height
    rib_drop_lung_frac: float = 0.3  # how much lower a rib's anterior end lies than its posterior end
    cortex_mm: float = 1.5
    vertebra_radius_mm: float = 18.0
    vertebra_y_frac: float = 0.42  # vertebral body centre: body centre + this x AP half-depth
    disc_height_mm: float = 6.0
    sternum_half_width_mm: float = 14.0
    sternum_half_depth_mm: float = 5.0
    # cranio-caudal layout (fractions of the scan's z range, from the top slice)
    apex_frac: float = 0.05
    dome_right_frac: float = 0.72
    dome_left_frac: float = 0.77
    recess_frac: float = 0.86  # posterior costophrenic recess
    apex_taper_lung_frac: float = 0.6  # the lung reaches its full cross-section this far below the apex
    carina_lung_frac: float = 0.4
    diaphragm_mm: float = 4.0
    # airways
    trachea_radius_mm: float = 9.0  # lumen
    trachea_wall_mm: float = 2.0
    bronchus_radius_mm: float = 6.0  # main bronchi, lumen
    bronchus_wall_mm: float = 1.5
    airway_root_radius_mm: float = 4.0  # lobar bronchi, lumen
    airway_min_radius_mm: float = 1.2
    airway_max_generations: int = 5
    airway_wall_fraction: float = 0.2  # wall thickness / lumen radius of intrapulmonary airways
    airway_wall_min_mm: float = 0.8
    # heart and vessels
    heart_semi_axes_mm: tuple[float, float] = (62.0, 48.0)  # x, y; z semi-axis = heart_height_lung_frac
    heart_height_lung_frac: float = 0.35
    heart_x_mm: float = 18.0
    pericardial_fat_mm: float = 3.0
    mediastinum_half_width_mm: float = 30.0
    vessel_root_radius_mm: float = 6.0
    vessel_min_radius_mm: float = 1.0
    vessel_max_segments: int = 1500  # per lung and tree family (arteries, veins, airways)
    branch_taper_major: float = 0.87  # child / parent radius, larger child
    branch_taper_minor: float = 0.72  # child / parent radius, smaller child
    branch_angle_major_deg: tuple[float, float] = (8.0, 25.0)
    branch_angle_minor_deg: tuple[float, float] = (30.0, 60.0)
    segment_length_base_mm: float = 5.0
    segment_length_per_radius: float = 3.0  # segment length = base + this x radius
    tree_margin_mm: float = 1.5  # a branch's end stays this far inside the lung (beyond its radius)
    tree_candidates: int = 8  # directions tried per branch to stay inside the lung ...
    tree_max_detour_deg: float = 45.0  # ... deviating from the planned one by up to this angle
    segment_length_jitter: float = 0.2  # relative random variation of segment lengths
    # nodules
    nodule_texture_hu: tuple[float, float, float, float, float] = (-600.0, -450.0, -500.0, -50.0, 30.0)
    part_solid_core_hu: float = 20.0
    part_solid_core_fraction: float = 0.5  # core = voxels deeper than this fraction of the maximal depth
    nodule_edge_mm: float = 0.5  # Gaussian sigma of the painted nodule edge
    nodule_lung_margin_mm: float = 5.0  # lung added around each nodule


@dataclass(frozen=True)
class DicomQuirks:
    """How the pixel data of a series is stored (vendor habits that a loader must cope with)."""

    signed: bool  # PixelRepresentation 1 (int16) or 0 (uint16, 12 bits stored)
    rescale_intercept: float  # -1024 or -1000
    padding_hu: float | None  # HU outside the circular FOV (signed only); None: unsigned stores 0 there

    def __post_init__(self) -> None:
        if self.padding_hu is not None and not self.signed:
            raise ConfigError("DicomQuirks: padding_hu needs signed pixels (unsigned series store 0 outside the FOV)")


_QUIRKS = (
    DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=-2000.0),
    DicomQuirks(signed=False, rescale_intercept=-1024.0, padding_hu=None),
    DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=-3024.0),
    DicomQuirks(signed=True, rescale_intercept=-1000.0, padding_hu=None),
    DicomQuirks(signed=False, rescale_intercept=-1000.0, padding_hu=None),
)


def quirks_for(index: int) -> DicomQuirks:
    """Storage quirks of the ``index``-th demo series: a fixed cycle over realistic combinations."""
    return _QUIRKS[index % len(_QUIRKS)]


def fov_mask(geom: ScanGeometry) -> np.ndarray:
    """bool [rows, cols]: pixels inside the circular field of view (diameter ``geom.fov_mm``, image centre)."""
    ps = geom.pixel_spacing
    y = geom.y0 + ps * np.arange(geom.rows)
    x = geom.x0 + ps * np.arange(geom.cols)
    return (y[:, None] ** 2 + x[None, :] ** 2) <= (geom.fov_mm / 2) ** 2


# ---------------------------------------------------------------------------------------------------------------
# Shape primitives (broadcasting, float32 in -> float32 out)
# ---------------------------------------------------------------------------------------------------------------


def _occ(d: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy of a shape with signed distance ``d`` (mm) at voxel size ``h``."""
    return np.clip(0.5 - d * np.float32(1.0 / h), 0.0, 1.0)


def _ellipse_sdf(x: np.ndarray, y: np.ndarray, rx: float | np.ndarray, ry: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse centred at 0 (first-order, q-1 / |grad q|)."""
    u = x / rx
    v = y / ry
    q = np.sqrt(u * u + v * v)
    g = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / np.maximum(q, 1e-6)
    g = np.clip(g, 1.0 / np.maximum(rx, ry), 1.0 / np.maximum(np.minimum(rx, ry), 1e-3))
    return (q - 1.0) / g


def _ellipsoid_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray, r: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid centred at 0 with semi-axes ``r``."""
    u, v, w = x / r[0], y / r[1], z / r[2]
    q = np.sqrt(u * u + v * v + w * w)
    g = np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2 + (w / r[2]) ** 2) / np.maximum(q, 1e-6)
    g = np.clip(g, 1.0 / max(r), 1.0 / min(r))
    return (q - 1.0) / g


def _seg_sdf(px: np.ndarray, py: np.ndarray, pz: np.ndarray, seg: Sequence[float]) -> np.ndarray:
    """Signed distance to a tapered capsule ``seg = (ax, ay, az, bx, by, bz, r_a, r_b)``."""
    ax, ay, az, bx, by, bz, r0, r1 = (float(s) for s in seg)
    vx, vy, vz = bx - ax, by - ay, bz - az
    inv = 1.0 / max(vx * vx + vy * vy + vz * vz, 1e-9)
    wx, wy, wz = px - ax, py - ay, pz - az
    t = np.clip((wx * vx + wy * vy + wz * vz) * inv, 0.0, 1.0)
    dx, dy, dz = wx - t * vx, wy - t * vy, wz - t * vz
    return np.sqrt(dx * dx + dy * dy + dz * dz) - (r0 + t * (r1 - r0))


def _paint(hu: np.ndarray, alpha: np.ndarray, value: float | np.ndarray) -> None:
    """In place: hu <- hu + alpha * (value - hu)."""
    hu += alpha * (value - hu)


@dataclass(frozen=True)
class _Grid:
    """Coarse anatomy grid: z [Zc] ascending, y [Yc], x [Xc] world mm (float32), in-plane step h."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    h: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    @property
    def Z(self) -> np.ndarray:
        return self.z[:, None, None]

    @property
    def Y(self) -> np.ndarray:
        return self.y[None, :, None]

    @property
    def X(self) -> np.ndarray:
        return self.x[None, None, :]


def _tubes_sdf(grid: _Grid, segs: np.ndarray, reach: float) -> np.ndarray:
    """Min signed distance [Zc, Yc, Xc] to capsules ``segs`` [N, 8]; evaluated only within ``reach`` mm of each
    capsule (``_FAR`` elsewhere)."""
    field = np.full(grid.shape, _FAR, dtype=np.float32)
    x_first, y_first, h = float(grid.x[0]), float(grid.y[0]), grid.h
    nx, ny = grid.x.size, grid.y.size
    for seg in segs:
        r = max(seg[6], seg[7]) + reach
        lo = np.minimum(seg[0:3], seg[3:6]) - r
        hi = np.maximum(seg[0:3], seg[3:6]) + r
        i0, i1 = max(0, math.ceil((lo[0] - x_first) / h)), min(nx, math.floor((hi[0] - x_first) / h) + 1)
        j0, j1 = max(0, math.ceil((lo[1] - y_first) / h)), min(ny, math.floor((hi[1] - y_first) / h) + 1)
        k0, k1 = int(np.searchsorted(grid.z, lo[2], "left")), int(np.searchsorted(grid.z, hi[2], "right"))
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        d = _seg_sdf(grid.x[None, None, i0:i1], grid.y[None, j0:j1, None], grid.z[k0:k1, None, None], seg)
        sub = field[k0:k1, j0:j1, i0:i1]
        np.minimum(sub, d, out=sub)
    return field


# ---------------------------------------------------------------------------------------------------------------
# The thorax layout (all positions in LPS mm)
# ---------------------------------------------------------------------------------------------------------------


class _Thorax:
    """Derived anatomy of one scan: sizes, landmarks and signed-distance functions."""

    def __init__(self, geom: ScanGeometry, cfg: PhantomConfig, half_width_mm: float | None = None) -> None:
        self.cfg = cfg
        a = min(cfg.body_half_width_mm, cfg.body_fov_fraction * geom.fov_mm) if half_width_mm is None else half_width_mm
        s = self.s = a / cfg.body_half_width_mm
        self.a, self.b, self.cy = a, cfg.body_aspect * a, cfg.body_y_offset_mm * s
        self.skin, self.fat, self.muscle = cfg.skin_mm * s, cfg.fat_mm * s, cfg.muscle_mm * s
        self.back = cfg.back_muscle_mm * s
        self.rib_t, self.rib_h = cfg.rib_thickness_mm * s, cfg.rib_height_mm * s
        self.gap = cfg.pleural_gap_mm * s
        wall = self.skin + self.fat + self.muscle
        b, cy = self.b, self.cy
        self.y_front_cav = cy - b + wall + self.rib_t + self.gap
        self.y_back_cav = cy + b - wall - self.back - self.rib_t - self.gap
        self.a_cav = a - wall - self.rib_t - self.gap

        z = geom.slice_zvals
        self.z_top, self.z_bot = float(z[-1]), float(z[0])
        span = max(self.z_top - self.z_bot, 1.0)
        self.z_apex = self.z_top - cfg.apex_frac * span
        self.z_dome = (self.z_top - cfg.dome_right_frac * span, self.z_top - cfg.dome_left_frac * span)  # (R, L)
        self.z_recess = self.z_top - cfg.recess_frac * span
        lh = self.lh = max(self.z_apex - 0.5 * (self.z_dome[0] + self.z_dome[1]), 1.0)
        self.z_car = self.z_apex - cfg.carina_lung_frac * lh

        # spine
        self.rv = cfg.vertebra_radius_mm * s
        self.y_vb = cy + cfg.vertebra_y_frac * b
        y_vbf = self.y_vb - self.rv  # anterior surface of the vertebral bodies
        # mediastinum and heart
        self.med_w = cfg.mediastinum_half_width_mm * s
        self.med_y = 0.5 * (self.y_front_cav + y_vbf)
        self.med_d = 0.5 * (y_vbf - self.y_front_cav) + 6.0 * s
        hz = cfg.heart_height_lung_frac * lh
        self.heart_c = (cfg.heart_x_mm * s, cy - 0.27 * b, self.z_apex - 0.85 * lh)
        self.heart_r = (cfg.heart_semi_axes_mm[0] * s, cfg.heart_semi_axes_mm[1] * s, hz)
        z_heart_top = self.z_car - 0.15 * lh

        # airways: trachea to the carina, main bronchi to the hila
        xt, yt = -2.0 * s, y_vbf - 30.0 * s
        self.trachea_top = np.array([xt, yt - 8.0 * s, self.z_top + 20.0])
        self.carina = np.array([xt, yt, self.z_car])
        self.hilum = {
            -1: np.array([-44.0 * s, yt + 6.0 * s, self.z_car - 0.08 * lh]),
            1: np.array([36.0 * s, yt + 10.0 * s, self.z_car - 0.11 * lh]),
        }
        rt, rb = cfg.trachea_radius_mm * s, cfg.bronchus_radius_mm * s
        self.main_airways = np.array(
            [
                [*self.trachea_top, *self.carina, rt, rt],
                [*self.carina, *self.hilum[-1], rb, rb],
                [*self.carina, *self.hilum[1], rb, rb],
            ]
        )
        self.main_walls = self.main_airways.copy()
        self.main_walls[0, 6:] += cfg.trachea_wall_mm * s
        self.main_walls[1:, 6:] += cfg.bronchus_wall_mm * s
        # roots of the intrapulmonary trees
        self.artery_root = {sd: h + np.array([sd * 3.0 * s, -9.0 * s, 7.0 * s]) for sd, h in self.hilum.items()}
        self.vein_root = {sd: h + np.array([sd * 2.0 * s, -6.0 * s, -0.1 * lh]) for sd, h in self.hilum.items()}

        # great vessels and oesophagus: capsules (ax, ay, az, bx, by, bz, ra, rb)
        z_arch = self.z_car + 0.12 * lh
        asc_top = (6.0 * s, yt - 30.0 * s, z_arch)
        desc_top = (26.0 * s, y_vbf - 4.0 * s, z_arch)
        bif = (4.0 * s, yt - 22.0 * s, self.z_car - 0.04 * lh)
        la = (self.heart_c[0] - 8.0 * s, self.heart_c[1] + 30.0 * s)
        big = 40.0 * s
        self.great_vessels = np.array(
            [
                [6.0 * s, yt - 34.0 * s, z_heart_top - 0.1 * lh, *asc_top, 15.0 * s, 15.0 * s],  # ascending aorta
                [*asc_top, 24.0 * s, yt - 10.0 * s, self.z_car + 0.17 * lh, 13.0 * s, 13.0 * s],  # arch
                [24.0 * s, yt - 10.0 * s, self.z_car + 0.17 * lh, *desc_top, 13.0 * s, 12.0 * s],
                [*desc_top, 14.0 * s, y_vbf - 12.0 * s, self.z_bot - big, 12.0 * s, 12.0 * s],  # descending aorta
                [-24.0 * s, yt - 28.0 * s, self.z_top + big, -24.0 * s, yt - 30.0 * s, z_heart_top, 10.0 * s, 10.0 * s],
                [10.0 * s, yt - 45.0 * s, z_heart_top, *bif, 14.0 * s, 13.0 * s],  # pulmonary trunk
                [*bif, *self.artery_root[-1], 11.0 * s, 7.0 * s],
                [*bif, *self.artery_root[1], 11.0 * s, 7.0 * s],
                [*self.vein_root[-1], la[0], la[1], self.vein_root[-1][2], 7.0 * s, 8.0 * s],
                [*self.vein_root[1], la[0], la[1], self.vein_root[1][2], 7.0 * s, 8.0 * s],
            ]
        )
        self.oesophagus = np.array(
            [
                [4.0 * s, y_vbf - 9.0 * s, self.z_top + big, 4.0 * s, y_vbf - 9.0 * s, self.z_car, 7.0 * s, 7.0 * s],
                [4.0 * s, y_vbf - 9.0 * s, self.z_car, 12.0 * s, y_vbf - 30.0 * s, self.z_bot - big, 7.0 * s, 7.0 * s],
            ]
        )

    # -- 2D shapes (x, y broadcast) ------------------------------------------------------------------------------
    def body_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _ellipse_sdf(x, y - self.cy, self.a, self.b)

    def wall_depth(self, y: np.ndarray) -> np.ndarray:
        """Depth (mm) of skin + fat + muscle below the body surface; thicker at the back."""
        v = np.clip((y - self.cy) / self.b, 0.0, 1.0)
        return self.skin + self.fat + self.muscle + self.back * v * v

    def cavity_sdf(self, x: np.ndarray, y: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
        body = self.body_sdf(x, y) if body is None else body
        return body + self.wall_depth(y) + self.rib_t + self.gap

    def mediastinum_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _ellipse_sdf(x, y - self.med_y, self.med_w, self.med_d)

    def spine_block_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Vertebral body with rib heads and paraspinal tissue: the lungs wrap around it."""
        return _ellipse_sdf(x, y - (self.y_vb + 0.3 * self.rv), self.rv + 14.0 * self.s, 1.6 * self.rv)

    def dome(self, x: np.ndarray, y: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Height z (mm) of the diaphragm dome of ``side`` (-1 right, +1 left) above (x, y), and
        1/sqrt(1 + |grad z|^2) to turn vertical offsets into distances."""
        sx, sy = 0.5 * self.a_cav, 1.1 * (self.y_back_cav - self.y_front_cav) / 2
        xd, yd = side * 0.5 * self.a_cav, self.cy - 0.1 * self.b
        u, v = (x - xd) / sx, (y - yd) / sy
        depth = self.z_dome[0 if side < 0 else 1] - self.z_recess
        rho2 = np.minimum(u * u + v * v, 1.6)
        zd = self.z_dome[0 if side < 0 else 1] - depth * rho2
        inner = (u * u + v * v) < 1.6
        gx, gy = 2.0 * depth * u / sx * inner, 2.0 * depth * v / sy * inner
        return zd, 1.0 / np.sqrt(1.0 + gx * gx + gy * gy)

    # -- 3D -------------------------------------------------------------------------------------------------------
    def taper(self, z: np.ndarray) -> np.ndarray:
        """Lung cross-section scale, 0 at the apex, 1 from ``apex_taper_lung_frac`` below it."""
        return np.sqrt(np.clip((self.z_apex - z) / (self.cfg.apex_taper_lung_frac * self.lh), 0.0, 1.0))

    def heart_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = self.heart_c
        return _ellipsoid_sdf(x - c[0], y - c[1], z - c[2], self.heart_r)

    def lung_sdf(
        self,
        x: np.ndarray,
        y: np.ndarray,
        z: np.ndarray,
        exclusion: np.ndarray | None = None,
        cavity: np.ndarray | None = None,
        side: int = 0,
    ) -> np.ndarray:
        """Signed distance to the lungs (both, or one ``side``). Grid use passes the precomputed cavity and
        mediastinal exclusion; point use (tree growth) leaves them None."""
        if cavity is None:
            cavity = self.cavity_sdf(x, y)
        if exclusion is None:
            exclusion = self.exclusion_sdf(x, y, z, self.gv_points(x, y, z))
        f = np.maximum(self.taper(z), 1e-3)
        ax = np.abs(x)
        d = _ellipse_sdf(
            ax - 0.5 * self.a_cav, y - self.cy, 0.65 * self.a_cav * f, 0.6 * (self.y_back_cav - self.y_front_cav) * f
        )
        d = np.maximum(d, cavity)
        d = np.maximum(d, -exclusion)
        d = np.maximum(d, 2.0 * self.s - ax)
        zr, nr = self.dome(x, y, -1)
        zl, nl = self.dome(x, y, 1)
        d_dome = np.where(x < 0, (zr - z) * nr, (zl - z) * nl)
        d = np.maximum(d, d_dome)
        if side:
            d = np.maximum(d, -side * x)
        return d

    def exclusion_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, gv: np.ndarray) -> np.ndarray:
        """Signed distance to what the lungs wrap around: mediastinum, heart, spine, great vessels (``gv``)."""
        d = np.minimum(self.mediastinum_sdf(x, y), self.spine_block_sdf(x, y))
        d = np.minimum(d, self.heart_sdf(x, y, z) - (self.cfg.pericardial_fat_mm + 1.0) * self.s)
        return np.minimum(d, gv - 3.0 * self.s)

    def gv_points(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = np.full(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), _FAR, dtype=np.float32)
        for seg in np.concatenate([self.great_vessels, self.oesophagus]):
            d = np.minimum(d, _seg_sdf(x, y, z, seg))
        return d

    def lung_value(self, y: np.ndarray) -> np.ndarray:
        """Parenchyma HU without texture: denser posteriorly (gravity)."""
        c = self.cfg
        t = np.clip((y - self.y_front_cav) / (self.y_back_cav - self.y_front_cav), 0.0, 1.0)
        return (c.lung_hu + c.lung_gravity_hu * (t - 0.5)).astype(np.float32)


def thorax_landmarks(geom: ScanGeometry, cfg: PhantomConfig = PhantomConfig()) -> dict[str, tuple[float, ...]]:
    """World (LPS, mm) landmarks of the phantom for this geometry: the trachea centre ``trachea_xy`` (x, y at the
    top slice), ``carina``, ``hilum_right``, ``hilum_left`` (x, y, z) and the ``apex_z`` / ``dome_right_z`` /
    ``dome_left_z`` heights."""
    th = _Thorax(geom, cfg)
    top, car = th.trachea_top, th.carina
    t = (geom.slice_zvals[-1] - top[2]) / (car[2] - top[2])
    return {
        "trachea_xy": tuple(float(v) for v in top[:2] + t * (car[:2] - top[:2])),
        "carina": tuple(float(v) for v in car),
        "hilum_right": tuple(float(v) for v in th.hilum[-1]),
        "hilum_left": tuple(float(v) for v in th.hilum[1]),
        "apex_z": (th.z_apex,),
        "dome_right_z": (th.z_dome[0],),
        "dome_left_z": (th.z_dome[1],),
    }


# ---------------------------------------------------------------------------------------------------------------
# Branching trees (vessels, airways), grown breadth-first and vectorised per generation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TreeSpec:
    min_radius: float
    max_generations: int
    max_segments: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """Random unit vectors [N, 3] perpendicular to the unit vectors ``d`` [N, 3]."""
    return _unit(np.cross(d, rng.standard_normal(d.shape)))


def _rotate(d: np.ndarray, axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate unit vectors ``d`` [N, 3] by ``angle`` [N] (rad) about unit ``axis`` [N, 3] perpendicular to them."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return d * c + np.cross(axis, d) * s


def _grow_trees(
    rng: np.random.Generator,
    roots: Sequence[tuple[np.ndarray, np.ndarray, float]],
    inside: Callable[[np.ndarray], np.ndarray],
    spec: _TreeSpec,
    cfg: PhantomConfig,
) -> np.ndarray:
    """Grow bifurcating trees from ``roots`` (start, direction, radius), keeping every branch inside the region
    whose signed distance ``inside`` gives for points [N, 3]. Returns capsules [N, 8]."""
    pos = np.array([r[0] for r in roots], dtype=np.float64).reshape(-1, 3)
    dirs = _unit(np.array([r[1] for r in roots], dtype=np.float64).reshape(-1, 3))
    rad = np.array([r[2] for r in roots], dtype=np.float64)
    gen = np.zeros(len(roots), dtype=int)
    k = max(cfg.tree_candidates, 1)
    out: list[np.ndarray] = []
    total = 0
    while pos.shape[0] and total < spec.max_segments:
        n = pos.shape[0]
        if n > spec.max_segments - total:
            n = spec.max_segments - total
            pos, dirs, rad, gen = pos[:n], dirs[:n], rad[:n], gen[:n]
        jitter = rng.uniform(1.0 - cfg.segment_length_jitter, 1.0 + cfg.segment_length_jitter, n)
        length = (cfg.segment_length_base_mm + cfg.segment_length_per_radius * rad) * jitter
        cand = np.repeat(dirs[:, None], k, axis=1)
        if k > 1:
            flat = cand[:, 1:].reshape(-1, 3)
            ang = rng.uniform(0.0, np.deg2rad(cfg.tree_max_detour_deg), flat.shape[0])
            cand[:, 1:] = _rotate(flat, _perpendicular(rng, flat), ang).reshape(n, k - 1, 3)
        ends = pos[:, None] + cand * length[:, None, None]
        mids = pos[:, None] + cand * (0.5 * length)[:, None, None]
        sd = inside(np.concatenate([ends.reshape(-1, 3), mids.reshape(-1, 3)]))
        score = np.maximum(sd[: n * k], sd[n * k :]).reshape(n, k)
        score[gen == 0] = sd[: n * k].reshape(n, k)[gen == 0]  # roots start in the hilum, outside the lung
        ok = score < -(rad + cfg.tree_margin_mm)[:, None]
        pick = np.where(ok.any(axis=1), ok.argmax(axis=1), score.argmin(axis=1))
        rows = np.arange(n)
        keep = score[rows, pick] < -0.5 * rad
        if not keep.any():
            break
        p0, p1 = pos[keep], ends[rows, pick][keep]
        r, d, g = rad[keep], cand[rows, pick][keep], gen[keep] + 1
        out.append(np.column_stack([p0, p1, r, r * cfg.branch_taper_major]))
        total += p0.shape[0]
        axis = _perpendicular(rng, d)
        m = d.shape[0]
        a1 = np.deg2rad(rng.uniform(*cfg.branch_angle_major_deg, m))
        a2 = np.deg2rad(rng.uniform(*cfg.branch_angle_minor_deg, m))
        pos = np.concatenate([p1, p1])
        dirs = np.concatenate([_rotate(d, axis, a1), _rotate(d, axis, -a2)])
        rad = np.concatenate([r * cfg.branch_taper_major, r * cfg.branch_taper_minor])
        gen = np.concatenate([g, g])
        sel = (rad >= spec.min_radius) & (gen < spec.max_generations)
        pos, dirs, rad, gen = pos[sel], dirs[sel], rad[sel], gen[sel]
    return np.concatenate(out) if out else np.zeros((0, 8))


def _tree_roots(th: _Thorax, side: int) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """Starting point, direction and radius of each intrapulmonary tree of one lung (``side`` -1 right, +1 left)."""
    c, s, sd = th.cfg, th.s, side
    rv, ra = c.vessel_root_radius_mm * s, c.airway_root_radius_mm * s
    art, vein, hil = th.artery_root[sd], th.vein_root[sd], th.hilum[sd]
    return {
        "arteries": [
            (art, np.array(d, dtype=float), f * rv)
            for d, f in (
                ((0.3 * sd, 0.1, 0.95), 0.75),
                ((0.8 * sd, -0.2, 0.5), 0.75),
                ((0.85 * sd, -0.4, -0.2), 0.75),
                ((0.4 * sd, 0.5, -0.75), 1.0),
                ((0.35 * sd, 0.05, -0.95), 0.9),
            )
        ]
        + [(vein, np.array(d, dtype=float), 0.8 * rv) for d in ((0.6 * sd, 0.2, -0.75), (0.2 * sd, 0.6, -0.75))],
        "veins": [
            (vein, np.array(d, dtype=float), f * rv)
            for d, f in (((0.7 * sd, 0.1, 0.5), 0.85), ((0.6 * sd, 0.35, -0.7), 0.9), ((0.5 * sd, -0.3, -0.8), 0.8))
        ],
        "airways": [
            (hil, np.array(d, dtype=float), ra)
            for d in ((0.6 * sd, -0.1, 0.75), (0.55 * sd, 0.35, -0.75), (0.75 * sd, -0.5, -0.35))
        ],
    }


def _grow_all_trees(th: _Thorax, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (vessel capsules, airway lumen capsules, airway wall capsules), each [N, 8]."""
    c = th.cfg
    vessel_spec = _TreeSpec(c.vessel_min_radius_mm, 64, c.vessel_max_segments)
    airway_spec = _TreeSpec(c.airway_min_radius_mm, c.airway_max_generations, c.vessel_max_segments)
    vessels, airways = [], []
    for side in (-1, 1):
        roots = _tree_roots(th, side)

        def inside(p: np.ndarray, side: int = side) -> np.ndarray:
            return th.lung_sdf(p[:, 0], p[:, 1], p[:, 2], side=side)

        vessels.append(_grow_trees(rng, roots["arteries"], inside, vessel_spec, c))
        vessels.append(_grow_trees(rng, roots["veins"], inside, vessel_spec, c))
        airways.append(_grow_trees(rng, roots["airways"], inside, airway_spec, c))
    vessel_segs, lumen = np.concatenate(vessels), np.concatenate(airways)
    wall = lumen.copy()
    wall[:, 6:] += np.maximum(c.airway_wall_min_mm, c.airway_wall_fraction * lumen[:, 6:])
    return vessel_segs, lumen, wall


# ---------------------------------------------------------------------------------------------------------------
# Coarse anatomy
# ---------------------------------------------------------------------------------------------------------------


def _coarse_factor(geom: ScanGeometry, cfg: PhantomConfig) -> int:
    return max(1, min(cfg.coarse_factor, math.floor(cfg.coarse_max_mm / geom.pixel_spacing)))


def _coarse_grid(geom: ScanGeometry, cfg: PhantomConfig) -> tuple[_Grid, np.ndarray]:
    """The coarse grid and the linear z-interpolation matrix [Z, Zc] from it to the slices."""
    f, ps = _coarse_factor(geom, cfg), geom.pixel_spacing
    h = f * ps
    ny, nx = -(-geom.rows // f), -(-geom.cols // f)
    xc = geom.x0 + (np.arange(nx) * f + (f - 1) / 2) * ps
    yc = geom.y0 + (np.arange(ny) * f + (f - 1) / 2) * ps
    z = geom.slice_zvals
    n_uniform = math.ceil((z[-1] - z[0]) / h) + 1
    if z.size <= n_uniform:
        zc, lz = z.copy(), np.eye(z.size)
    else:
        zc = np.linspace(z[0], z[-1], n_uniform)
        lz = _interp_rows(z, zc)
    grid = _Grid(zc.astype(np.float32), yc.astype(np.float32), xc.astype(np.float32), h)
    return grid, lz.astype(np.float32)


def _interp_rows(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Linear interpolation matrix [len(fine), len(coarse)] from samples at ascending ``coarse`` positions."""
    m = np.zeros((fine.size, coarse.size))
    if coarse.size == 1:
        m[:, 0] = 1.0
        return m
    i = np.clip(np.searchsorted(coarse, fine, "right") - 1, 0, coarse.size - 2)
    w = np.clip((fine - coarse[i]) / (coarse[i + 1] - coarse[i]), 0.0, 1.0)
    rows = np.arange(fine.size)
    m[rows, i] = 1.0 - w
    m[rows, i + 1] += w
    return m


def _inplane_matrix(n_fine: int, n_coarse: int, factor: int, blur_px: float) -> np.ndarray:
    """[n_fine, n_coarse]: linear interpolation from block-centred coarse samples, then a Gaussian blur."""
    m = _interp_rows(np.arange(n_fine, dtype=float), np.arange(n_coarse) * factor + (factor - 1) / 2)
    if blur_px > 0.05:
        m = ndimage.gaussian_filter1d(m, blur_px, axis=0, mode="nearest")
    return m.astype(np.float32)


def _box(grid: _Grid, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
    """Index box of the grid covering world (x, y, z) from ``lo`` to ``hi``."""
    sx = slice(int(np.searchsorted(grid.x, lo[0])), int(np.searchsorted(grid.x, hi[0], "right")))
    sy = slice(int(np.searchsorted(grid.y, lo[1])), int(np.searchsorted(grid.y, hi[1], "right")))
    sz = slice(int(np.searchsorted(grid.z, lo[2])), int(np.searchsorted(grid.z, hi[2], "right")))
    return sz, sy, sx


def _paint_prism(hu: np.ndarray, alpha2d: np.ndarray, alpha_z: np.ndarray, value: float) -> None:
    """Paint a 2D shape (alpha2d [Y, X]) times a z profile (alpha_z [Z]) within its bounding box."""
    rows, cols = np.nonzero(alpha2d > 0)
    ks = np.nonzero(alpha_z > 0)[0]
    if rows.size == 0 or ks.size == 0:
        return
    sz, sy, sx = slice(ks[0], ks[-1] + 1), slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
    _paint(hu[sz, sy, sx], alpha2d[None, sy, sx] * alpha_z[sz, None, None], value)


def _texture(rng: np.random.Generator, grid: _Grid, cfg: PhantomConfig) -> np.ndarray:
    """Low-frequency field [Zc, Yc, Xc] with unit std, correlation length ``lung_texture_mm``."""
    zc, yc, xc = grid.shape
    sub = 2
    small = rng.standard_normal((zc, -(-yc // sub), -(-xc // sub)), dtype=np.float32)
    dz = float(np.median(np.diff(grid.z))) if zc > 1 else grid.h
    small = ndimage.gaussian_filter(
        small,
        (cfg.lung_texture_mm / dz, cfg.lung_texture_mm / (sub * grid.h), cfg.lung_texture_mm / (sub * grid.h)),
        mode="wrap",
    )
    small /= max(float(small.std()), 1e-6)
    my = _inplane_matrix(yc, small.shape[1], sub, 0.0)
    mx = _inplane_matrix(xc, small.shape[2], sub, 0.0)
    planes = (small.reshape(-1, small.shape[2]) @ mx.T).reshape(zc, small.shape[1], xc)
    return np.matmul(my, planes)


def _coarse_anatomy(
    th: _Thorax, grid: _Grid, rng_tree: np.random.Generator, rng_tex: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """-> (HU [Zc, Yc, Xc] float32, lung occupancy [Zc, Yc, Xc] float32 in [0, 1])."""
    c, s, h = th.cfg, th.s, grid.h
    X, Y, Z = grid.X, grid.Y, grid.Z
    X2, Y2 = X[0], Y[0]  # [1, Xc], [Yc, 1]

    # 2D: table, body wall, soft tissue, spine (the same in every slice)
    base = np.full((grid.y.size, grid.x.size), c.air_hu, dtype=np.float32)
    y_table = th.cy + th.b + c.table_gap_mm + c.table_thickness_mm / 2 - X2**2 / (2 * c.table_radius_mm)
    d_table = np.maximum(np.abs(Y2 - y_table) - c.table_thickness_mm / 2, np.abs(X2) - 1.25 * th.a)
    _paint(base, _occ(d_table, h), c.table_hu)
    d_body = th.body_sdf(X2, Y2)
    _paint(base, _occ(d_body, h), c.skin_hu)
    _paint(base, _occ(d_body + th.skin, h), c.fat_hu)
    _paint(base, _occ(d_body + th.skin + th.fat, h), c.muscle_hu)
    alpha_inner = _occ(d_body + th.wall_depth(Y2), h)
    _paint(base, alpha_inner, c.mediastinum_hu)
    rv, cortex = th.rv, c.cortex_mm * s
    d_vb = _ellipse_sdf(X2, Y2 - th.y_vb, rv, rv)
    rc = 7.0 * s
    y_canal = th.y_vb + rv + rc + 1.5 * s
    sp_end = th.cy + th.b - th.skin - th.fat - 4.0 * s
    d_arch = _ellipse_sdf(X2, Y2 - y_canal, rc + 4.0 * s, rc + 4.0 * s)
    d_arch = np.minimum(d_arch, _ellipse_sdf(X2, Y2 - 0.5 * (y_canal + sp_end), 3.5 * s, 0.5 * (sp_end - y_canal)))
    d_arch = np.minimum(d_arch, _ellipse_sdf(np.abs(X2) - (rc + 14.0 * s), Y2 - y_canal + 2.0 * s, 14.0 * s, 4.5 * s))
    for d in (d_vb, d_arch):
        _paint(base, _occ(d, h), c.bone_cortex_hu)
        _paint(base, _occ(d + cortex, h), c.bone_marrow_hu)
    _paint(base, _occ(_ellipse_sdf(X2, Y2 - y_canal, rc, rc), h), c.spinal_canal_hu)
    hu = np.broadcast_to(base, grid.shape).copy()

    # liver below the right dome (not in the spine)
    zr, nr = th.dome(X2, Y2, -1)
    alpha_liver = np.minimum(alpha_inner, 1.0 - _occ(th.spine_block_sdf(X2, Y2), h))
    alpha_liver = np.minimum(alpha_liver, _occ(X2 - 25.0 * s, h))
    alpha_liver = np.minimum(alpha_liver[None], _occ((Z - zr[None]) * nr[None] + c.diaphragm_mm * s, h))
    _paint(hu, alpha_liver, c.liver_hu)

    # discs, sternum
    pitch = c.rib_pitch_lung_frac * th.lh
    phase = (grid.z - th.z_apex) / pitch
    d_disc = np.abs(phase - np.round(phase)) * pitch - c.disc_height_mm * s / 2
    _paint_prism(hu, _occ(d_vb + cortex, h), _occ(d_disc, h), c.disc_hu)
    y_st = th.cy - th.b + th.skin + th.fat + th.muscle + c.sternum_half_depth_mm * s
    d_st = _ellipse_sdf(X2, Y2 - y_st, c.sternum_half_width_mm * s, c.sternum_half_depth_mm * s)
    z_st = _occ(np.maximum(grid.z - (th.z_apex - 0.1 * th.lh), (th.z_apex - 0.8 * th.lh) - grid.z), h)
    _paint_prism(hu, _occ(d_st, h), z_st, c.bone_cortex_hu)
    _paint_prism(hu, _occ(d_st + cortex, h), z_st, c.bone_marrow_hu)

    _paint_ribs(hu, th, grid, d_body)

    # great vessels in a fat sheath, oesophagus
    sheath = 3.0 * s
    gv = _tubes_sdf(grid, th.great_vessels, sheath + h)
    oes = _tubes_sdf(grid, th.oesophagus, sheath + h)
    _paint(hu, _occ(gv - sheath, h), c.mediastinal_fat_hu)
    _paint(hu, _occ(gv, h), c.great_vessel_hu)
    _paint(hu, _occ(oes, h), c.muscle_hu)

    # heart with pericardial fat, sitting on the left dome
    hc, hr, fat = th.heart_c, th.heart_r, c.pericardial_fat_mm * s
    reach = fat + 2 * s + h
    box = _box(grid, [hc[i] - hr[i] - reach for i in range(3)], [hc[i] + hr[i] + reach for i in range(3)])
    heart = np.full(grid.shape, _FAR, dtype=np.float32)
    xb, yb, zb = X[..., box[2]], Y[:, box[1]], Z[box[0]]
    heart[box] = th.heart_sdf(xb, yb, zb)
    zl, nl = th.dome(X2[:, box[2]], Y2[box[1]], 1)
    above = _occ((zl[None] - zb) * nl[None], h)
    sub = hu[box]
    _paint(sub, np.minimum(_occ(heart[box] - fat, h), above), c.mediastinal_fat_hu)
    _paint(sub, np.minimum(_occ(heart[box], h), above), c.heart_hu)

    # lungs
    exclusion = np.minimum(th.mediastinum_sdf(X2, Y2), th.spine_block_sdf(X2, Y2))[None]
    exclusion = np.minimum(exclusion, heart - (c.pericardial_fat_mm + 1.0) * s)
    exclusion = np.minimum(exclusion, np.minimum(gv, oes) - sheath)
    lung = _occ(th.lung_sdf(X, Y, Z, exclusion=exclusion, cavity=th.cavity_sdf(X2, Y2, d_body)[None]), h)
    lung_value = th.lung_value(Y) + _texture(rng_tex, grid, c) * np.float32(c.lung_texture_hu / 2)
    _paint(hu, lung, lung_value)

    # the trachea and main bronchi are painted at full resolution (_paint_main_airways); their lumen continues
    # into the intrapulmonary airways
    main_wall = _occ(_tubes_sdf(grid, th.main_walls, h), h)

    # intrapulmonary airway and vessel trees (lung)
    vessels, lumen, wall = _grow_all_trees(th, rng_tree)
    _paint(hu, _occ(_tubes_sdf(grid, wall, h), h) * lung, c.airway_wall_hu)
    _paint(hu, _occ(_tubes_sdf(grid, lumen, h), h) * np.maximum(lung, main_wall), c.air_hu)
    _paint(hu, _occ(_tubes_sdf(grid, vessels, h), h) * lung, c.lung_vessel_hu)
    return hu, lung


def _paint_ribs(hu: np.ndarray, th: _Thorax, grid: _Grid, d_body: np.ndarray) -> None:
    """Ribs (cortex, marrow; costal cartilage anteriorly), sloping down towards the front, in the chest wall."""
    c, s, h = th.cfg, th.s, grid.h
    y2 = grid.y[:, None]
    depth = d_body + th.wall_depth(y2) + th.rib_t / 2  # 0 on the ribs' centre line, [Y, X]
    rows, cols = np.nonzero(np.abs(depth) < th.rib_t / 2 + h)
    if rows.size == 0:
        return
    x, y, dd = grid.x[cols], grid.y[rows], depth[rows, cols]
    phi = np.arctan2(np.abs(x), y - th.cy)  # 0 posterior, pi anterior
    d_end = np.where(y > th.cy, th.rv + 6.0 * s - np.abs(x), (c.sternum_half_width_mm + 2.0) * s - np.abs(x))
    pitch = c.rib_pitch_lung_frac * th.lh
    drop = c.rib_drop_lung_frac * th.lh * (1.0 - np.cos(phi)) / 2
    u = (th.z_apex + 0.3 * pitch - grid.z[:, None] - drop[None]) / pitch  # [Zc, N]
    k = np.round(u)
    dz = (u - k) * pitch
    rt, rh = th.rib_t / 2, th.rib_h / 2
    d_rib = (np.sqrt((dd / rt) ** 2 + (dz / rh) ** 2) - 1.0) * min(rt, rh)
    d_rib = np.maximum(d_rib, d_end[None])
    d_rib = np.where((k >= 0) & (k < c.rib_count), d_rib, _FAR).astype(np.float32)
    outer = np.where(phi > 0.75 * np.pi, c.cartilage_hu, c.bone_cortex_hu).astype(np.float32)
    inner = np.where(phi > 0.75 * np.pi, c.cartilage_hu, c.bone_marrow_hu).astype(np.float32)
    sub = hu[:, rows, cols]
    _paint(sub, _occ(d_rib, h), outer[None])
    _paint(sub, _occ(d_rib + c.cortex_mm * s, h), inner[None])
    hu[:, rows, cols] = sub


# ---------------------------------------------------------------------------------------------------------------
# Full resolution: upsampling, nodules, noise
# ---------------------------------------------------------------------------------------------------------------


def _upsample(coarse: np.ndarray, lz: np.ndarray, my: np.ndarray, mx: np.ndarray, out: np.ndarray) -> None:
    """out [Z, Y, X] <- lz . coarse [Zc, Yc, Xc] . (my, mx) separably; a bool ``out`` takes ``> 0.5``."""
    zc, yc, xc = coarse.shape
    planes = (lz @ coarse.reshape(zc, -1)).reshape(lz.shape[0], yc, xc)
    for k0 in range(0, planes.shape[0], _CHUNK_SLICES):
        k1 = min(k0 + _CHUNK_SLICES, planes.shape[0])
        rows = (planes[k0:k1].reshape(-1, xc) @ mx.T).reshape(k1 - k0, yc, mx.shape[0])
        if out.dtype == np.bool_:
            out[k0:k1] = np.matmul(my, rows) > 0.5
        else:
            np.matmul(my, rows, out=out[k0:k1])


def _paint_main_airways(hu: np.ndarray, lung: np.ndarray, th: _Thorax, geom: ScanGeometry) -> None:
    """Trachea and main bronchi at full resolution (sharp walls, blurred by ``blur_mm``); removed from the lung."""
    c, ps = th.cfg, geom.pixel_spacing
    sigma = max(c.blur_mm, 0.3 * ps)
    x = (geom.x0 + ps * np.arange(geom.cols)).astype(np.float32)
    y = (geom.y0 + ps * np.arange(geom.rows)).astype(np.float32)
    z = geom.slice_zvals.astype(np.float32)
    boxes = []
    for seg in th.main_walls:
        lo = np.minimum(seg[0:3], seg[3:6]) - seg[6:8].max() - 4 * sigma
        hi = np.maximum(seg[0:3], seg[3:6]) + seg[6:8].max() + 4 * sigma
        boxes.append(
            tuple(
                slice(int(np.searchsorted(v, a)), int(np.searchsorted(v, b, "right")))
                for v, a, b in ((z, lo[2], hi[2]), (y, lo[1], hi[1]), (x, lo[0], hi[0]))
            )
        )
    for segs, value in ((th.main_walls, c.airway_wall_hu), (th.main_airways, c.air_hu)):
        for seg, box in zip(segs, boxes):
            d = _seg_sdf(x[None, None, box[2]], y[None, box[1], None], z[box[0], None, None], seg)
            _paint(hu[box], (0.5 * special.erfc(d / (math.sqrt(2.0) * sigma))).astype(np.float32), value)
            if value == c.airway_wall_hu:
                lung[box] &= d > 0


def _paint_nodules(
    hu: np.ndarray, lung: np.ndarray, nodules: Sequence[NoduleSpec], geom: ScanGeometry, th: _Thorax
) -> None:
    """Paint nodules (HU by texture, soft edge) in place, inside lung added around each (``nodule_lung_margin_mm``)."""
    c, ps, z = th.cfg, geom.pixel_spacing, geom.slice_zvals
    dz = float(np.median(np.diff(z))) if z.size > 1 else max(geom.slice_thickness, ps)
    sampling = (dz, ps, ps)
    sigma = (c.nodule_edge_mm / dz, c.nodule_edge_mm / ps, c.nodule_edge_mm / ps)
    margin = c.nodule_lung_margin_mm
    pad = (math.ceil(margin / dz) + 1, *(2 * (math.ceil((margin + 3 * c.nodule_edge_mm) / ps) + 1,)))
    for n, spec in enumerate(nodules):
        lo = [max(o - p, 0) for o, p in zip(spec.offset, pad)]
        hi = [min(o + m + p, d) for o, m, p, d in zip(spec.offset, spec.mask.shape, pad, hu.shape)]
        if any(b <= a for a, b in zip(lo, hi)):
            log.warning("nodule %d at offset %s lies outside the %s volume; not painted", n, spec.offset, hu.shape)
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask = np.zeros([b - a for a, b in zip(lo, hi)], dtype=bool)
        src, dst = [], []
        for o, m, a, b in zip(spec.offset, spec.mask.shape, lo, hi):
            s0, s1 = max(a - o, 0), min(b - o, m)
            src.append(slice(s0, max(s1, s0)))
            dst.append(slice(o + s0 - a, o + max(s1, s0) - a))
        mask[tuple(dst)] = spec.mask[tuple(src)]
        if not mask.any():
            log.warning("nodule %d at offset %s has no voxel inside the volume; not painted", n, spec.offset)
            continue
        near = ndimage.distance_transform_edt(~mask, sampling=sampling) <= margin
        rows = geom.y0 + ps * np.arange(lo[1], hi[1])
        cols = geom.x0 + ps * np.arange(lo[2], hi[2])
        near &= (th.cavity_sdf(cols[None, :], rows[:, None]) < 0)[None]  # never breach the chest wall
        sub, lung_sub = hu[box], lung[box]
        added = near & ~lung_sub
        if added.any():
            _paint(sub, ndimage.gaussian_filter(added.astype(np.float32), sigma), th.lung_value(rows)[None, :, None])
        lung[box] = lung_sub | near
        _paint(sub, ndimage.gaussian_filter(mask.astype(np.float32), sigma), c.nodule_texture_hu[spec.texture - 1])
        if spec.texture == 3:
            depth = ndimage.distance_transform_edt(mask, sampling=sampling)
            core = depth > c.part_solid_core_fraction * depth.max()
            _paint(sub, ndimage.gaussian_filter(core.astype(np.float32), sigma), c.part_solid_core_hu)


def _add_noise(hu: np.ndarray, rng: np.random.Generator, noise_hu: float) -> None:
    """Add correlated noise in place: uniform bytes smoothed by [1, 2, 1] in x and y (nearly Gaussian, correlated
    over about one pixel), scaled to std ``noise_hu``."""
    if noise_hu <= 0:
        return
    z, ny, nx = hu.shape
    scale = np.float32(noise_hu / math.sqrt(36.0 * (256.0**2 - 1.0) / 12.0))
    for k0 in range(0, z, _CHUNK_SLICES):
        k1 = min(k0 + _CHUNK_SLICES, z)
        raw = np.frombuffer(rng.bytes((k1 - k0) * (ny + 2) * (nx + 2)), dtype=np.uint8)
        raw = raw.reshape(k1 - k0, ny + 2, nx + 2).astype(np.int16)
        a = raw[:, :, :-1] + raw[:, :, 1:]
        a = a[:, :, :-1] + a[:, :, 1:]
        a -= 510  # 4 x the mean byte
        b = a[:, :-1] + a[:, 1:]
        b = b[:, :-1] + b[:, 1:]
        hu[k0:k1] += b * scale


def _check_config(cfg: PhantomConfig) -> None:
    problems = []
    if cfg.coarse_factor < 1:
        problems.append(f"coarse_factor {cfg.coarse_factor} < 1")
    if cfg.noise_hu < 0 or cfg.blur_mm < 0:
        problems.append(f"noise_hu {cfg.noise_hu} and blur_mm {cfg.blur_mm} must be >= 0")
    if len(cfg.nodule_texture_hu) != 5:
        problems.append("nodule_texture_hu needs one HU per LIDC texture rating 1..5")
    if not 0 < cfg.branch_taper_minor <= cfg.branch_taper_major < 1:
        problems.append("need 0 < branch_taper_minor <= branch_taper_major < 1")
    if min(cfg.vessel_min_radius_mm, cfg.airway_min_radius_mm) <= 0:
        problems.append("vessel_min_radius_mm and airway_min_radius_mm must be > 0")
    if problems:
        raise ConfigError("PhantomConfig: " + "; ".join(problems))


def _nodule_centres(geom: ScanGeometry, nodules: Sequence[NoduleSpec]) -> np.ndarray:
    """LPS (x, y) mm of each nodule's mask centroid -> [N, 2]."""
    out = []
    for spec in nodules:
        if spec.mask.any():
            k, i, j = np.argwhere(spec.mask).mean(axis=0) + np.asarray(spec.offset)
            if not 0 <= k < len(geom.slice_zvals):
                continue
            out.append((geom.x0 + j * geom.pixel_spacing, geom.y0 + i * geom.pixel_spacing))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def _fit_thorax(geom: ScanGeometry, nodules: Sequence[NoduleSpec], cfg: PhantomConfig) -> _Thorax:
    """The default-sized thorax, widened (up to ``body_fov_fraction_max`` of the FOV) until every nodule centre
    lies inside the rib cage: the radiologists' nodules sit in real lungs, so the phantom's lungs must hold them."""
    default = _Thorax(geom, cfg)
    centres = _nodule_centres(geom, nodules)
    if centres.size == 0:
        return default
    a_max = max(default.a, cfg.body_fov_fraction_max * geom.fov_mm)
    for a in np.linspace(default.a, a_max, 8):
        th = _Thorax(geom, cfg, half_width_mm=float(a))
        if np.all(th.cavity_sdf(centres[:, 0], centres[:, 1]) <= -cfg.nodule_cavity_margin_mm):
            return th
    log.info(
        "phantom %s: nodule(s) outside the widest rib cage; their lung halo is clipped to the cavity", geom.patient_id
    )
    return default


def synthesize_thorax(
    geom: ScanGeometry, nodules: Sequence[NoduleSpec], seed: int, cfg: PhantomConfig = PhantomConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Procedural chest CT at ``geom`` with ``nodules`` painted in; deterministic for a given ``seed`` (>= 0).

    Returns (hu float32 [Z, rows, cols], true lung mask bool [Z, rows, cols]). The lung mask holds the
    parenchyma with its vessels, intrapulmonary airways and nodules, not the trachea or main bronchi. Outside
    the circular field of view hu is ``air_hu`` (the DICOM writer may pad it).
    """
    _check_config(cfg)
    t0 = time.perf_counter()
    th = _fit_thorax(geom, nodules, cfg)
    grid, lz = _coarse_grid(geom, cfg)
    rng_tree, rng_tex, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    hu_c, lung_c = _coarse_anatomy(th, grid, rng_tree, rng_tex)
    t1 = time.perf_counter()

    ps, f = geom.pixel_spacing, _coarse_factor(geom, cfg)
    z = geom.slice_zvals
    blur_z = cfg.blur_mm / float(np.median(np.diff(z))) if z.size > 1 else 0.0
    lz_blur = ndimage.gaussian_filter1d(lz, blur_z, axis=0, mode="nearest") if blur_z > 0.05 else lz
    hu = np.empty(geom.shape, dtype=np.float32)
    _upsample(
        hu_c,
        lz_blur,
        _inplane_matrix(geom.rows, grid.y.size, f, cfg.blur_mm / ps),
        _inplane_matrix(geom.cols, grid.x.size, f, cfg.blur_mm / ps),
        hu,
    )
    lung = np.empty(geom.shape, dtype=bool)
    _upsample(
        lung_c,
        lz,
        _inplane_matrix(geom.rows, grid.y.size, f, 0.0),
        _inplane_matrix(geom.cols, grid.x.size, f, 0.0),
        lung,
    )
    t2 = time.perf_counter()

    _paint_main_airways(hu, lung, th, geom)
    _paint_nodules(hu, lung, nodules, geom, th)
    _add_noise(hu, rng_noise, cfg.noise_hu)
    outside = ~fov_mask(geom)
    hu[:, outside] = cfg.air_hu
    lung[:, outside] = False
    log.debug(
        "phantom %s: %s voxels, coarse anatomy %.2f s, upsampling %.2f s, nodules + noise %.2f s",
        geom.patient_id,
        hu.shape,
        t1 - t0,
        t2 - t1,
        time.perf_counter() - t2,
    )
    return hu, lung


# ---------------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _stored_values(hu: np.ndarray, quirks: DicomQuirks, outside: np.ndarray) -> np.ndarray:
    """HU [Y, X] -> stored pixel values (int16 or uint16) under ``quirks``, padded outside the FOV."""
    lo, hi, dtype = (-32768, 32767, np.int16) if quirks.signed else (0, 4095, np.uint16)
    stored = np.rint(hu.astype(np.float64) - quirks.rescale_intercept)
    if quirks.padding_hu is not None:
        stored[outside] = round(quirks.padding_hu - quirks.rescale_intercept)
    elif not quirks.signed:
        stored[outside] = 0
    return np.clip(stored, lo, hi).astype(dtype)


def _slice_dataset(geom: ScanGeometry, quirks: DicomQuirks, k: int, pixels: np.ndarray, frame_uid: str) -> Dataset:
    z = float(geom.slice_zvals[k])
    instance = len(geom.slice_zvals) - k  # the top slice is instance 1, as in LIDC
    sop_uid = generate_uid(entropy_srcs=[geom.series_uid, str(k)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUNGDDPM_PHANTOM"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "lungddpm phantom"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = "lungddpm procedural phantom"
    ds.PatientName = geom.patient_id
    ds.PatientID = geom.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SliceThickness = _ds(geom.slice_thickness)
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = geom.study_uid
    ds.SeriesInstanceUID = geom.series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(geom.x0), _ds(geom.y0), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geom.rows, geom.cols
    ds.PixelSpacing = [_ds(geom.pixel_spacing), _ds(geom.pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if quirks.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if quirks.signed else 0
    if quirks.padding_hu is not None:
        ds.PixelPaddingValue = round(quirks.padding_hu - quirks.rescale_intercept)
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _ds(quirks.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    return ds


def write_dicom_series(hu: np.ndarray, geom: ScanGeometry, out_dir: Path, quirks: DicomQuirks) -> list[Path]:
    """Write ``hu`` [Z, rows, cols] as a CT Image Storage series (one ``<InstanceNumber:04d>.dcm`` per slice,
    instance 1 = top slice) into ``out_dir``, atomically as a whole: the files are written into a temporary
    folder beside ``out_dir`` that then replaces it. Returns the paths in slice order (``paths[k]`` holds
    ``hu[k]``). Stored value = round(HU - intercept), clipped to the pixel type; outside the circular FOV the
    quirks' padding (or 0 for unsigned series without padding)."""
    hu = np.asarray(hu)
    if hu.shape != geom.shape:
        raise DicomError(
            f"{out_dir}: volume shape {hu.shape} does not match the geometry {geom.shape} (slices, rows, cols)"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    names = []
    try:
        outside = ~fov_mask(geom)
        frame_uid = generate_uid(entropy_srcs=[geom.series_uid, "frame of reference"])
        for k in range(hu.shape[0]):
            ds = _slice_dataset(geom, quirks, k, _stored_values(hu[k], quirks, outside), frame_uid)
            names.append(f"{ds.InstanceNumber:04d}.dcm")
            dcmwrite(tmp / names[-1], ds, enforce_file_format=True)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: wrote %d DICOM slices (%s)", out_dir, len(names), quirks)
    return [out_dir / n for n in names]
