"""Lesion-scale regions of interest (DESIGN §5): isotropic ROIs resampled from the *source* CT at native resolution.

Per case: one ROI per consensus nodule and ``rois_per_nodule`` (centre moved by a seeded uniform jitter; one that
the scan's edges hold on the centre of an earlier one of its nodule is left out, with a warning), and
``free_per_case`` nodule-free lung ROIs (centres deep inside the lung, no nodule inside, not overlapping each
other): the insertion sites and the segmentation negatives. Each ROI is written as ``<roi>_ct.nii.gz`` (int16 HU),
``<roi>_layout.nii.gz`` (0/1/2: lung from the fine lung mask, nodules = consensus coverage at the ROI spacing) and
``<roi>_texture.nii.gz`` (0, or 1 + the texture class of the nodule covering the voxel), all with the ROI's true
affine so that they overlay the full CT; ``rois.csv`` (written last) has one row per ROI saying where it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..config import Config
from ..data.nodules import UNKNOWN, Nodule
from ..diffusion.encoding import TEXTURE_CLASSES, UNKNOWN_TEXTURE, texture_class
from ..errors import LayoutError
from ..io import Geometry, read_csv, read_volume, safe_component, write_csv, write_volume
from .grid import SliceGrid, grid_geometry, nodule_centroid_world, nodule_labels, resample, resample_regular
from .layout import NODULE, compose_layout

log = logging.getLogger(__name__)

# Two jittered ROIs of one nodule whose centres lie this close (mm, every axis) are one ROI: only the scan's edges,
# holding both draws at the same place, bring them so close (two free draws within it: a chance of about 1e-18)
SAME_CENTRE_MM = 1e-6

ROI_COLUMNS = (
    "roi", "case_id", "kind", "nodule", "texture", "texture_class", "diameter_mm", "malignancy",
    "centre_x", "centre_y", "centre_z", "offset_x", "offset_y", "offset_z",
    "nodule_x", "nodule_y", "nodule_z", "spacing_mm", "size", "padded_voxels", "ct", "layout", "texture_map",
)  # fmt: skip


@dataclass(frozen=True)
class RoiSettings:
    """``lesion.roi`` of the config."""

    spacing_mm: float
    size: int
    nodule_jitter_mm: float
    rois_per_nodule: int
    free_per_case: int
    site_min_depth_mm: float
    nodule_fraction: float
    edge: str
    seed: int

    @classmethod
    def from_config(cls, cfg: Config) -> RoiSettings:
        return cls(**cfg.raw["lesion"]["roi"])

    @property
    def half_extent_mm(self) -> float:
        """Distance from the ROI centre to its outermost voxel centres."""
        return (self.size - 1) / 2 * self.spacing_mm

    def geometry(self, centre_xyz: np.ndarray) -> Geometry:
        return grid_geometry(np.asarray(centre_xyz, float), (self.spacing_mm,) * 3, (self.size,) * 3)


@dataclass(frozen=True)
class SourceCT:
    """A case's CT on its native grid, its fine lung mask and its consensus nodules."""

    case_id: str
    hu: np.ndarray  # [K, I, J] HU: float32 as read from DICOM (or the studio's int16 CT)
    grid: SliceGrid
    lung_fine: np.ndarray  # bool [Zf, Yf, Xf]
    fine: Geometry
    nodules: Sequence[Nodule]
    padding_hu: float
    # index boxes (offset, shape) [Z, Y, X] of real nodules not among ``nodules`` (data.min_readers), avoided too
    avoid: Sequence[tuple[tuple[int, int, int], tuple[int, int, int]]] = ()

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """LPS (x, y, z) of the first and last voxel centres."""
        _k, i, j = self.hu.shape
        g = self.grid
        lo = np.array([g.x0, g.y0, g.z_positions[0]])
        hi = np.array([g.x0 + (j - 1) * g.col_spacing, g.y0 + (i - 1) * g.row_spacing, g.z_positions[-1]])
        return lo, hi


