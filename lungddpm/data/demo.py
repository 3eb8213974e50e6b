"""The embedded demo data set: one procedural phantom per LIDC series, written as DICOM, and its QC.

``write_demo_case`` writes ``<root>/LIDC-IDRI/<patient>/<study uid>/<series uid>/*.dcm`` plus the phantom's true
lung mask ``<root>/truth/<case>/lung.nii.gz`` (DICOM resolution, slices = pylidc's ``slice_zvals``).
``demo_qc`` scores the preprocessing against that truth: lung Dice at the fine spacing and each nodule's
centroid error in world coordinates.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..io import Geometry, read_json, read_volume, write_json, write_text, write_volume
from ..metrics.voxel import dice
from ..preprocessing.grid import SliceGrid, resample
from . import lidc
from .dicom import DicomSeries
from .images import write_image
from .nodules import Nodule, paint
from .phantom import NoduleSpec, PhantomConfig, ScanGeometry, quirks_for, synthesize_thorax, write_dicom_series

log = logging.getLogger(__name__)


def scan_geometry(info: lidc.ScanInfo) -> ScanGeometry:
    return ScanGeometry(
        patient_id=info.patient_id,
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        pixel_spacing=info.pixel_spacing,
        slice_zvals=np.asarray(info.slice_zvals),
        slice_thickness=info.slice_thickness,
    )


def truth_path(root: Path, case_id: str) -> Path:
    return Path(root) / "truth" / case_id / "lung.nii.gz"


def manifest_path(root: Path, case_id: str) -> Path:
    """The case's manifest, written last: the demo_dicom rule's output, so a series written by the CLI is kept."""
    return Path(root) / "series" / f"{case_id}.json"


def case_draws(seed: int, case_id: str) -> tuple[int, int]:
    """(phantom seed, DICOM quirks index) of demo case ``case_id``: from ``data.demo.seed`` and the case id alone,
    so that a case added to the demo or left out (``n_scans``) leaves every other case's phantom as it was (they
    came from the case's index in the sorted list: one case more rewrote 11 of 12)."""
    phantom, quirks = np.random.SeedSequence([int(seed), *case_id.encode()]).generate_state(2, dtype=np.uint64)
    return int(phantom >> 1), int(quirks >> 1)


def write_demo_case(case_id: str, root: Path, cfg: Config) -> Path:
    """Synthesise case ``case_id`` (its anatomy, noise and DICOM quirks: :func:`case_draws`) under ``root``
    (series in ``root/LIDC-IDRI``, truth in ``root/truth``, then the manifest :func:`manifest_path`); returns the
    series folder."""
    t0 = time.perf_counter()
    info = lidc.scan_info(case_id)
    geom = scan_geometry(info)
    nods = lidc.nodules(case_id, cfg.data.consensus_level, min_readers=1)
    specs = [NoduleSpec(mask=n.mask, offset=n.offset, texture=n.texture) for n in nods]
    pcfg = PhantomConfig(noise_hu=cfg.data.demo.noise_hu)
    phantom_seed, quirks_index = case_draws(cfg.data.demo.seed, case_id)
    hu, lung = synthesize_thorax(geom, specs, seed=phantom_seed, cfg=pcfg)
    series_dir = lidc.series_dir_hint(Path(root) / "LIDC-IDRI", info)
    quirks = quirks_for(quirks_index)
    write_dicom_series(hu, geom, series_dir, quirks)
    dz = float(np.median(np.diff(geom.slice_zvals))) if len(geom.slice_zvals) > 1 else info.slice_thickness
    if len(geom.slice_zvals) > 2 and np.ptp(np.diff(geom.slice_zvals)) > 0.01 * dz:  # LIDC-IDRI-0514: a 38 mm gap
        log.warning("%s: irregular slices; the truth NIfTI's affine places them %.3g mm apart, so read its slices at "
                    "pylidc's slice_zvals (as qc_case does), not at its own z", case_id, dz)  # fmt: skip
    truth_geometry = Geometry(
        spacing=(dz, info.pixel_spacing, info.pixel_spacing),
        origin=(geom.x0, geom.y0, float(geom.slice_zvals[0])),
    )
    write_volume(truth_path(root, case_id), lung.astype(np.uint8), truth_geometry)
    write_json(manifest_path(root, case_id), {"case_id": case_id, "series_dir": str(series_dir)})
    log.info(
        "%s: %d slices, %d nodules, quirks %s, %.1f s",
        case_id,
        hu.shape[0],
        len(specs),
        quirks,
        time.perf_counter() - t0,
    )
    return series_dir


