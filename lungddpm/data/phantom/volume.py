"""Full resolution: upsampling the coarse anatomy, the main airways, the nodules, noise; the phantom itself."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, special

from ...errors import ConfigError
from .anatomy import _paint, _seg_sdf, _Thorax
from .paint import _coarse_anatomy, _coarse_factor, _coarse_grid, _inplane_matrix
from .spec import NoduleSpec, PhantomConfig, ScanGeometry, fov_mask

log = logging.getLogger(__name__)

_CHUNK_SLICES = 8  # slices per block when upsampling / adding noise (bounds the temporary memory)


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
    x, y = th.body_xy(geom.x0 + ps * np.arange(geom.cols), geom.y0 + ps * np.arange(geom.rows))
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
    c, ps, dz = th.cfg, geom.pixel_spacing, geom.slice_step_mm
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
        cols, rows = th.body_xy(geom.x0 + ps * np.arange(lo[2], hi[2]), geom.y0 + ps * np.arange(lo[1], hi[1]))
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
    """World (x, y, z) mm of each nodule's mask centroid and its equivalent-sphere radius (mm) -> [N, 4]; nodules
    whose centroid lies outside the slices are left out."""
    ps, z, dz = geom.pixel_spacing, geom.slice_zvals, geom.slice_step_mm
    out = []
    for spec in nodules:
        if spec.mask.any():
            k, i, j = np.argwhere(spec.mask).mean(axis=0) + np.asarray(spec.offset)
            if not 0 <= k <= len(z) - 1:
                continue
            radius = (3.0 * spec.mask.sum() * ps * ps * dz / (4.0 * math.pi)) ** (1.0 / 3.0)
            out.append((geom.x0 + j * ps, geom.y0 + i * ps, float(np.interp(k, np.arange(len(z)), z)), radius))
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def _depths(th: _Thorax, centres: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depths (mm, > 0 inside) of the nodule ``centres`` [N, 4] in the rib cage and in the lungs of ``th`` moved
    by each of ``shifts`` [S, 2] (x, y mm) -> two [S, N]."""
    x, y = th.body_xy(centres[None, :, 0] - shifts[:, :1], centres[None, :, 1] - shifts[:, 1:])
    z = np.broadcast_to(centres[None, :, 2], x.shape).astype(np.float32)
    cavity = th.cavity_sdf(x, y)
    return -cavity, -th.lung_sdf(x, y, z, cavity=cavity)


def _fit_thorax(geom: ScanGeometry, nodules: Sequence[NoduleSpec], cfg: PhantomConfig) -> _Thorax:
    """The thorax that holds the nodules: the radiologists' nodules sit in real lungs, so the phantom's must hold
    them too. Of the bodies inside the field of view (widths, depths, fat and shifts of the ``body_*`` fit keys),
    the one that puts the most nodule depth into the rib cage, then the most nodules into the lungs, with the
    least displacement from the default body (mm); nodules the lungs still miss get a lung bulge
    (:func:`_lung_bulges`)."""
    default = _Thorax(geom, cfg)
    centres = _nodule_centres(geom, nodules)
    if centres.size == 0:
        return default
    need = cfg.nodule_cavity_margin_mm
    r = math.floor(cfg.body_shift_max_mm / cfg.body_fit_step_mm) * cfg.body_fit_step_mm
    steps = np.arange(-r, r + 0.5 * cfg.body_fit_step_mm, cfg.body_fit_step_mm)
    shifts = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)
    widths = np.linspace(default.a, max(default.a, cfg.body_fov_fraction_max * geom.fov_mm), 8)
    aspects = np.linspace(cfg.body_aspect, max(cfg.body_aspect, cfg.body_aspect_max), 4)
    fats = np.linspace(1.0, min(1.0, cfg.fat_scale_min), 3)
    best: tuple[tuple[float, ...], tuple] | None = None
    for a in widths:
        for aspect in aspects:
            for fat in fats:
                th = _Thorax(geom, cfg, half_width_mm=float(a), aspect=float(aspect), fat_scale=float(fat))
                cav, lung = _depths(th, centres, shifts)
                cost = np.hypot(shifts[:, 0], shifts[:, 1]) + (a - default.a) + (th.b - default.b)
                cost += default.fat - th.fat
                deficit = np.round(np.maximum(need - cav, 0.0).sum(1), 1)  # 0.1 mm: the cost decides ties
                keys = np.stack([-deficit, (lung >= need).sum(1), -cost], 1)
                keys[~th.fits_fov(geom.fov_mm, shifts)] = -np.inf
                k = int(np.lexsort(keys.T[::-1])[-1])
                if best is None or tuple(keys[k]) > best[0]:
                    best = (tuple(float(v) for v in keys[k]), (float(a), float(aspect), float(fat), tuple(shifts[k])))
    assert best is not None
    if best[0][0] == -np.inf:  # no wider, deeper or moved body fits the field of view: the default one
        return default
    th = _Thorax(geom, cfg, *best[1])
    if best[0][0] < 0:
        log.info("phantom %s: nodule(s) outside the rib cage of the widest body; clipped", geom.patient_id)
    th.bulges = _lung_bulges(th, centres, need, geom.patient_id)
    return th


def _lung_bulges(th: _Thorax, centres: np.ndarray, need: float, case: str) -> np.ndarray:
    """Capsules [M, 8] (body frame) of lung from each nodule whose centre lies less than ``need`` mm inside the
    lungs to the nearest lung point (on a 3 mm grid within ``nodule_bulge_reach_mm``) deep enough to hold the
    nodule and its lung margin."""
    c = th.cfg
    _, depth = _depths(th, centres, np.zeros((1, 2)))
    steps = np.arange(-c.nodule_bulge_reach_mm, c.nodule_bulge_reach_mm + 1e-6, 3.0, dtype=np.float32)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) <= c.nodule_bulge_reach_mm]
    grid = grid[np.argsort(np.linalg.norm(grid, axis=1), kind="stable")]
    out = []
    for (x, y, z, radius), d in zip(centres, depth[0]):
        if d >= need:
            continue
        rho = radius + c.nodule_lung_margin_mm
        bx, by = th.body_xy(x, y)
        p = grid + np.array([bx, by, z], dtype=np.float32)
        deep = np.nonzero(-th.lung_sdf(p[:, 0], p[:, 1], p[:, 2]) >= rho)[0]
        if deep.size == 0:
            log.info("phantom %s: no lung within %.0f mm of the nodule at (%.0f, %.0f, %.0f) mm", case,
                     c.nodule_bulge_reach_mm, x, y, z)  # fmt: skip
            continue
        out.append([bx, by, z, *p[deep[0]], rho, rho])
    return np.asarray(out, dtype=np.float32).reshape(-1, 8)


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
    grid, lz = _coarse_grid(geom, cfg, th.centre)
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
