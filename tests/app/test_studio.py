"""The studio's logic on the CI-size workflow's results (no browser)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

from lungddpm.app.studio import Studio, StudioError
from lungddpm.config import load_config
from lungddpm.io import read_json, read_volume
from lungddpm.preprocessing.layout import NODULE, ball
from lungddpm.synthesis.paste import native_box, nearest_in_box


@pytest.fixture(scope="module")
def studio(demo_workflow: Path) -> Studio:
    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    return Studio(cfg, demo_workflow, threads=2)


def n_nodules(labels: np.ndarray) -> int:
    """26-connected nodule components (a small nodule at the ROI spacing may touch only diagonally)."""
    return int(ndi.label(labels == NODULE, np.ones((3, 3, 3), bool))[1])


def test_cases_are_the_workflows_and_ids_are_validated(studio: Studio) -> None:
    assert len(studio.cases) == 4 and all(c.startswith("LIDC-IDRI-") for c in studio.cases)
    for bad in ("../../etc/passwd", f"{studio.cases[0]}/../x", "", "LIDC-IDRI-9999"):
        with pytest.raises(StudioError, match="unknown case"):
            studio.open_case(bad)


def test_invalid_sites_get_a_reason(studio: Studio) -> None:
    s = studio.open_case(studio.cases[0])
    nodule = studio.candidates((3, 12))[0]
    with pytest.raises(StudioError, match="outside the lung"):
        studio.check_site(s, (0, 0, 0), nodule)
    with pytest.raises(StudioError, match="outside the scan"):
        studio.check_site(s, (0, 0, s.ct.shape[2]), nodule)
    if (s.labels == NODULE).any():
        with pytest.raises(StudioError, match="on a nodule"):
            studio.check_site(s, tuple(np.argwhere(s.labels == NODULE)[0]), nodule)
    with pytest.raises(StudioError, match="texture"):
        studio.check_site(s, (0, 0, 0), nodule, texture="glassy")


def test_generate_paste_undo_and_export(studio: Studio) -> None:
    s = studio.open_case(studio.cases[1])
    source_ct, source_labels = s.ct.copy(), s.labels.copy()
    nodule = max(studio.candidates((3, 12)), key=lambda n: n.diameter_mm)
    site = studio.random_site(s, nodule, seed=3)
    assert site == studio.random_site(s, nodule, seed=3)  # seeded
    steps: list[tuple[int, int]] = []
    edit = studio.generate(s, studio.check_site(s, site, nodule, "solid", seed=5), lambda i, n: steps.append((i, n)))
    assert steps[-1] == (3, 3)  # the CI lesion sampler's steps, reported as they run
    assert n_nodules(s.labels) == n_nodules(source_labels) + 1
    changed = s.ct != source_ct
    assert 0 < int(changed.sum()) <= edit.record["native_voxels_changed"]  # rewritten voxels; some keep their HU
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
    assert prov["source_case"] == s.case_id and prov["checkpoint_sha256"] == studio.checkpoint_sha
    assert [site["bank_index"] for site in prov["sites"]] == [nodule.index]
    assert np.array_equal(read_volume(paths["s0_layout"])[0], edit.roi_layout)
    again = studio.export(s)
    assert again["ct"].parent != paths["ct"].parent and paths["ct"].is_file()  # never overwritten
    assert s.undo() is edit and s.undo() is None
    assert np.array_equal(s.ct, source_ct) and np.array_equal(s.labels, source_labels)
    with pytest.raises(StudioError, match="nothing to download"):
        studio.export(s)


def test_missing_model_is_a_clear_error(demo_workflow: Path, tmp_path: Path) -> None:
    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    with pytest.raises(StudioError, match="train_lesion"):
        Studio(cfg, tmp_path)


def test_bench_reports_seconds_per_nodule(studio: Studio) -> None:
    from lungddpm.app.studio import bench_sites

    rows = list(bench_sites(studio.cfg, studio.workdir, 2, 1))
    assert [r["what"] for r in rows] == ["open", "nodule", "nodule"]
    assert all(r["total_s"] >= r["generate_s"] > 0 and r["check_s"] > 0 for r in rows[1:])
    assert rows[1]["site"] != rows[2]["site"]  # one seeded random site each
