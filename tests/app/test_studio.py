"""The studio's logic on the CI-size workflow's results (no browser)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi
from support import THREADS

import lungddpm.app.studio as studio_module
from lungddpm.app.studio import Studio, StudioError
from lungddpm.atomic import DiskFullError
from lungddpm.config import Config, load_config
from lungddpm.diffusion.checkpoint import CheckpointError
from lungddpm.errors import DicomError
from lungddpm.io import Geometry, VolumeReadError, read_json, read_volume
from lungddpm.preprocessing.grid import SliceGrid
from lungddpm.preprocessing.layout import LUNG, NODULE, ball
from lungddpm.preprocessing.rois import SourceCT
from lungddpm.synthesis.paste import native_box, nearest_in_box

SEED_ERROR = r"seed must be an integer 0\.\.2\*\*62-1"


def ci_config(workdir: Path, **sections: dict[str, Any]) -> Config:
    """The CI workflow's config with ``sections``' keys changed (one level down: ``lesion={"roi": {...}}``)."""
    ci = yaml.safe_load((workdir / "ci.yaml").read_text())
    for name, keys in sections.items():
        for key, value in keys.items():
            ci.setdefault(name, {})[key] = {**ci[name].get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(workdir / "config/config.yaml", ci)


@pytest.fixture(scope="module")
def studio(demo_workflow: Path) -> Studio:
    return Studio(ci_config(demo_workflow), demo_workflow, threads=THREADS)


def toy_source(hu: np.ndarray, z_mm: list[float]) -> SourceCT:
    """A source CT of ``hu`` [K, I, J] with slices at ``z_mm``, all lung, no nodules."""
    fine = Geometry(spacing=(2.5, 0.7, 0.7), origin=(0.0, 0.0, 0.0))
    return SourceCT("toy", hu, SliceGrid(np.asarray(z_mm, float), 0.7, 0.7, 0.0, 0.0), np.ones(hu.shape, bool), fine,
                    [], -1024.0)  # fmt: skip


def n_nodules(labels: np.ndarray) -> int:
    """26-connected nodule components (a small nodule at the ROI spacing may touch only diagonally)."""
    return int(ndi.label(labels == NODULE, np.ones((3, 3, 3), bool))[1])


def test_cases_are_the_workflows_and_ids_are_validated(studio: Studio) -> None:
    assert len(studio.cases) == 4 and all(c.startswith("LIDC-IDRI-") for c in studio.cases)
    for bad in ("../../etc/passwd", f"{studio.cases[0]}/../x", "", "LIDC-IDRI-9999"):
        with pytest.raises(StudioError, match="unknown case"):
            studio.open_case(bad)


def test_a_model_of_own_images_takes_bank_or_any_as_any(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lesion model trained on data.source images learnt no texture class (settings.lesion_insert): a class is
    refused, bank is asked as 'any texture' (its LIDC class level, before)."""
    monkeypatch.setattr(studio, "source", "images")
    monkeypatch.setattr(studio, "texture_requests", ("bank", "any"))
    s = studio.open_case(studio.cases[0])
    nodule = studio.candidates((3, 12))[0]
    site = studio.random_site(s, nodule, seed=4)
    with pytest.raises(StudioError, match=r"texture 'solid': choose one of bank, any$"):
        studio.check_site(s, site, nodule, "solid")
    assert studio.check_site(s, site, nodule, "bank").record["texture_requested"] == "any"


def test_invalid_sites_get_a_reason(studio: Studio) -> None:
    s = studio.open_case(studio.cases[0])
    nodule = studio.candidates((3, 12))[0]
    with pytest.raises(StudioError, match="outside the lung"):
        studio.check_site(s, (0, 0, 0), nodule)
    with pytest.raises(StudioError, match="outside the scan"):
        studio.check_site(s, (0, 0, s.ct.shape[2]), nodule)
    assert (s.labels == NODULE).any()
    with pytest.raises(StudioError, match="on a nodule"):
        studio.check_site(s, tuple(np.argwhere(s.labels == NODULE)[0]), nodule)
    with pytest.raises(StudioError, match="texture"):
        studio.check_site(s, (0, 0, 0), nodule, texture="glassy")