def shift_inside(centre: np.ndarray, half: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Move ``centre`` (x, y, z) so that the cube of half-edge ``half`` lies inside [lo, hi] where it can; on an
    axis shorter than the cube the cube is centred on the scan."""
    out = np.asarray(centre, float).copy()
    for a in range(3):
        if hi[a] - lo[a] < 2 * half:
            out[a] = (lo[a] + hi[a]) / 2
        else:
            out[a] = min(max(out[a], lo[a] + half), hi[a] - half)
    return out


def shift_inside_by_steps(centre: np.ndarray, half: float, lo: np.ndarray, hi: np.ndarray, step: float) -> np.ndarray:
    """:func:`shift_inside`, then on each axis it moved on by the least part of ``step`` (mm) that leaves the centre
    a whole number of steps from ``centre`` where the cube still fits: a point keeps its sub-voxel position in the
    cube's grid of that ``step`` (the studio's nodule stays centred on the click near the scan's edge)."""
    centre = np.asarray(centre, float)
    out = shift_inside(centre, half, lo, hi)
    for a in np.flatnonzero(np.abs(out - centre) > 1e-6):
        rest = (centre[a] - out[a]) % step
        for delta in sorted((rest, rest - step), key=abs):
            if lo[a] + half - 1e-6 <= out[a] + delta <= hi[a] - half + 1e-6:
                out[a] += delta
                break
    return out


def outside_voxels(src: SourceCT, geometry: Geometry, size: int) -> int:
    """ROI voxel centres beyond the scan (which resampling fills with padding): over half a pixel or half a slice
    beyond the edge voxels' centres, as :func:`lungddpm.preprocessing.grid.resample` reads them."""
    lo, hi = src.bounds()
    world = geometry.index_to_world(np.indices((size,) * 3).reshape(3, -1).T)
    tol = np.array([src.grid.col_spacing, src.grid.row_spacing, src.grid.slice_step]) / 2 + 1e-3
    return int(np.any((world < lo - tol) | (world > hi + tol), axis=1).sum())


def cut_roi(src: SourceCT, geometry: Geometry, s: RoiSettings) -> dict[str, np.ndarray]:
    """The ROI of ``geometry`` from the source: ``ct`` int16 HU, ``layout`` uint8 0/1/2, ``texture`` uint8 map."""
    size = (s.size,) * 3
    ct = resample(src.hu, src.grid, geometry, size, order=1, fill=src.padding_hu)
    lung = resample_regular(src.lung_fine.astype(np.float32), src.fine, geometry, size, 1, 0.0, antialias=False) > 0.5
    labels, _ = nodule_labels(list(src.nodules), src.grid, geometry, size, s.nodule_fraction)
    texture = np.zeros(size, np.uint8)
    for n, nod in enumerate(src.nodules, start=1):
        texture[labels == n] = 0 if nod.texture == UNKNOWN else 1 + texture_class(nod.texture)
    return {"ct": np.round(ct).astype(np.int16), "layout": compose_layout(lung, labels), "texture": texture}


def nodule_boxes(
    src: SourceCT, margin_mm: float, reach: float = 0.0, tight: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """World (x, y, z) boxes of the consensus masks' grids (pylidc's: every reader's outline; ``tight``: the voxels
    of the consensus itself) and ``src.avoid``, grown by ``margin_mm`` and, where ``reach`` > 0, per side by the
    larger of ``reach`` and the native step beyond the box there (the pixel; in z the step to the next slice, which
    a linear sample outside the box still reads)."""
    g, z, boxes = src.grid, src.grid.z_positions, []
    spans = []
    for nod in src.nodules:
        on = np.argwhere(nod.mask) if tight else np.zeros((0, 3), int)
        first, size = (on.min(0), on.max(0) - on.min(0) + 1) if len(on) else ((0, 0, 0), nod.mask.shape)
        spans.append((tuple(int(o + f) for o, f in zip(nod.offset, first)), tuple(int(s) for s in size)))
    for (k0, i0, j0), (nk, ni, nj) in [*spans, *src.avoid]:
        lo = np.array([g.x0 + j0 * g.col_spacing, g.y0 + i0 * g.row_spacing, z[k0]]) - margin_mm
        hi = np.array([g.x0 + (j0 + nj - 1) * g.col_spacing, g.y0 + (i0 + ni - 1) * g.row_spacing, z[k0 + nk - 1]])
        if reach:
            dz = (z[k0] - z[k0 - 1] if k0 else 0.0), (z[k0 + nk] - z[k0 + nk - 1] if k0 + nk < len(z) else 0.0)
            lo = lo - np.maximum(reach, [g.col_spacing, g.row_spacing, dz[0]])
            hi = hi + np.maximum(reach, [g.col_spacing, g.row_spacing, dz[1]])
        boxes.append((lo, hi + margin_mm))
    return boxes


def in_boxes(world: np.ndarray, boxes: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """bool [N]: points ``world`` [N, 3] (x, y, z) inside any of ``boxes`` (:func:`nodule_boxes`)."""
    return np.any([np.all((world >= lo) & (world <= hi), axis=1) for lo, hi in boxes] or [[False] * len(world)], 0)


def deep_lung(src: SourceCT, min_depth_mm: float) -> np.ndarray:
    """Fine-grid indices [N, 3] (z, y, x) of lung voxels at least ``min_depth_mm`` inside the fine lung mask."""
    depth = ndi.distance_transform_edt(src.lung_fine, sampling=src.fine.spacing)
    return np.argwhere(src.lung_fine & (depth >= min_depth_mm))  # depth 0 outside: not lung at min_depth_mm 0


def free_sites(src: SourceCT, s: RoiSettings, rng: np.random.Generator, tries: int = 4000) -> list[np.ndarray]:
    """Centres (x, y, z) of ``free_per_case`` nodule-free ROIs: at least ``site_min_depth_mm`` inside the fine
    lung mask, the cube inside the scan, away from each other and from every nodule: its faces a voxel, and the
    native step beyond the nodule (the reach of their anti-aliased linear samples: thick slices), off the nodule's
    voxel centres (:func:`nodule_boxes` with ``reach``)."""
    if s.free_per_case == 0:
        return []
    cand, (lo, hi), half = deep_lung(src, s.site_min_depth_mm), src.bounds(), s.half_extent_mm
    boxes = nodule_boxes(src, half, reach=s.spacing_mm)
    chosen: list[np.ndarray] = []
    for _ in range(tries if cand.size else 0):
        c = src.fine.index_to_world(cand[int(rng.integers(len(cand)))][None])[0]
        if np.any(c - half < lo) or np.any(c + half > hi):
            continue
        if in_boxes(c[None], boxes)[0]:
            continue
        if any(np.all(np.abs(c - o) < 2 * half + s.spacing_mm) for o in chosen):
            continue
        chosen.append(c)
        if len(chosen) == s.free_per_case:
            return chosen
    raise LayoutError(
        f"{src.case_id}: found {len(chosen)} of lesion.roi.free_per_case={s.free_per_case} nodule-free lung ROIs "
        f"({s.size}^3 at {s.spacing_mm} mm, centre >= {s.site_min_depth_mm} mm inside the lung, away from nodules) "
        "in this scan; lower lesion.roi.free_per_case, lesion.roi.size or lesion.roi.site_min_depth_mm"
    )


def _jitter(rng: np.random.Generator, s: RoiSettings) -> np.ndarray:
    return rng.uniform(-s.nodule_jitter_mm, s.nodule_jitter_mm, size=3)


def roi_stream(seed: int, case: str, *key: int) -> np.random.Generator:
    """The case's random stream ``key``: (0,) its free sites, (1, n) nodule n's jitters. Each its own, so that the
    free sites draw the same candidates whatever ``rois_per_nodule`` or the nodule list (only a candidate that a
    nodule's box takes is skipped, moving the sites after it), and a nodule's first ROIs stay whatever the others'
    count (one stream for all moved every site when one count changed)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *case.encode()], spawn_key=key))


def jittered_centre(
    centroid: np.ndarray, box: tuple[np.ndarray, np.ndarray], jitter: np.ndarray, s: RoiSettings
) -> tuple[np.ndarray, bool]:
    """The centre (x, y, z) of a nodule's ROI: ``centroid`` moved by ``jitter`` (drawn uniform in +-nodule_jitter_mm),
    per axis rescaled into the centres whose cube keeps the nodule's ``box`` (:func:`nodule_boxes` with ``reach``)
    off its faces; where the box is longer than the cube, clipped to the centres whose cube lies within it. Returns
    the centre and whether the whole box fits."""
    half, j = s.half_extent_mm, s.nodule_jitter_mm
    a_lo, a_hi = box[1] - half, box[0] + half  # the whole box inside the cube for centres in [a_lo, a_hi]
    out = centroid + jitter
    for a in range(3):
        if a_lo[a] > a_hi[a]:  # a nodule longer than the cube on this axis: the cube within it
            out[a] = min(max(out[a], a_hi[a]), a_lo[a])
        elif not (a_lo[a] <= centroid[a] - j and centroid[a] + j <= a_hi[a]):
            lo, hi = max(centroid[a] - j, a_lo[a]), min(centroid[a] + j, a_hi[a])
            out[a] = lo + (jitter[a] + j) / (2 * j) * (hi - lo) if lo <= hi else min(max(centroid[a], a_lo[a]), a_hi[a])
    return out, bool(np.all(a_lo <= a_hi))


def extract_rois(src: SourceCT, s: RoiSettings, out_dir: Path) -> list[dict[str, Any]]:
    """Write every ROI of ``src`` into ``out_dir`` and ``rois.csv`` (last; an earlier table there is removed first,
    so that a rerun cut short leaves no table naming ROI files it overwrote); returns the table rows."""
    case = safe_component(src.case_id, "case id")
    lo, hi = src.bounds()
    plans: list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]] = []
    boxes = nodule_boxes(src, 0.0, reach=s.spacing_mm, tight=True)  # src.nodules first, in order
    for n, nod in enumerate(src.nodules, start=1):
        if not nod.mask.any():
            log.warning("%s: nodule %d has an empty consensus mask; no ROI", case, n)
            continue
        centroid = nodule_centroid_world(nod, src.grid)
        info = {
            "kind": "nodule",
            "nodule": n,
            "texture": None if nod.texture == UNKNOWN else nod.texture,
            "texture_class": UNKNOWN_TEXTURE if nod.texture == UNKNOWN else TEXTURE_CLASSES[texture_class(nod.texture)],
            "diameter_mm": round(nod.diameter_mm, 2),
            "malignancy": None if nod.malignancy == UNKNOWN else nod.malignancy,
        }
        centres: list[tuple[int, np.ndarray]] = []  # (r, centre) of the ROIs of this nodule kept so far
        rng = roi_stream(s.seed, case, 1, n)
        for r in range(s.rois_per_nodule):
            wanted, fits = jittered_centre(centroid, boxes[n - 1], _jitter(rng, s), s)
            if not fits and r == 0:
                reach = " x ".join(f"{v:.1f}" for v in boxes[n - 1][1] - boxes[n - 1][0])
                log.warning("%s: nodule %d (%.1f mm across; %s mm in x, y, z with the reach of its samples) does not "
                            "fit between the %.1f mm ROI's face voxels: its ROIs may cut it (raise lesion.roi.size "
                            "for whole nodules)", case, n, nod.diameter_mm, reach, 2 * s.half_extent_mm)  # fmt: skip
            centre = shift_inside(wanted, s.half_extent_mm, lo, hi)
            same = [k for k, c in centres if np.allclose(c, centre, rtol=0.0, atol=SAME_CENTRE_MM)]
            if same:  # no jitter, or the scan's edges held it on every axis: a copy would weigh it twice
                why = ("the scan's edges leave its centre no room to move" if s.nodule_jitter_mm else
                       "lesion.roi.nodule_jitter_mm is 0")  # fmt: skip
                log.warning("%s: ROI %s_n%d_%d would repeat %s_n%d_%d (%s); not written", case, case, n, r, case, n,
                            same[0], why)  # fmt: skip
                continue
            centres.append((r, centre))
            plans.append((f"{case}_n{n}_{r}", centre, centroid, info))
    for j, centre in enumerate(free_sites(src, s, roi_stream(s.seed, case, 0))):
        plans.append((f"{case}_f{j}", centre, centre, {"kind": "free"}))

    rows = []
    out_dir = Path(out_dir)
    (out_dir / "rois.csv").unlink(missing_ok=True)
    for name, centre, target, info in plans:
        geometry = s.geometry(centre)
        padded = outside_voxels(src, geometry, s.size)
        if padded and s.edge == "refuse":
            raise LayoutError(
                f"{case}: ROI {name} ({s.size}^3 at {s.spacing_mm} mm) crosses the scan's edge even when shifted "
                f"inward ({padded} voxels outside the scan, which covers z {lo[2]:.1f}..{hi[2]:.1f} mm); set "
                "lesion.roi.edge: pad to fill them with preprocess.padding_hu, or lower lesion.roi.size"
            )
        if padded:
            log.warning("%s: ROI %s crosses the scan's edge: %d voxels padded with %.0f HU", case, name, padded,
                        src.padding_hu)  # fmt: skip
        roi = cut_roi(src, geometry, s)
        shell = roi["layout"] == NODULE
        shell[1:-1, 1:-1, 1:-1] = False
        if info["kind"] == "nodule" and shell.any():  # a neighbour, or its nodule (too long, or at the scan's edge)
            log.warning("%s: ROI %s has %d nodule voxels on its faces (a neighbour, or its %s mm nodule cut by the "
                        "%.1f mm ROI or by the scan's edge)", case, name, shell.sum(), info["diameter_mm"],
                        s.size * s.spacing_mm)  # fmt: skip
        files = {key: out_dir / f"{name}_{key}.nii.gz" for key in ("ct", "layout", "texture")}
        for key, path in files.items():
            write_volume(path, roi[key], geometry)
        offset = centre - target
        nodule_at = (
            {f"nodule_{a}": round(float(v), 3) for a, v in zip("xyz", target)} if info["kind"] == "nodule" else {}
        )
        rows.append({"roi": name, "case_id": case, **info,
                     **{f"centre_{a}": round(float(v), 3) for a, v in zip("xyz", centre)},
                     **{f"offset_{a}": round(float(v), 3) for a, v in zip("xyz", offset)}, **nodule_at,
                     "spacing_mm": s.spacing_mm, "size": s.size, "padded_voxels": padded, "ct": files["ct"].name,
                     "layout": files["layout"].name, "texture_map": files["texture"].name})  # fmt: skip
    write_csv(out_dir / "rois.csv", rows, ROI_COLUMNS)
    log.info("%s: %d nodule ROIs, %d nodule-free ROIs -> %s", case, sum(r["kind"] == "nodule" for r in rows),
             sum(r["kind"] == "free" for r in rows), out_dir)  # fmt: skip
    return rows


def load_source(case_id: str, preprocessed: Path, cfg: Config, base: Path = Path(".")) -> SourceCT:
    """The native CT of ``case_id`` read from its source (``data.sources.read_case``; relative folders under
    ``base``), its fine lung mask and its nodules; LIDC's clusters below ``data.min_readers`` as boxes to avoid."""
    from ..data import lidc
    from ..data.sources import read_case

    scan = read_case(cfg, case_id, base)
    lung_fine, fine = read_volume(Path(preprocessed) / "lung_fine.nii.gz")
    avoid = [] if cfg.data.source == "images" else lidc.unused_cluster_boxes(case_id, cfg.data.min_readers)
    return SourceCT(case_id, scan.series.hu, SliceGrid.of_series(scan.series), lung_fine > 0, fine, scan.nodules,
                    cfg.preprocess.padding_hu, avoid)  # fmt: skip


def read_roi_table(path: Path) -> list[dict[str, str]]:
    """Rows of a ``rois.csv``; the ROI files it names lie beside it."""
    if not Path(path).is_file():
        raise LayoutError(f"{path}: no ROI table; run the rois rule (lungddpm rois) for this case")
    return read_csv(path)


def own_nodule(mask: np.ndarray, geometry: Geometry, row: dict[str, str]) -> np.ndarray:
    """The voxels of ``mask`` [D, H, W] (an ROI's nodule voxels of one class) that are the ROI's own nodule: the
    26-connected components within its radius (``diameter_mm`` / 2, 0 if not recorded, + a voxel) of its centroid
    (``nodule_x/y/z``, else the ROI's centre), and the one nearest to it; another nodule of the class is left out."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    keys = ("nodule_x", "nodule_y", "nodule_z")
    centre = (geometry.world_to_index(np.array([float(row[k]) for k in keys]))[0] if all(row.get(k) for k in keys)
              else (np.array(mask.shape) - 1) / 2)  # fmt: skip
    voxels = np.argwhere(mask)
    dist = np.linalg.norm((voxels - centre) * np.asarray(geometry.spacing), axis=1)  # mm; spacing is (z, y, x)
    near = labels[tuple(voxels.T)]
    reach = float(row.get("diameter_mm") or 0) / 2 + max(geometry.spacing)
    return np.isin(labels, [near[np.argmin(dist)], *near[dist <= reach]])


def real_nodule_rois(tables: Sequence[Path]) -> Iterator[tuple[dict[str, str], np.ndarray, Geometry, np.ndarray]]:
    """Each real nodule's first ROI in ``rois.csv`` tables: (row, HU [D, H, W], geometry, bool mask of its own
    texture class's voxels, or of the unrated nodule voxels for class ``unknown``, of that nodule only
    (:func:`own_nodule`)), for nodules whose mask is not empty (the others named in a warning)."""
    for table in tables:
        for row in read_roi_table(Path(table)):
            if row["kind"] != "nodule" or not row["roi"].endswith("_0"):
                continue
            ct, geometry = read_volume(Path(table).parent / row["ct"])
            tex, _ = read_volume(Path(table).parent / row["texture_map"])
            if row["texture_class"] == UNKNOWN_TEXTURE:
                mask = (tex == 0) & (read_volume(Path(table).parent / row["layout"])[0] == NODULE)
            else:
                mask = tex == 1 + TEXTURE_CLASSES.index(row["texture_class"])
            if not mask.any():  # e.g. another nodule's class painted over it in the texture map
                log.warning("%s: ROI %s holds no voxel of its nodule's class (%s); left out of the real nodules",
                            table, row["roi"], row["texture_class"])  # fmt: skip
                continue
            yield row, ct, geometry, own_nodule(mask, geometry, row)
