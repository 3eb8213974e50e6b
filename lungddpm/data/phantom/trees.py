"""Branching trees (vessels, airways), grown breadth-first and vectorised per generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .anatomy import _Thorax
from .spec import PhantomConfig


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
