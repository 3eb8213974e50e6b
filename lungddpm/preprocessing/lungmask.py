"""Classical lung segmentation on a CT resampled to a fine isotropic spacing (about 2 mm).

Threshold -> remove outside air and table -> fill the body -> remove trachea and main bronchi (grown from the
trachea in the top slices) -> keep the lung-sized components (not thin pockets of room air that the body encloses
with the arms or a table) -> close (vessels, small juxtapleural nodules) -> pleural-surface correction (dents of the
costal surface up to ``pleural_max_diameter_mm``: juxtapleural nodules and masses) -> fill holes slice by slice.
Deep lung-mask tools fetch weights at run time, which cannot work offline (DESIGN §3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from ..config import LungmaskConfig

log = logging.getLogger(__name__)

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class LungmaskResult:
    lung: np.ndarray  # bool [Z, Y, X]
    airway: np.ndarray  # bool [Z, Y, X] trachea + main bronchi as removed
    lung_ml: float
    airway_ml: float
    n_components: int
    body_midline_x: float  # fractional x index of the torso's left-right centre (patient midline, :func:`body_midline`)
    edge_ml: float = 0.0  # lung lost to the image's edge (:func:`lung_beside_outside_air`), after the repair
    edge_slices: tuple[int, ...] = ()  # the slices where it was lost
    edge_repaired_ml: float = 0.0  # air cut off by the image's edge taken back as lung (:func:`edge_cut_lung`)


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(mask, structure=_IN_PLANE)


def _lung_holes(lung: np.ndarray, airway: np.ndarray, midline: float, spacing: np.ndarray, max_mm: float) -> np.ndarray:
    """The in-plane holes of ``lung`` [Z, Y, X] that are lung (vessels, nodules), the ``airway`` never: those on one
    side of the body ``midline`` (x index), and those across it no larger than a disc of ``max_mm``. Where the lungs
    meet in front of the mediastinum and the closing bridges the gap behind it, the mediastinum is a large hole
    across the midline of the joined lungs: it stays out; a nodule of a lung that reaches past the midline is in.
    A main bronchus that the lung encloses in-plane stays out too (it was put back: 15-64 voxels per demo case)."""
    labels, n = ndi.label(_fill_holes_2d(lung) & ~lung, structure=_IN_PLANE)
    if n == 0:
        return np.zeros_like(lung)
    cols = np.broadcast_to(np.arange(lung.shape[2]) < midline, lung.shape)
    left = ndi.maximum(cols, labels, np.arange(1, n + 1)).astype(bool)
    right = ~ndi.minimum(cols, labels, np.arange(1, n + 1)).astype(bool)
    small = np.bincount(labels.ravel())[1:] * float(spacing[1] * spacing[2]) <= np.pi * (max_mm / 2) ** 2
    one_side, across = ~(left & right), left & right & small
    return np.concatenate([[False], one_side | across])[labels] & ~airway


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.round(radius_vox).astype(int), 0)
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    rz, ry, rx = (np.maximum(radius_vox, 0.5)).tolist()
    return (zz / rz) ** 2 + (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0


def outside_air(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Air connected, within its axial slice, to the image border: room air, table gap. hu: [Z, Y, X]."""
    air = hu < threshold_hu
    labels, _ = ndi.label(air, structure=_IN_PLANE)
    border = np.unique(
        np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    )
    border = border[border > 0]
    return np.isin(labels, border)


TRACHEA_SEED_MM = 22.0  # the trachea is seeded in the top this many mm of the scan (11 slices of 2 mm; it was 11
# slices at any spacing: 5.5 mm of a 0.5 mm grid, 55 mm of a 5 mm one)


