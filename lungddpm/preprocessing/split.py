"""Patient-level train/val/test split, seeded and stratified by nodule presence (known at parse time)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..config import SplitConfig
from ..errors import ConfigError
from ..io import read_csv, write_text

SUBSETS = ("train", "val", "test")


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n`` items over ``fractions``. Equal remainders are ordered as float64
    computes them (of 2 patients at 0.7 / 0.1 / 0.2, train's 0.7 * 2 - 1 = 0.3999999999999999 loses to test's 0.4),
    exact ties in the order train, val, test: deterministic on every IEEE-754 platform, and kept so that written
    splits stay valid."""
    raw = np.asarray(fractions) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _donor(assignment: Mapping[str, str], has_nodule: Mapping[str, bool], subset: str) -> str:
    """The patient that the empty ``subset`` takes: never train's last nodule patient; train takes a nodule patient
    where there is one; else from the largest subset, of its larger stratum (nodule / none, keeping the strata's
    proportions), a nodule-free one on a tie."""
    stratum = Counter((s, has_nodule[p]) for p, s in assignment.items())  # (subset, has a nodule) -> patients
    size = {s: stratum[s, True] + stratum[s, False] for s in SUBSETS}

    def key(p: str) -> tuple[object, ...]:
        s, nodule = assignment[p], has_nodule[p]
        last = s == "train" and nodule and stratum["train", True] == 1
        return not last, subset == "train" and nodule, size[s], stratum[s, nodule], not nodule, p

    return max(assignment, key=key)


def split_cases(patient_of: Mapping[str, str], has_nodule: Mapping[str, bool], cfg: SplitConfig) -> dict[str, str]:
    """case id -> subset. All series of a patient share a subset; patients are shuffled (seeded) within the
    strata "has a nodule" / "has none" and allocated by the configured fractions; a subset with a non-zero
    fraction gets at least one patient when there are enough patients (taken as :func:`_donor` says)."""
    fractions = [cfg.train, cfg.val, cfg.test]
    patients: dict[str, bool] = {}
    for case, patient in patient_of.items():
        patients[patient] = patients.get(patient, False) or bool(has_nodule[case])
    rng = np.random.default_rng(cfg.seed)
    assignment: dict[str, str] = {}
    for stratum in (True, False):
        members = sorted(p for p, flag in patients.items() if flag == stratum)
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for subset, count in zip(SUBSETS, _allocate(len(members), fractions)):
            for p in members[start : start + count]:
                assignment[p] = subset
            start += count
    wanted = [s for s, f in zip(SUBSETS, fractions) if f > 0]
    if len(patients) >= len(wanted):
        for subset in wanted:
            if subset not in assignment.values():
                assignment[_donor(assignment, patients, subset)] = subset
    elif len(patients) == 0:
        raise ConfigError("split: no cases to split; check data.cases / data.dicom_root")
    return {case: assignment[patient] for case, patient in patient_of.items()}


def write_splits(
    path: Path, assignment: Mapping[str, str], patient_of: Mapping[str, str], has_nodule: Mapping[str, bool]
) -> None:
    """Write ``case_id,patient_id,subset,has_nodule`` rows, sorted by case id."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "patient_id", "subset", "has_nodule"])
    for case in sorted(assignment):
        writer.writerow([case, patient_of[case], assignment[case], int(bool(has_nodule[case]))])
    write_text(path, buf.getvalue())


def read_splits(path: Path) -> dict[str, str]:
    return {row["case_id"]: row["subset"] for row in read_csv(path)}
