"""The lesion path of the CI-size demo: ROIs, the lesion model, inpainting and paste-back into the native CTs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CI_CONFIG
from scipy import ndimage as ndi

from lungddpm.data import lidc
from lungddpm.io import Geometry, read_json, read_volume, write_volume
from lungddpm.preprocessing.layout import NODULE, ball
from lungddpm.preprocessing.rois import read_roi_table
from lungddpm.synthesis.paste import native_box, nearest_in_box, nodule_in_box


def _rows(workdir: Path) -> list[dict[str, str]]:
    return [r for t in sorted((workdir / "results/rois").glob("*/rois.csv")) for r in read_roi_table(t)]


def test_rois_at_native_resolution_with_true_geometry(demo_workflow: Path) -> None:
    rows = _rows(demo_workflow)
    cases = {r["case_id"] for r in rows}
    assert len(cases) == 4  # every case, test cases included
    for case in cases:
        free = [r for r in rows if r["case_id"] == case and r["kind"] == "free"]
        assert len(free) == CI_CONFIG["lesion"]["roi"]["free_per_case"]
        nodules = [r for r in rows if r["case_id"] == case and r["kind"] == "nodule"]
        assert len(nodules) == sum(1 for n in lidc.nodules(case, 0.5) if n.mask.any())
    offsets = []
    for r in rows:
        folder = demo_workflow / "results/rois" / r["case_id"]
        img = nib.load(folder / r["ct"])
        assert img.shape == (16, 16, 16) and img.get_data_dtype() == np.int16
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), 2.5)
        layout, geometry = read_volume(folder / r["layout"])
        centre = geometry.index_to_world(np.array([[7.5, 7.5, 7.5]]))[0]
        assert np.allclose(centre, [float(r[f"centre_{a}"]) for a in "xyz"], atol=1e-3)
        if r["kind"] == "free":
            assert not (layout == NODULE).any() and (layout == 1).mean() > 0.3
            continue
        # the nodule's world centroid is within one ROI voxel of pylidc's consensus centroid
        target = np.array([float(r[f"nodule_{a}"]) for a in "xyz"])
        labels, n = ndi.label(layout == NODULE)
        assert n >= 1
        centroids = [geometry.index_to_world(np.argwhere(labels == i).mean(axis=0)[None])[0] for i in range(1, n + 1)]
        error = min(np.linalg.norm(c - target) for c in centroids)
        assert error <= 2.5, (r["roi"], error)
        offsets.append(np.array([float(r[f"offset_{a}"]) for a in "xyz"]))
    # the centres are jittered (seeded, up to 5 mm per axis; ROIs near the scan's edge are shifted further inward)
    assert offsets and all(np.abs(o).max() > 0.1 for o in offsets)
    assert sum(bool(np.all(np.abs(o) <= 5.0 + 1e-6)) for o in offsets) >= len(offsets) / 2


def test_lesion_items_paste_only_the_generated_region(demo_workflow: Path) -> None:
    from lungddpm.config import load_config
    from lungddpm.preprocessing.rois import load_source

    out = demo_workflow / "results/synthetic/lesion"
    provs = sorted(p for p in out.glob("*.json") if not p.name.startswith(("shard_", "texture")))
    train = [r["case_id"] for r in csv.DictReader(open(demo_workflow / "results/splits.csv")) if r["subset"] == "train"]
    assert sorted(read_json(p)["source_case"] for p in provs) == sorted(train)
    cfg = load_config(demo_workflow / "config/config.yaml", {"data": {"demo": {"n_scans": 4}}})
    prov = read_json(provs[0])
    case = prov["source_case"]
    assert len(prov["sites"]) == CI_CONFIG["lesion"]["roi"]["free_per_case"]
    assert prov["model_sha256"] and prov["sample"]["sampler"] == "dpm++"
    from lungddpm.diffusion.precision import precision_name, resolve_precision

    used = precision_name(resolve_precision(prov["sample"]["precision"], torch.device("cpu")))
    assert prov["precision_used"] == used == CI_CONFIG["lesion"]["sample"]["precision"]  # the CI config's bf16
    src = load_source(case, demo_workflow / f"results/preprocessed/{case}", cfg, demo_workflow)
    files = {k: out / v for k, v in prov["files"].items()}
    ct = nib.load(files["ct"])
    assert ct.get_data_dtype() == np.int16 and ct.shape[::-1] == src.hu.shape
    hu, geometry = read_volume(files["ct"])
    labels, _ = read_volume(files["label"])
    changed = hu != src.hu.astype(np.int16)
    assert changed.any()
    g = src.grid  # the source's own native grid, as its DICOM gives it
    native = Geometry(
        (float(np.diff(g.z_positions).mean()), g.row_spacing, g.col_spacing), (g.x0, g.y0, g.z_positions[0])
    )
    assert geometry.same_grid(native) and labels.shape == hu.shape
    # every changed voxel lies in a site's generated region (the new nodule + margin: the native voxels whose
    # nearest ROI voxel is generated), and the label map gains the edited layouts' new nodules there, by the
    # coverage rule of every nodule label
    inside_any = np.zeros(hu.shape, bool)
    for j, site in enumerate(prov["sites"]):
        before, roi_geometry = read_volume(files[f"s{j}_before"])
        after, _ = read_volume(files[f"s{j}_after"])
        layout, _ = read_volume(files[f"s{j}_layout"])
        new = layout == NODULE
        assert new.sum() > 0 and site["nodule_mean_hu"] == round(float(after[new].mean()), 1)
        gen = ndi.binary_dilation(new, structure=ball(5.0 / 2.5))
        assert site["generated_voxels"] == int(gen.sum())
        assert np.array_equal(after[~gen], before[~gen])  # the ROI outside the generated region is the source
        box = native_box(src.grid, hu.shape, roi_geometry, 16)
        region = np.zeros(hu.shape, bool)
        region[box.slices] = nearest_in_box(box, gen)
        inside_any |= region
        native = nodule_in_box(box, src.grid, roi_geometry, new, cfg.raw["preprocess"]["nodule_fraction"])
        assert native.any() and (labels[box.slices][native] == NODULE).all()
    assert not changed[~inside_any].any()  # bit-identical outside the generated regions
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_texture_control_table(demo_workflow: Path) -> None:
    rows = list(csv.DictReader(open(demo_workflow / "results/synthetic/lesion/texture_control.csv")))
    assert [r["texture_class"] for r in rows] == ["ground-glass", "part-solid", "solid"]
    assert all(int(r["n_inserted"]) == 2 and -1100 < float(r["inserted_mean_hu"]) < 500 for r in rows)
    # (the classes' inserted HU are not told apart here: the CI model's 6 steps saturate at the HU window's ends)
    # the real nodules: each train case's first ROI of each nodule, by its class
    train = [r["case_id"] for r in csv.DictReader(open(demo_workflow / "results/splits.csv")) if r["subset"] == "train"]
    first = [r for case in train for r in csv.DictReader(open(demo_workflow / f"results/rois/{case}/rois.csv"))
             if r["kind"] == "nodule" and r["roi"].endswith("_0")]  # fmt: skip
    for r in rows:
        n = sum(f["texture_class"] == r["texture_class"] for f in first)
        assert int(r["n_real"]) == n and (r["real_mean_hu"] != "") == (n > 0)  # none: an empty cell (NaN)


def test_lesion_shard_skips_complete_items_and_reproduces_an_item(
    demo_workflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from lungddpm.config import load_config
    from lungddpm.io import file_sha256
    from lungddpm.synthesis.lesion import item_inputs_sha256
    from lungddpm.synthesis.lesion_run import synthesize_lesion_shard
    from lungddpm.synthesis.plan import lesion_plan, shard

    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    train = [r["case_id"] for r in csv.DictReader(open(demo_workflow / "results/splits.csv")) if r["subset"] == "train"]
    items = shard(lesion_plan(train, 1, 0), 2, 0)
    res = demo_workflow / "results"
    args = (
        cfg,
        res / "models/lesion/ci/checkpoint.pt",
        {c: res / f"rois/{c}/rois.csv" for c in train},
        {c: res / f"preprocessed/{c}" for c in train},
        demo_workflow / "resources/nodule_bank.npz",
    )
    out = res / "synthetic/lesion"
    monkeypatch.chdir(demo_workflow)  # the demo's DICOM root is relative to the workflow directory
    assert all(e["skipped"] for e in synthesize_lesion_shard(items, *args, out))  # a rerun redoes nothing
    made = synthesize_lesion_shard(items[:1], *args, tmp_path)  # the same item again, elsewhere
    assert not made[0]["skipped"]
    name = items[0].name
    prov = read_json(tmp_path / f"{name}.json")  # what the item read: a new bank or new ROIs make it anew
    case = items[0].case_id
    assert prov["bank_sha256"] == file_sha256(args[4]) and prov["seed"] == items[0].seed
    assert prov["inputs_sha256"] == item_inputs_sha256(args[2][case], args[3][case])
    rois = shutil.copytree(res / f"rois/{case}", tmp_path / "rois")  # one of its nodule-free ROIs edited
    free = next(r for r in csv.DictReader(open(rois / "rois.csv")) if r["kind"] == "free")
    roi, geometry = read_volume(rois / free["ct"])
    roi[0, 0, 0] += 1
    write_volume(rois / free["ct"], roi, geometry)
    assert item_inputs_sha256(rois / "rois.csv", args[3][case]) != prov["inputs_sha256"]
    for suffix in ("_ct.nii.gz", "_label.nii.gz", "_s0_after.nii.gz", "_s1_layout.nii.gz"):
        assert np.array_equal(read_volume(tmp_path / f"{name}{suffix}")[0], read_volume(out / f"{name}{suffix}")[0])
