from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungddpm.config import SplitConfig
from lungddpm.errors import ConfigError
from lungddpm.preprocessing.cases import check_written_split
from lungddpm.preprocessing.split import read_splits, split_cases, write_splits

CFG = SplitConfig(train=0.7, val=0.1, test=0.2, seed=0)


def _cases(n_patients: int, with_nodule: int) -> tuple[dict[str, str], dict[str, bool]]:
    patient_of, has = {}, {}
    for p in range(n_patients):
        pid = f"LIDC-IDRI-{p:04d}"
        series = 2 if p % 5 == 0 else 1
        for s in range(series):
            case = pid if series == 1 else f"{pid}_s{s + 1}"
            patient_of[case] = pid
            has[case] = p < with_nodule
    return patient_of, has


def test_patient_level_seeded_and_stratified() -> None:
    patient_of, has = _cases(50, 30)
    split = split_cases(patient_of, has, CFG)
    assert split == split_cases(patient_of, has, CFG)
    assert split != split_cases(patient_of, has, SplitConfig(0.7, 0.1, 0.2, seed=1))
    by_patient: dict[str, set[str]] = {}
    for case, subset in split.items():
        by_patient.setdefault(patient_of[case], set()).add(subset)
    assert all(len(s) == 1 for s in by_patient.values())  # never split a patient
    patients = {p: next(iter(s)) for p, s in by_patient.items()}
    counts = Counter(patients.values())
    assert counts == {"train": 35, "val": 5, "test": 10}
    nodule_patients = Counter(s for p, s in patients.items() if int(p[-4:]) < 30)
    assert nodule_patients == {"train": 21, "val": 3, "test": 6}  # 70/10/20 within the stratum


@settings(deadline=None, max_examples=40)
@given(n=st.integers(3, 40), k=st.integers(0, 40))
def test_every_subset_non_empty_when_possible(n: int, k: int) -> None:
    patient_of, has = _cases(n, min(k, n))
    split = split_cases(patient_of, has, CFG)
    assert set(split) == set(patient_of)
    assert set(split.values()) == {"train", "val", "test"}


@settings(deadline=None, max_examples=60)
@given(n=st.integers(3, 8), k=st.integers(1, 8), seed=st.integers(0, 50))
def test_filling_an_empty_subset_keeps_a_nodule_patient_in_train(n: int, k: int, seed: int) -> None:
    """A subset left empty takes a patient from another; it used to take the largest patient id whatever its
    stratum, so 3 patients (2 with nodules) left train with the nodule-free one."""
    split = split_cases({"A": "A", "B": "B", "C": "C"}, {"A": False, "B": True, "C": True}, CFG)
    assert split["A"] != "train" and sorted(split.values()) == ["test", "train", "val"]
    patient_of, has = _cases(n, min(k, n))
    split = split_cases(patient_of, has, SplitConfig(0.7, 0.1, 0.2, seed))
    assert any(has[c] and s == "train" for c, s in split.items())
    assert set(split.values()) == {"train", "val", "test"}


def test_csv_round_trip(tmp_path: Path) -> None:
    patient_of, has = _cases(10, 5)
    split = split_cases(patient_of, has, CFG)
    path = tmp_path / "splits.csv"
    write_splits(path, split, patient_of, has)
    assert read_splits(path) == split
    assert path.read_text().splitlines()[0] == "case_id,patient_id,subset,has_nodule"


def test_a_written_split_is_refused_only_for_what_its_label_changes_move(tmp_path: Path) -> None:
    """A label edit that moves no case is accepted (the file keeps its stale stratum); a later split.seed change then
    moves cases by itself, and is accepted too (it was blamed on the label edit and refused); a label edit that does
    move cases is refused, naming them."""
    patient_of = {f"P{i}": f"P{i}" for i in range(9)} | {"Q_s1": "Q", "Q_s2": "Q"}
    has = {c: c < "P6" or c.startswith("Q") for c in patient_of}
    path = tmp_path / "splits.csv"
    write_splits(path, split_cases(patient_of, has, CFG), patient_of, has)

    def split_with(seed: int) -> Callable[[dict[str, bool]], dict[str, str]]:
        return lambda strata: split_cases(patient_of, strata, SplitConfig(0.7, 0.1, 0.2, seed))

    quiet = {**has, "Q_s2": False}  # Q keeps a nodule in its other series: its patient's stratum is unchanged
    for seed in (0, 1):
        split = split_with(seed)(quiet)
        assert seed == 0 or split != split_with(0)(quiet)  # the seed moves cases
        check_written_split(path, split, quiet, split_with(seed))
    loud = {**has, "P0": False, "P1": False, "P2": False}  # three nodule patients fewer: the strata move cases
    moved = split_with(0)(loud)
    assert moved != split_with(0)(has)
    with pytest.raises(ConfigError, match=r"label maps of 3 case\(s\) \(P0, P1, P2\) gained or lost .* which moves"):
        check_written_split(path, moved, loud, split_with(0))


def test_largest_remainder_ties_are_kept_as_float64_orders_them() -> None:
    """Written splits stay valid only if the allocation never changes: near-ties go as float64 computes the
    remainders (train's 0.7 * 2 - 1 = 0.3999999999999999 < test's 0.4), exact ties train, val, test first."""
    from lungddpm.preprocessing.split import _allocate

    assert _allocate(2, (0.7, 0.1, 0.2)) == [1, 0, 1]
    assert _allocate(5, (0.7, 0.1, 0.2)) == [4, 0, 1]  # 3.5, 0.5, 1.0: train before val on the exact tie
    assert _allocate(14, (0.6, 0.1, 0.3)) == [9, 1, 4]
    assert [sum(_allocate(n, (0.7, 0.1, 0.2))) for n in range(40)] == list(range(40))
