"""The nodule record every source produces (pylidc consensus clusters, or label-map components), in scan index space.

Ratings a source does not have are :data:`UNKNOWN` (0): a label map knows a nodule's extent, not its texture,
malignancy or number of readers. Tables write them as ``null``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

UNKNOWN = 0  # texture / malignancy / n_readers a source does not record


@dataclass(frozen=True)
class Nodule:
    """One nodule: its mask in a local box of the scan's index space and what is known about it."""

    mask: np.ndarray  # bool [Z, Y, X] local box
    offset: tuple[int, int, int]  # (k, i, j) of mask[0, 0, 0] in the scan
    n_readers: int  # radiologists who annotated it; UNKNOWN for a label map
    diameter_mm: float  # LIDC: median of the readers' diameters; label map: largest axial extent
    texture: int  # median rating, 1 (ground-glass) .. 5 (solid); UNKNOWN for a label map
    malignancy: int  # median rating 1..5; UNKNOWN for a label map
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
    k, i, j = volume.shape
    for nod in nodules:
        k0, i0, j0 = nod.offset
        m = nod.mask
        sl = (slice(k0, k0 + m.shape[0]), slice(i0, i0 + m.shape[1]), slice(j0, j0 + m.shape[2]))
        volume[sl][m[: k - k0, : i - i0, : j - j0]] = value
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
