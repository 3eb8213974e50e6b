"""The coarse anatomy: body, mediastinum, lungs, vessels, airways, bones and texture on the coarse grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .anatomy import _FAR, _ellipse_sdf, _Grid, _occ, _paint, _Thorax, _tubes_sdf
from .spec import PhantomConfig, ScanGeometry
from .trees import _grow_all_trees


def _coarse_factor(geom: ScanGeometry, cfg: PhantomConfig) -> int:
    return max(1, min(cfg.coarse_factor, math.floor(cfg.coarse_max_mm / geom.pixel_spacing)))


def _coarse_grid(
    geom: ScanGeometry, cfg: PhantomConfig, centre_mm: tuple[float, float] = (0.0, 0.0)
) -> tuple[_Grid, np.ndarray]:
    """The coarse grid, in the frame of a body centred ``centre_mm`` (x, y) off the default, and the linear
    z-interpolation matrix [Z, Zc] from it to the slices."""
    f, ps = _coarse_factor(geom, cfg), geom.pixel_spacing
    h = f * ps
    ny, nx = -(-geom.rows // f), -(-geom.cols // f)
    xc = geom.x0 - centre_mm[0] + (np.arange(nx) * f + (f - 1) / 2) * ps
    yc = geom.y0 - centre_mm[1] + (np.arange(ny) * f + (f - 1) / 2) * ps
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