def _airway(hu: np.ndarray, body: np.ndarray, midline_x: float, spacing: np.ndarray, cfg: LungmaskConfig) -> np.ndarray:
    """Trachea and main bronchi: grown through HU < airway threshold from a trachea seed near the midline in the top
    slices."""
    pixel_area = float(spacing[1] * spacing[2])
    candidates = (hu < cfg.airway_threshold_hu) & body
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    if cols.size == 0:
        return np.zeros_like(body)
    centre_x = midline_x
    tolerance_x = 0.12 * (cols[-1] - cols[0] + 1)
    max_area = np.pi * (cfg.airway_max_diameter_mm / 2) ** 2
    top = max(1, round(TRACHEA_SEED_MM / float(spacing[0])))  # 11 slices at the 2 mm fine grid
    for z in range(hu.shape[0] - 1, max(hu.shape[0] - 1 - top, -1), -1):  # top slices (z ascending = superior last)
        labels, n = ndi.label(candidates[z])
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        areas = ndi.sum(np.ones_like(labels), labels, idx) * pixel_area
        cx = np.array([c[1] for c in ndi.center_of_mass(np.ones_like(labels), labels, idx)])
        ok = (areas >= 20.0) & (areas <= max_area) & (np.abs(cx - centre_x) <= tolerance_x)
        if not ok.any():
            continue
        # each near-midline spot grown through the volume; the trachea grows furthest (the carina, the bronchi),
        # where the spot nearest the midline may be swallowed air in the oesophagus, which left the trachea as lung
        grown, _ = ndi.label(candidates)
        ids = [grown[z, y, x] for y, x in (np.argwhere(labels == label)[0] for label in idx[ok])]
        volumes_ml = np.bincount(grown.ravel())[ids] * pixel_area * spacing[0] / 1000
        if volumes_ml.max() > 400:  # leaked into emphysematous lung: do not carve the lungs
            log.warning("airway growing leaked (%.0f mL); trachea not removed", volumes_ml.max())
            return np.zeros_like(body)
        return ndi.binary_dilation(grown == ids[int(np.argmax(volumes_ml))], iterations=1) & body
    log.warning("no trachea found in the top slices; airways not removed")
    return np.zeros_like(body)