def test_an_accepted_nodule_lies_wholly_in_the_native_lung(studio: Studio) -> None:
    """The ROI's lung is the CT's resampled: at the lung's edge a nodule that fits the ROI's lung can reach past the
    native lung mask, and its label would mark chest wall as nodule. Such a site is refused."""
    from lungddpm.synthesis.paste import nodule_in_box

    s = studio.open_case(studio.cases[0])
    nodule = max(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    lung = s.labels == 1
    edge = np.argwhere(lung & ~ndi.binary_erosion(lung, iterations=2))
    reasons, accepted = [], 0
    for site in edge[np.random.default_rng(0).permutation(len(edge))[:150]]:
        try:
            ins = studio.check_site(s, tuple(site), nodule)
        except StudioError as exc:
            reasons.append(str(exc))
            continue
        accepted += 1
        box = native_box(s.source.grid, s.ct.shape, ins.site.geometry, 16)
        covered = nodule_in_box(
            box, s.source.grid, ins.site.geometry, ins.nodule, studio.cfg.preprocess.nodule_fraction
        )
        assert covered.any() and (s.labels[box.slices][covered] > 0).all()
    assert accepted and any("outside the lung on the CT's own grid" in r for r in reasons)


def test_a_site_near_the_scans_end_keeps_the_nodule_on_the_click(studio: Studio) -> None:
    """Near the first or last slice the ROI cannot centre on the site and moves inward (shift_inside): by whole ROI
    voxels, so that the nodule's centroid stays on the click (it moved by the rest of a voxel too: up to half a voxel
    off, 0.38 mm on a demo case), and never out of the scan."""
    shifted = 0
    nodule = min(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    for case in studio.cases:
        s = studio.open_case(case)
        lo, hi = s.source.bounds()
        lung_k = np.flatnonzero((s.labels == LUNG).any(axis=(1, 2)))
        for k in [*lung_k[:6], *lung_k[-6:]]:
            depth = ndi.distance_transform_edt(s.labels[k] == LUNG)
            i, j = np.unravel_index(np.argmax(depth), depth.shape)
            try:
                ins = studio.check_site(s, (k, i, j), nodule)
            except StudioError:
                continue
            ends = ins.site.geometry.index_to_world(np.array([[0.0] * 3, [studio.roi.size - 1.0] * 3]))
            assert np.all(ends >= lo - 1e-6) and np.all(ends <= hi + 1e-6)  # the ROI inside the scan
            centre = ends.mean(axis=0)
            if abs(centre[2] - s.world((k, i, j))[2]) > studio.roi.spacing_mm:  # moved inward along z
                shifted += 1
                assert np.allclose(ins.record["centre_lps_mm"], ins.record["site_lps_mm"], atol=0.011), (case, k)
    assert shifted


def test_generate_paste_undo_and_export(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    s = studio.open_case(studio.cases[1])
    source_ct, source_labels = s.ct.copy(), s.labels.copy()
    nodule = max(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    site = studio.random_site(s, nodule, seed=3)
    assert site == studio.random_site(s, nodule, seed=3)  # seeded
    steps: list[tuple[int, int]] = []
    early = studio.check_site(s, studio.random_site(s, nodule, seed=4), nodule)  # checked before the next insertion
    edit = studio.generate(s, studio.check_site(s, site, nodule, "solid", seed=5), lambda i, n: steps.append((i, n)))
    with pytest.raises(StudioError, match=r"the case changed .* since this site was checked: check it again"):
        studio.generate(s, early)  # its checks saw the CT without the nodule just inserted (it could touch it)
    assert "checked_at_change" not in edit.record and len(s.edits) == 1
    assert steps[-1] == (3, 3)  # the CI lesion sampler's steps, reported as they run
    assert n_nodules(s.labels) == n_nodules(source_labels) + 1
    changed = s.ct != source_ct
    assert 0 < int(changed.sum()) == edit.record["native_voxels_changed"]  # the voxels whose value changed
    # the nodule's centroid on the clicked site: the ROI moves by the part of a voxel that place_at's rounding loses
    assert np.allclose(edit.record["centre_lps_mm"], edit.record["site_lps_mm"], atol=0.011)
    # only native voxels of the generated region (the nodule + margin, mapped to the native grid) change
    gen = ndi.binary_dilation(edit.roi_layout == NODULE, structure=ball(5.0 / 2.5))  # CI margin 5 mm, 2.5 mm ROIs
    box = native_box(s.source.grid, s.ct.shape, edit.roi, 16)
    region = np.zeros(s.ct.shape, bool)
    region[box.slices] = nearest_in_box(box, ndi.binary_dilation(gen, structure=np.ones((3, 3, 3), bool)))
    assert not changed[~region].any()
    assert edit.record["texture_requested"] == "solid" and edit.record["site_index_kij"] == list(site)
    # a second nodule on the first is refused; elsewhere it is accepted
    with pytest.raises(StudioError, match="on a nodule|too close"):
        studio.check_site(s, tuple(np.argwhere(s.labels != source_labels)[0]), nodule)
    paths = studio.export(s)
    ct, geometry = read_volume(paths["ct"])
    labels, _ = read_volume(paths["label"])
    assert np.array_equal(ct, s.ct) and np.array_equal(labels, s.labels)
    assert geometry.same_grid(s.geometry)
    prov = read_json(paths["provenance"])
    assert prov["source_case"] == s.case_id and prov["model_sha256"] == studio.checkpoint_sha
    assert [site["bank_index"] for site in prov["sites"]] == [nodule.index]
    assert prov["precision_used"] in ("fp32", "bf16") and "each site's are in sites" in prov["note"]
    assert np.array_equal(read_volume(paths["s0_layout"])[0], edit.roi_layout)
    assert sorted(p.name for p in paths["ct"].parent.iterdir()) == sorted(p.name for p in paths.values())
    mask = os.umask(0)
    os.umask(mask)
    assert paths["ct"].parent.stat().st_mode & 0o777 == 0o777 & ~mask  # a plain mkdir's, not mkdtemp's 0700
    again = studio.export(s)
    assert again["ct"].parent != paths["ct"].parent and paths["ct"].is_file()  # never overwritten
    # a write that fails (the provenance, written last) leaves neither a folder nor a hidden temporary one
    case_folder = sorted(paths["ct"].parent.parent.iterdir())

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lungddpm.app.studio.write_json", disk_full)
    with pytest.raises(DiskFullError, match=r"no space left on device .*nothing was written there"):
        studio.export(s)
    assert sorted(paths["ct"].parent.parent.iterdir()) == case_folder
    monkeypatch.undo()
    # the disk filling inside a volume's own write is said as the download's, not as a vanished temporary file's
    monkeypatch.setattr("lungddpm.io.sitk.WriteImage", disk_full)
    with pytest.raises(DiskFullError, match=rf"{s.case_id}/\d{{8}}-\d{{6}}: no space left .*nothing was written there"):
        studio.export(s)
    assert sorted(paths["ct"].parent.parent.iterdir()) == case_folder
    monkeypatch.undo()
    # what killed downloads left (a hidden temporary folder, an empty claimed one) goes once an hour old, and a
    # download being written now (a fresh temporary folder) stays
    case_dir = paths["ct"].parent.parent
    killed, claimed, writing = case_dir / ".20260101-000000.x1.tmp", case_dir / "20260101-000000", case_dir / ".y.tmp"
    for folder in (killed, claimed, writing):
        folder.mkdir()
    (killed / "ct.nii.gz").write_bytes(b"partial")
    for folder in (killed, claimed):
        os.utime(folder, (time.time() - 7200,) * 2)
    studio.export(s)
    assert not killed.exists() and not claimed.exists() and writing.is_dir()
    writing.rmdir()
    assert s.undo() is edit and s.undo() is None
    assert np.array_equal(s.ct, source_ct) and np.array_equal(s.labels, source_labels)
    with pytest.raises(StudioError, match="nothing to download"):
        studio.export(s)


def test_a_nodule_inserted_before_keeps_its_class_in_the_next_sites_layout(studio: Studio) -> None:
    """A site whose ROI holds a nodule inserted before: the network sees that nodule at the class asked for it
    (ground-glass), as training sees a neighbour of known class, and the new one at its own (solid); before, the
    neighbour was "any texture"."""
    from lungddpm.synthesis.lesion import _network_layouts

    s = studio.open_case(studio.cases[1])
    nodule = min(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    first = studio.random_site(s, nodule, seed=3)
    edit = studio.generate(s, studio.check_site(s, first, nodule, "ground-glass", seed=5))
    here = s.world(first)
    lung = np.argwhere(s.labels == LUNG)
    far = np.linalg.norm(np.array([s.world(v) for v in lung[:: max(1, len(lung) // 20000)]]) - here, axis=1)
    near = lung[:: max(1, len(lung) // 20000)][np.argsort(np.abs(far - 16.0))[:60]]  # about 16 mm away
    ins = None
    for site in near:
        try:
            ins = studio.check_site(s, tuple(site), nodule, "solid")
        except StudioError:
            continue
        if (ins.layout == NODULE).sum() > ins.nodule.sum():
            break
    assert ins is not None and ins.others is not None
    neighbour = (ins.layout == NODULE) & ~ins.nodule
    kij = np.round(edit.roi.world_to_index(ins.site.geometry.index_to_world(np.argwhere(neighbour)))).astype(int)
    assert edit.roi_nodule[tuple(kij.T)].mean() > 0.9  # the other nodule of the site is the one inserted first
    channel = _network_layouts([ins], [ins.level], [])[0, 1].numpy()
    assert np.isclose(channel[neighbour], studio.levels[0]).mean() > 0.9  # ground-glass, as asked for it
    assert np.isclose(channel[ins.nodule], studio.levels[2]).all() and ins.level == studio.levels[2]
    assert s.undo() is edit


def test_a_real_nodule_in_a_sites_roi_is_seen_at_its_own_class_only(studio: Studio) -> None:
    """A site about 15 mm from a real nodule: every voxel of that nodule in the ROI's layout carries its texture
    class, as training's ROIs do. The nearest-native-voxel rim once added to it was "any texture" (3 of 101 voxels
    in LIDC-IDRI-0171, 21 of 86 in LIDC-IDRI-0719)."""
    nodule = min(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    for case in studio.cases:
        s = studio.open_case(case)
        real, lung = np.argwhere(s.labels == NODULE), np.argwhere(s.labels == LUNG)
        if not len(real):
            continue
        lung = lung[:: max(1, len(lung) // 20000)]
        far = np.linalg.norm(np.array([s.world(v) for v in lung]) - s.world(np.round(real.mean(0)).astype(int)), axis=1)
        for site in lung[np.argsort(np.abs(far - 15.0))[:40]]:
            try:
                ins = studio.check_site(s, tuple(site), nodule, "solid")
            except StudioError:
                continue
            if (other := (ins.layout == NODULE) & ~ins.nodule).any():
                assert ins.site.texture is not None and (ins.site.texture[other] > 0).all(), case
                return
    pytest.fail("no site near a real nodule")


def test_missing_model_is_a_clear_error(demo_workflow: Path, tmp_path: Path) -> None:
    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    target = r"`snakemake --cores all results/models/lesion/\w+/checkpoint.pt` in "  # not the rule: it has a wildcard
    with pytest.raises(StudioError, match=target):
        Studio(cfg, tmp_path)


def test_bench_reports_seconds_per_nodule(studio: Studio) -> None:
    from lungddpm.app.studio import bench_sites

    rows = list(bench_sites(studio.cfg, studio.workdir, 2, 1))
    assert [r["what"] for r in rows] == ["open", "nodule", "nodule"]
    assert all(r["total_s"] >= r["generate_s"] > 0 and r["check_s"] > 0 for r in rows[1:])
    assert rows[1]["site"] != rows[2]["site"]  # one seeded random site each


def test_missing_model_names_the_config_and_the_models_there(demo_workflow: Path) -> None:
    cfg = ci_config(demo_workflow, lesion={"train": {"name": "other"}})
    with pytest.raises(StudioError, match="lesion.train.name='other'") as err:
        Studio(cfg, demo_workflow)
    assert "--configfile" in str(err.value) and "results/models/lesion/ci/checkpoint.pt" in str(err.value)


def test_an_roi_grid_other_than_the_models_is_refused(demo_workflow: Path) -> None:
    cfg = ci_config(demo_workflow, lesion={"roi": {"spacing_mm": 2.0}})
    with pytest.raises(CheckpointError, match=r"lesion.roi.spacing_mm is 2.0 here, 2.5 in training") as err:
        Studio(cfg, demo_workflow)
    assert "--configfile" in str(err.value) and "`snakemake --cores all results/models/lesion/" in str(err.value)


def test_the_ct_is_rounded_as_in_the_lesion_run(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    hu = np.full((4, 8, 8), -850.6, np.float32)
    hu[:, :, 4:] = 40.6
    monkeypatch.setattr(studio_module, "load_source", lambda *args, **kwargs: toy_source(hu, [0.0, 2.5, 5.0, 7.5]))
    assert np.unique(studio.open_case(studio.cases[0]).ct).tolist() == [-851, 41]  # np.rint, not truncation


def test_a_case_that_cannot_be_read_is_a_studio_error(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    case = studio.cases[0]
    irregular = toy_source(np.full((4, 8, 8), -850.0, np.float32), [0.0, 2.5, 5.0, 10.0])
    monkeypatch.setattr(studio_module, "load_source", lambda *args, **kwargs: irregular)
    with pytest.raises(StudioError, match=f"case {case} cannot be opened: .*irregularly spaced") as err:
        studio.open_case(case)
    assert "choose another case" in str(err.value)

    def moved(*args: Any, **kwargs: Any) -> SourceCT:
        raise DicomError(f"/data/{case}: no DICOM series with SeriesInstanceUID 1.2.3")

    monkeypatch.setattr(studio_module, "load_source", moved)
    with pytest.raises(StudioError, match=f"case {case} cannot be opened: /data/{case}: no DICOM series") as err:
        studio.open_case(case)
    assert str(studio.workdir / "resources/demo/LIDC-IDRI") in str(err.value)

    def damaged(*args: Any, **kwargs: Any) -> SourceCT:  # a results file, not the source: remade by its rule
        raise VolumeReadError(f"{studio.results}/preprocessed/{case}/lung_fine.nii.gz: truncated; delete it")

    monkeypatch.setattr(studio_module, "load_source", damaged)
    with pytest.raises(
        StudioError,
        match=rf"lung_fine.nii.gz: truncated; delete it. Remake it: `snakemake --cores "
        rf"all results/preprocessed/{case}/lung_fine.nii.gz` in {studio.workdir}, or choose",
    ) as err:
        studio.open_case(case)
    assert "resources/demo/LIDC-IDRI" not in str(err.value)  # restoring the DICOM would not mend it


def test_seeds_outside_0_to_2_62_are_refused(studio: Studio) -> None:
    s = studio.open_case(studio.cases[0])
    nodule = studio.candidates((3, 12))[0]
    site = studio.random_site(s, nodule, 0)
    for bad in (None, -1, 2**62, 2**64, 1.5, float("nan")):
        with pytest.raises(StudioError, match=SEED_ERROR):
            studio.check_site(s, site, nodule, "bank", bad)
        with pytest.raises(StudioError, match=SEED_ERROR):
            studio.random_site(s, nodule, bad)
    assert studio.check_site(s, site, nodule, "bank", 2**62 - 1).seed == 2**62 - 1


def test_nodules_below_min_readers_are_avoided(studio: Studio) -> None:
    """LIDC clusters read by fewer than data.min_readers radiologists are not in the label map but are real."""
    s = studio.open_case(studio.cases[1])
    nodule = max(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    site = studio.random_site(s, nodule, seed=1)
    k, i, j = site
    on = replace(s, source=replace(s.source, avoid=[((k - 1, i - 2, j - 2), (3, 5, 5))]))
    with pytest.raises(StudioError, match="fewer than data.min_readers"):
        studio.check_site(on, site, nodule)
    moved = studio.random_site(on, nodule, seed=1)
    assert moved != site and not np.all(np.abs(np.subtract(moved, site)) <= (1, 2, 2))
    margin = float(studio.cfg.raw["lesion"]["insert"]["margin_mm"])
    j0 = j + math.ceil((margin + 1.0) / s.source.grid.col_spacing)  # beyond the margin, within nodule + margin
    near = replace(s, source=replace(s.source, avoid=[((k - 1, i - 2, j0), (3, 5, 5))]))
    with pytest.raises(StudioError, match="too close"):
        studio.check_site(near, site, nodule)


def test_lidc_clusters_below_min_readers_are_avoided(demo_workflow: Path) -> None:
    studio = Studio(ci_config(demo_workflow, data={"min_readers": 2}), demo_workflow, threads=THREADS)
    nodule = studio.candidates((3, 12))[0]
    for case in studio.cases:  # the CI cases have single-reader clusters
        s = studio.open_case(case)
        if s.source.avoid:
            break
    (k0, i0, j0), (nk, ni, nj) = s.source.avoid[0]
    with pytest.raises(StudioError, match="fewer than data.min_readers"):
        studio.check_site(s, (k0 + nk // 2, i0 + ni // 2, j0 + nj // 2), nodule)


def test_a_site_whose_paste_would_reach_another_nodule_on_the_cts_grid_is_refused(studio: Studio) -> None:
    """The "too close to another nodule" check ran on the 2.5 mm ROI grid only; a nodule's rim on the CT's own grid
    can miss it, and the paste changes every native voxel nearest a generated one: accepted sites overwrote up to 5
    voxels of a nodule inserted before (the label map still calling them that nodule). Now no accepted site's
    generated region reaches a voxel labelled nodule, and some near ones are refused for it."""
    s = studio.open_case("LIDC-IDRI-0171")
    nodules = sorted(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    studio.generate(s, studio.check_site(s, studio.random_site(s, nodules[-1], 3), nodules[-1], "solid", 1))
    refused = 0
    for kij in [(67, 331, 312), (65, 329, 303), (66, 329, 299)]:  # accepted before, each touching the first
        try:
            ins = studio.check_site(s, kij, nodules[0], "any", 0)
        except StudioError as exc:
            assert "too close to another nodule" in str(exc)
            refused += 1
            continue
        box = native_box(s.source.grid, s.ct.shape, ins.site.geometry, ins.site.ct.shape[0])
        assert not (s.labels[box.slices][nearest_in_box(box, ins.generated)] == NODULE).any(), kij
    assert refused == 3
