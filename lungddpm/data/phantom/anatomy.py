"""Shape primitives (signed distances in LPS mm, float32) and the thorax layout fitted to a scan."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .spec import PhantomConfig, ScanGeometry

_FAR = np.float32(1.0e4)  # "no shape here" distance (mm)


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

    def __init__(
        self,
        geom: ScanGeometry,
        cfg: PhantomConfig,
        half_width_mm: float | None = None,
        aspect: float | None = None,
        fat_scale: float = 1.0,
        centre_mm: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """The default body, or one ``half_width_mm`` wide with AP half-depth ``aspect`` x the width, subcutaneous
        fat ``fat_scale`` x the default, centred ``centre_mm`` (x, y) off the default position. The anatomy is
        drawn in this body's frame: world (x, y) minus ``centre_mm`` (:meth:`body_xy`)."""
        self.cfg = cfg
        a = min(cfg.body_half_width_mm, cfg.body_fov_fraction * geom.fov_mm) if half_width_mm is None else half_width_mm
        s = self.s = a / cfg.body_half_width_mm
        self.a, self.b, self.cy = a, (cfg.body_aspect if aspect is None else aspect) * a, cfg.body_y_offset_mm * s
        self.centre = (float(centre_mm[0]), float(centre_mm[1]))
        self.bulges = np.zeros((0, 8), dtype=np.float32)  # lung capsules reaching nodules (volume._lung_bulges)
        self.skin, self.fat, self.muscle = cfg.skin_mm * s, cfg.fat_mm * s * fat_scale, cfg.muscle_mm * s
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

    def body_xy(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World (x, y) mm -> this body's frame (float32)."""
        return (np.asarray(x) - self.centre[0]).astype(np.float32), (np.asarray(y) - self.centre[1]).astype(np.float32)

    def fits_fov(self, fov_mm: float, shifts: np.ndarray) -> np.ndarray:
        """bool [S]: whether the body's outline, moved by each of ``shifts`` [S, 2] (x, y mm), lies inside the
        circular field of view (diameter ``fov_mm``, image centre)."""
        t = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
        x = self.centre[0] + shifts[:, :1] + self.a * np.cos(t)
        y = self.centre[1] + shifts[:, 1:] + self.cy + self.b * np.sin(t)
        return np.hypot(x, y).max(1) <= fov_mm / 2

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
        for seg in self.bulges:  # lung reaching a nodule the template misses: over the mediastinum, not the wall
            d = np.minimum(d, np.maximum(_seg_sdf(x, y, z, seg), cavity))
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
    """World (LPS, mm) landmarks of the phantom without nodules for this geometry: the trachea centre
    ``trachea_xy`` (x, y at the top slice), ``carina``, ``hilum_right``, ``hilum_left`` (x, y, z) and the
    ``apex_z`` / ``dome_right_z`` / ``dome_left_z`` heights."""
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