def _hull(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    return convex_hull_image(mask) if mask.sum() >= 3 else mask


MOUTH_ON_WALL = 0.5  # a dent is costal when at least this share of its mouth lies on the hull of both lungs
# dents at least this large (mm^2) seed a nodule; smaller ones (mostly the pixelation of the surface) join only where
# a seed of a neighbouring slice covers them (the nodule's poles)
SEED_DENT_MM2 = 16.0
_RING = np.ones((3, 3), bool)


def _costal_dents(lung: np.ndarray, body: np.ndarray, sides: tuple[np.ndarray, ...], max_px: float) -> np.ndarray:
    """Labelled costal dents of one axial slice with both lungs (0 = none). lung, body: bool [Y, X]."""
    out = np.zeros(lung.shape, np.int32)
    on_wall = ndi.binary_dilation(~_hull(lung), structure=_RING)  # next to the outside of both lungs' hull
    for side in sides:
        half = lung & side[None, :]
        hull = _hull(half)
        dents, n = ndi.label(hull & ~half & body, structure=_RING)
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        mouth = ndi.binary_dilation(~hull, structure=_RING) & (dents > 0)
        mouth_px = ndi.sum(mouth, dents, index)
        wall_px = ndi.sum(mouth & on_wall, dents, index)
        sizes = ndi.sum(dents > 0, dents, index)
        for d in index[(mouth_px > 0) & (wall_px >= MOUTH_ON_WALL * mouth_px) & (sizes <= max_px)]:
            out[dents == d] = out.max() + 1
    return out


def pleural_dents(
    lung: np.ndarray, body: np.ndarray, midline_x: float, spacing: np.ndarray, max_diameter_mm: float
) -> np.ndarray:
    """Dents of the lungs' costal surface (juxtapleural nodules and masses), per axial slice with both lungs: the
    components of (convex hull of one lung - that lung) inside the body whose mouth (their pixels next to the
    outside of that lung's hull) lies mostly on the border of the hull of both lungs — the chest wall; the cardiac
    and hilar notches open onto the mediastinum, inside that hull, and stay out — each at most the area of two
    discs of ``max_diameter_mm``. Dents of at least ``SEED_DENT_MM2`` are kept, smaller ones only where a kept
    dent of a slice within its radius covers them. lung, body: bool [Z, Y, X]; returns the bool voxels to add."""
    added = np.zeros_like(lung)
    if max_diameter_mm <= 0:
        return added
    px_mm2 = float(spacing[1] * spacing[2])
    max_px, seed_px, min_px = 2 * np.pi * (max_diameter_mm / 2) ** 2 / px_mm2, SEED_DENT_MM2 / px_mm2, 100.0 / px_mm2
    cols = np.arange(lung.shape[2])
    sides = (cols < midline_x, cols >= midline_x)  # the right lung (image left), the left lung
    dents = np.zeros(lung.shape, np.int32)
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        if min((lung[z] & side[None, :]).sum() for side in sides) >= min_px:  # both lungs, not a tip, in the slice
            dents[z] = _costal_dents(lung[z], body[z], sides, max_px)
    cover = np.zeros_like(lung)  # where the seeds lie, spread over the slices their radius reaches
    for z in range(lung.shape[0]):
        for d in range(1, int(dents[z].max()) + 1):
            dent = dents[z] == d
            if dent.sum() >= seed_px:
                added[z] |= dent
                reach = int(np.ceil(np.sqrt(dent.sum() * px_mm2 / np.pi) / float(spacing[0])))
                cover[max(z - reach, 0) : z + reach + 1] |= ndi.binary_dilation(dent, structure=_RING)[None]
    for z in range(lung.shape[0]):
        for d in np.unique(dents[z][cover[z] & ~added[z] & (dents[z] > 0)]):
            added[z] |= dents[z] == d
    return added


def _over(mask: np.ndarray) -> np.ndarray:
    """bool [Z, Y, X]: the voxels whose neighbour in the slice above or below is in ``mask`` (bool [Z, Y, X])."""
    over = np.zeros_like(mask)
    over[1:] |= mask[:-1]
    over[:-1] |= mask[1:]
    return over


def lung_beside_outside_air(lung: np.ndarray, outside: np.ndarray, voxel_ml: float) -> tuple[float, tuple[int, ...]]:
    """mL of ``outside`` air (:func:`outside_air`) where the lung lies in a neighbouring slice, and those slices: a
    lung that reaches the edge of the image (or of a circular field of view, padded as air) joins the room air
    there and is cut from the body, and the part below the cut can be dropped as bowel gas. Elsewhere a chest wall
    separates the lungs from the room air. lung, outside: bool [Z, Y, X]."""
    per_slice = (outside & _over(lung)).sum(axis=(1, 2))
    return float(per_slice.sum()) * voxel_ml, tuple(int(z) for z in np.flatnonzero(per_slice))


EDGE_CUT_OVERLAP = 0.5  # an outside-air component's lung-like voxels this much over lung: lung cut by the edge
# lung-like: lung (-850 HU; emphysema -950 on average), not room air or a field of view's padding (-1000 and below)
LUNG_LIKE_HU = -960.0


def edge_cut_lung(
    outside: np.ndarray, lung: np.ndarray, hu: np.ndarray, overlap: float = EDGE_CUT_OVERLAP
) -> np.ndarray:
    """The voxels of ``outside`` air (:func:`outside_air`) that are lung cut by the image's edge: the lung-like ones
    (at least :data:`LUNG_LIKE_HU`) of each in-plane component of outside air at least ``overlap`` of whose
    lung-like voxels lie on ``lung``, or on voxels so found, in the slice above or below (propagated slice by slice,
    past the slices of ``lung`` too: a chest cropped in front or behind cuts the lungs in their middle slices, and
    the lung below the cut was dropped as bowel gas). Room air lies beside the body, never over a lung, and it and
    the padding outside a field of view are darker than lung, so neither is taken, even where a lung joins them in a
    slice; a lung cut in every slice and joined to no lung found is not found.
    outside, lung: bool [Z, Y, X]; hu: [Z, Y, X]."""
    labels, n = ndi.label(outside, structure=_IN_PLANE)
    like = outside & (hu >= LUNG_LIKE_HU)
    n_like = np.bincount(labels[like], minlength=n + 1)
    cut = np.zeros(n + 1, bool)
    confirmed = lung.copy()
    while True:
        n_over = np.bincount(labels[_over(confirmed) & like], minlength=n + 1)
        new = (n_over >= overlap * n_like) & (n_over > 0) & ~cut
        new[0] = False
        if not new.any():
            return cut[labels] & like
        cut |= new
        confirmed |= new[labels] & like


POCKET_RADIUS_MM = 25.0  # enclosed room air that no ball of this radius fits in is a pocket; lungs are thicker


def room_air_pocket(component: np.ndarray, hu: np.ndarray, spacing: np.ndarray) -> bool:
    """Whether an air ``component`` inside the body (bool [Z, Y, X]; ``hu`` over the same box) is room air that the
    body encloses in-plane with the arms, a table's rails or a skin fold, not lung: the median HU of its inside (its
    voxels off its in-plane border, spared partial volume) below :data:`LUNG_LIKE_HU`, and no ball of
    :data:`POCKET_RADIUS_MM` fitting in it (its in-plane holes, vessels, filled). Lung parenchyma, emphysematous
    too, is brighter, and a lung as dark as room air (bullae) is thicker."""
    inside = ndi.binary_erosion(component, structure=_IN_PLANE)
    if not inside.any() or np.median(hu[inside]) >= LUNG_LIKE_HU:
        return False
    depth = ndi.distance_transform_edt(np.pad(_fill_holes_2d(component), 1), sampling=spacing)
    return bool(depth.max() < POCKET_RADIUS_MM)


def body_mask(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """The body: everything but outside air, filled per slice (with the table and whatever else lies in the field
    of view). hu: [Z, Y, X]; returns bool [Z, Y, X]."""
    return _fill_holes_2d(~outside_air(hu, threshold_hu))


TORSO_CORE_MM = 25.0  # the torso's core: body pixels this deep (at most half the slice's deepest) below its surface


def torso_core(body: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per axial slice, the largest component of the body's core: pixels at least ``TORSO_CORE_MM`` (or half the
    slice's greatest depth) from the body's surface. It drops the table, which spans the field of view but is thin,
    and thin attachments. body: bool [Z, Y, X]; returns bool [Z, Y, X]."""
    core = np.zeros_like(body)
    for z in np.flatnonzero(body.any(axis=(1, 2))):
        depth = ndi.distance_transform_edt(np.pad(body[z], 1), sampling=spacing[1:])[1:-1, 1:-1]  # edge: outside
        labels, _ = ndi.label(depth >= min(TORSO_CORE_MM, 0.5 * float(depth.max())))
        core[z] = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return core


def body_midline(body: np.ndarray, spacing: tuple[float, float, float], core: np.ndarray | None = None) -> float:
    """The patient's midline: the fractional x index of the torso's left-right centre, the median over the axial
    slices of the centre of :func:`torso_core` (``core`` when already computed), which shrinks the torso equally on
    both sides. body: bool [Z, Y, X]."""
    core = torso_core(body, spacing) if core is None else core
    centres = [(cols[0] + cols[-1]) / 2 for z in np.flatnonzero(core.any(axis=(1, 2)))
               for cols in [np.flatnonzero(core[z].any(axis=0))]]  # fmt: skip
    return float(np.median(centres)) if centres else (body.shape[2] - 1) / 2


def lungs_from_label(
    hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], cfg: LungmaskConfig
) -> LungmaskResult:
    """A source's own lung label as a :class:`LungmaskResult`: nothing segmented or removed (no airway), its
    26-connected components counted, the body midline from ``hu`` (:func:`body_midline`). hu, lung: [Z, Y, X] on
    the same grid."""
    midline = body_midline(body_mask(hu, cfg.threshold_hu), spacing)
    n = int(ndi.label(lung, structure=np.ones((3, 3, 3), bool))[1])
    lung_ml = float(lung.sum()) * float(np.prod(spacing)) / 1000
    return LungmaskResult(lung=lung, airway=np.zeros_like(lung), lung_ml=lung_ml, airway_ml=0.0, n_components=n,
                          body_midline_x=midline)  # fmt: skip


def segment_lungs(hu: np.ndarray, spacing: tuple[float, float, float], cfg: LungmaskConfig) -> LungmaskResult:
    """Segment both lungs (parenchyma with vessels and nodules, without trachea and main bronchi). Where a lung
    reaches the image's edge, its air there is taken for room air; where that air lies over lung in the next slice
    (:func:`edge_cut_lung`) it is taken back and the lungs segmented again; what is still lost is measured.

    hu: [Z, Y, X] HU on an (about) isotropic grid, z ascending (superior last); spacing (z, y, x) mm.
    """
    outside = outside_air(hu, cfg.threshold_hu)
    result = _segment(hu, spacing, cfg, outside)
    if result.edge_ml and (cut := edge_cut_lung(outside, result.lung, hu)).any():  # a lung cut by the image's edge
        repaired = _segment(hu, spacing, cfg, outside & ~cut)
        result = replace(repaired, edge_repaired_ml=float(cut.sum()) * float(np.prod(spacing)) / 1000)
    return result


def _segment(
    hu: np.ndarray, spacing: tuple[float, float, float], cfg: LungmaskConfig, outside: np.ndarray
) -> LungmaskResult:
    """:func:`segment_lungs` with ``outside`` air given."""
    sp = np.asarray(spacing, dtype=float)
    voxel_ml = float(np.prod(sp)) / 1000
    body = _fill_holes_2d(~outside)  # body_mask
    core = torso_core(body, spacing)
    midline = body_midline(body, spacing, core)
    airway = _airway(hu, body, midline, sp, cfg)
    candidates = (hu < cfg.threshold_hu) & body & ~airway
    labels, n = ndi.label(candidates)
    # lungs reach into the torso's core; an enclosed air-like space outside it (a table's foam or hollow core under
    # the patient) does not, and would otherwise pass as a lung (it spans the scan)
    in_torso = np.isin(np.arange(1, n + 1), labels[core & candidates])
    if not in_torso.any():
        return LungmaskResult(np.zeros_like(body), airway, 0.0, float(airway.sum() * voxel_ml), 0, midline)
    sizes = ndi.sum(np.ones_like(labels), labels, np.arange(1, n + 1)) * voxel_ml * in_torso
    boxes = ndi.find_objects(labels)
    for i in np.flatnonzero(sizes >= cfg.min_lung_ml):  # air that the body encloses with the arms or a table
        if room_air_pocket(labels[boxes[i]] == i + 1, hu[boxes[i]], sp):
            in_torso[i], sizes[i] = False, 0.0
    largest = int(np.argmax(sizes))
    mid_height = (boxes[largest][0].start + boxes[largest][0].stop) / 2
    # lung pieces (both lungs, or a lobe cut off by a fissure) are large and reach the upper chest; bowel gas is
    # smaller or lies wholly below the lungs' mid-height
    keep = [
        i + 1
        for i in np.argsort(sizes)[::-1]
        if in_torso[i]
        and sizes[i] >= max(cfg.min_lung_ml, cfg.min_component_fraction * sizes[largest])
        and boxes[i][0].stop > mid_height
    ]
    lung = np.zeros_like(body)
    ball = _ball(cfg.closing_mm / sp)
    pad = np.asarray(ball.shape) // 2 + 1
    for label in keep:
        component = labels == label
        bbox = boxes[label - 1]
        lo = [max(s.start - p, 0) for s, p in zip(bbox, pad)]
        hi = [min(s.stop + p, d) for s, p, d in zip(bbox, pad, component.shape)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        padded = np.pad(component[sl], [(p, p) for p in pad])
        closed = ndi.binary_closing(padded, structure=ball)[tuple(slice(p, -p) for p in pad)]
        lung[sl] |= closed
    lung &= body
    lung |= pleural_dents(lung & ~airway, body & ~airway, midline, sp, cfg.pleural_max_diameter_mm)
    lung = lung & ~airway
    lung |= _lung_holes(lung, airway, midline, sp, cfg.midline_hole_max_mm)
    edge_ml, edge_slices = lung_beside_outside_air(lung, outside, voxel_ml)
    return LungmaskResult(
        lung=lung,
        airway=airway,
        lung_ml=float(lung.sum() * voxel_ml),
        airway_ml=float(airway.sum() * voxel_ml),
        n_components=len(keep),
        body_midline_x=midline,
        edge_ml=edge_ml,
        edge_slices=edge_slices,
    )