def qc_case(case_id: str, truth_file: Path, preprocessed: Path) -> dict[str, Any]:
    """Lung Dice against the phantom truth on the fine grid, and nodule centroid errors on the model grid."""
    info = lidc.scan_info(case_id)
    truth, truth_geometry = read_volume(truth_file)
    grid = SliceGrid(
        np.asarray(info.slice_zvals),
        info.pixel_spacing,
        info.pixel_spacing,
        truth_geometry.origin[0],
        truth_geometry.origin[1],
    )
    ours, fine = read_volume(preprocessed / "lung_fine.nii.gz")
    truth_fine = resample(truth, grid, fine, ours.shape, order=1, fill=0.0, antialias=True) >= 0.5
    meta = read_json(preprocessed / "meta.json")
    labels, model = read_volume(preprocessed / "nodules.nii.gz")
    errors_vox, missing = [], []
    for n, row in enumerate(meta["nodules"], start=1):
        idx = np.argwhere(labels == n)
        if row["consensus_voxels"] == 0:
            continue
        if idx.size == 0:  # annotated, yet no voxel on the model grid: preprocessing lost it
            missing.append(n)
            continue
        ours_world = model.index_to_world(idx.mean(axis=0)[None])[0]
        err = (ours_world - np.asarray(row["centroid_lps_mm"])) / np.asarray(model.spacing[::-1])
        errors_vox.append(float(np.linalg.norm(err)))
    if missing:
        log.warning("%s: nodule(s) %s of meta.json have no voxel in %s", case_id, missing,
                    preprocessed / "nodules.nii.gz")  # fmt: skip
    return {
        "case_id": case_id,
        "lung_dice_fine": round(dice(ours > 0, truth_fine), 4),
        "fine_spacing_mm": fine.spacing[0],
        "n_nodules": len(errors_vox),
        "n_missing": len(missing),
        "max_centroid_error_voxels": round(max(errors_vox), 3) if errors_vox else 0.0,
    }


def write_qc_table(rows: list[dict[str, Any]], out_csv: Path) -> None:
    """One CSV row per case (rows as returned by :func:`qc_case`)."""
    if not rows:
        raise ValueError(f"{out_csv}: no QC rows to write")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_csv, buf.getvalue())
    worst = min(rows, key=lambda r: r["lung_dice_fine"])
    log.info(
        "%d cases: lowest lung Dice %.4f (%s), largest nodule centroid error %.2f voxels",
        len(rows),
        worst["lung_dice_fine"],
        worst["case_id"],
        max(r["max_centroid_error_voxels"] for r in rows),
    )


def export_demo_images(cfg: Config, cases: list[str], root: Path, out: Path, suffix: str = ".nii.gz") -> list[Path]:
    """The demo cases as your own data would come: ``out/CT/<case><suffix>`` (int16 HU) and ``out/SEG/<case><suffix>``
    (Lung-DDPM's 0/1/2: the phantom's true lungs, the consensus nodules), the layout Lung-DDPM's ``--ct_path`` /
    ``--mask_path`` take. Series missing under ``root`` are synthesised first. Returns the CT files."""
    from dataclasses import replace

    from .sources import read_case

    demo_cfg = replace(cfg, data=replace(cfg.data, source="lidc", dicom_root=str(Path(root) / "LIDC-IDRI")))
    written = []
    for case in cases:
        series = lidc.series_dir_hint(Path(root) / "LIDC-IDRI", lidc.scan_info(case))
        if not (truth_path(root, case).is_file() and series.is_dir()):  # either missing: synthesise both
            write_demo_case(case, root, cfg)
        scan = read_case(demo_cfg, case)
        lung, _ = read_volume(truth_path(root, case))
        ct_file, seg_file = Path(out) / "CT" / f"{case}{suffix}", Path(out) / "SEG" / f"{case}{suffix}"
        export_case(scan.series, lung > 0, scan.nodules, ct_file, seg_file)
        log.info("%s: %s + %s (%d nodules)", case, ct_file, seg_file, len(scan.nodules))
        written.append(ct_file)
    return written


def export_case(series: DicomSeries, lung: np.ndarray, nodules: list[Nodule], ct_path: Path, label_path: Path) -> None:
    """One case in Lung-DDPM's folder layout: the CT (int16 HU) and its 0/1/2 label map (lung, nodule)."""
    labels = paint(lung.astype(np.uint8), nodules, 2)
    write_image(ct_path, np.round(series.hu).astype(np.int16), series)
    write_image(label_path, labels, series)
