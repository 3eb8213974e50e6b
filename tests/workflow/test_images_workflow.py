"""data.source images at CI size: the demo's cases in Lung-DDPM's CT/ + SEG/ layout, one volume format each, plus a
nodule-free CT as a DICOM subfolder, through every stage at both scales (nnU-Net, which reads only ROIs and
preprocessed cases, runs in the demo workflow's tests).

Its own demo DICOM is written here (as the demo workflow's demo_dicom rule writes it), not read from the CI-size demo
workflow: so this module, a group of its own, runs on the other pytest-xdist worker while that one builds the demo."""

from __future__ import annotations

import copy
import csv
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CI_CONFIG, make_workdir, snakemake
from scipy import ndimage as ndi

from lungddpm.config import Config, load_config
from lungddpm.data.demo import export_demo_images, scan_geometry, write_demo_case
from lungddpm.data.images import read_ct, write_image
from lungddpm.data.labels import read_label
from lungddpm.data.lidc import scan_info
from lungddpm.data.nodules import paint
from lungddpm.data.phantom import quirks_for, synthesize_thorax, write_dicom_series
from lungddpm.data.sources import read_case
from lungddpm.io import read_json, read_volume
from lungddpm.preprocessing.cases import case_split, list_cases
from lungddpm.preprocessing.layout import NODULE

pytestmark = pytest.mark.xdist_group("images_workflow")  # one worker builds the module's workflow once

FORMATS = (".nii.gz", ".nrrd", ".mha", ".mhd")
NORMAL = "CT-normal-0001"  # a nodule-free CT (LeFusion's "normal CT" case) as a DICOM series folder
IMAGES = {"source": "images", "images": {"ct_dir": "data/LIDC-IDRI/CT", "label_dir": "data/LIDC-IDRI/SEG"}}
# nnU-Net reads only the ROIs and preprocessed cases, whatever their source (the demo workflow runs it): off here;
# one shard per sampling run (the demo workflow runs two each), so fewer jobs start
EXTRA = {
    "data": IMAGES,
    "segmentation": {"enabled": False},
    "sample": {**CI_CONFIG["sample"], "shards": 1},
    "lesion": {**CI_CONFIG["lesion"], "sample": {**CI_CONFIG["lesion"]["sample"], "shards": 1}},
}


DEMO = "resources/demo"  # the demo's DICOM and truth, under the module's workdir (where the demo workflow has them)


def _demo_config(work: Path) -> Config:
    """The CI-size demo's config (source demo, its DICOM under ``work``)."""
    return load_config(work / "config/config.yaml", copy.deepcopy(CI_CONFIG))


def _demo_cases(work: Path) -> list[str]:
    return list_cases(_demo_config(work))


def _write_normal_ct(data: Path, like: str) -> None:
    """A phantom without nodules at the geometry of ``like``, as DICOM, with a 0/1 label map (its true lungs)."""
    geom = replace(scan_geometry(scan_info(like)), patient_id=NORMAL, study_uid="1.2.826.0.1.3680043.10.1",
                   series_uid="1.2.826.0.1.3680043.10.2")  # fmt: skip
    hu, lung = synthesize_thorax(geom, [], seed=7)
    write_dicom_series(hu, geom, data / "CT" / NORMAL, quirks_for(1))
    write_image(data / "SEG" / f"{NORMAL}.nii.gz", lung.astype(np.uint8), read_ct(data / "CT" / NORMAL, -1024, 3071))


@pytest.fixture(scope="module")
def images_workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = make_workdir(tmp_path_factory.mktemp("images"), EXTRA)
    cfg = load_config(work / "config/config.yaml", yaml.safe_load((work / "ci.yaml").read_text()))
    data, cases = work / "data/LIDC-IDRI", _demo_cases(work)
    for case, suffix in zip(cases, FORMATS, strict=True):
        write_demo_case(case, work / DEMO, _demo_config(work))  # as the demo's demo_dicom rule does
        export_demo_images(cfg, [case], work / DEMO, data, suffix)
    _write_normal_ct(data, cases[0])
    # a split seed that puts the nodule-free CT into train, where the lesion run inserts nodules
    base = Path.cwd()
    os.chdir(work)
    try:
        seed = next(s for s in range(100) if case_split(replace(cfg, split=replace(cfg.split, seed=s)),
                                                         list_cases(cfg))[NORMAL] == "train")  # fmt: skip
    finally:
        os.chdir(base)
    make_workdir(work, {**EXTRA, "split": {"seed": seed}})
    snakemake(work)
    return work


def _nodule_voxels(scan: object) -> np.ndarray:
    return paint(np.zeros(scan.series.hu.shape, bool), scan.nodules, True)


def test_each_format_reads_the_same_hu_as_the_dicom_it_came_from(images_workflow: Path) -> None:
    cfg = load_config(images_workflow / "config/config.yaml", yaml.safe_load((images_workflow / "ci.yaml").read_text()))
    demo = _demo_config(images_workflow)
    for case in _demo_cases(images_workflow):
        ours, theirs = read_case(cfg, case, images_workflow), read_case(demo, case, images_workflow)
        assert np.array_equal(ours.series.hu, theirs.series.hu), case
        assert ours.series.z_positions == pytest.approx(theirs.series.z_positions, abs=1e-3)
        assert ours.series.origin_xy == pytest.approx(theirs.series.origin_xy, abs=1e-3)
        # the label map's components cover exactly the consensus nodules' voxels
        assert np.array_equal(_nodule_voxels(ours), _nodule_voxels(theirs)), case
        assert all(n.texture == 0 for n in ours.nodules)


def test_every_stage_ran_on_the_image_folder(images_workflow: Path) -> None:
    res = images_workflow / "results"
    split = {r["case_id"]: r for r in csv.DictReader(open(res / "splits.csv"))}
    assert sorted(split) == sorted([*_demo_cases(images_workflow), NORMAL])
    assert split[NORMAL]["has_nodule"] == "0" and split[NORMAL]["subset"] == "train"
    for case in split:
        meta = read_json(res / f"preprocessed/{case}/meta.json")
        assert meta["source"] == "images" and meta["lung_source"] == "label"
        assert meta["airway_ml_removed"] is None and meta["lung_components"] >= 1  # the label's, not our mask's
        assert (len(meta["nodules"]) == 0) == (case == NORMAL)
        assert all(row["texture"] is None and row["volume_ml"] > 0 for row in meta["nodules"])
    rois = list(csv.DictReader(open(res / f"rois/{_demo_cases(images_workflow)[0]}/rois.csv")))
    assert {r["texture_class"] for r in rois if r["kind"] == "nodule"} == {"unknown"}
    ci = yaml.safe_load((images_workflow / "ci.yaml").read_text())
    assert torch.load(res / "models/demo/checkpoint.pt", weights_only=True)["step"] == ci["train"]["steps"]
    quality = [
        r for r in csv.DictReader(open(res / "metrics/eval/image_quality.csv")) if "paired" not in r["comparison"]
    ]
    assert {(r["metric"], r["region"]) for r in quality} == {
        (m, g) for m in ("kid", "fid", "mmd") for g in ("whole", "lung")
    }
    assert all(np.isfinite(float(r["value"])) for r in quality)
    texture = list(csv.DictReader(open(res / "synthetic/lesion/texture_control.csv")))
    assert [r["texture_class"] for r in texture] == ["any"]  # the one texture the model learnt: every real nodule
    train_rois = [r for c, row in split.items() if row["subset"] == "train"
                  for r in csv.DictReader(open(res / f"rois/{c}/rois.csv"))]  # fmt: skip
    assert int(texture[0]["n_real"]) == sum(r["kind"] == "nodule" and r["roi"].endswith("_0") for r in train_rois) > 0
    assert all(int(r["n_inserted"]) == ci["lesion"]["texture_control_sites"] for r in texture)
    summary = (res / "report/summary.md").read_text()
    assert "## Image quality" in summary and "## Lesion fidelity" in summary  # segmentation is off here
    assert "Not run: `segmentation.enabled: false`" in summary.split("## Downstream nodule segmentation", 1)[1]


def test_nodules_are_inserted_into_the_nodule_free_ct(images_workflow: Path) -> None:
    out = images_workflow / "results/synthetic/lesion"
    provs = [read_json(p) for p in out.glob(f"{NORMAL}_*.json")]
    assert provs, "no lesion item for the nodule-free CT"
    # the model learnt no texture class from these label maps: bank nodules are asked as 'any texture' (1.0)
    assert {(r["texture_requested"], r["nodule_level"]) for p in provs for r in p["sites"]} == {("any", 1.0)}
    files = {k: out / v for k, v in provs[0]["files"].items()}
    ct, _ = read_volume(files["ct"])
    labels, _ = read_volume(files["label"])
    source = read_ct(images_workflow / "data/LIDC-IDRI/CT" / NORMAL, -1024, 3071)
    assert ct.shape == source.hu.shape and (labels == NODULE).any()
    changed = ct != source.hu.astype(np.int16)
    assert changed.any() and (labels[changed] > 0).mean() > 0.5  # the changes sit at the inserted nodules


def _planned(workdir: Path) -> dict[str, int]:
    """Jobs per rule of a dry run (its job stats table)."""
    out = snakemake(workdir, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    return {name: int(count) for name, count in (line.split() for line in table) if name != "total"}


def test_editing_a_label_map_reruns_that_case_only(images_workflow: Path) -> None:
    assert _planned(images_workflow) == {}
    label = images_workflow / "data/LIDC-IDRI/SEG" / f"{NORMAL}.nii.gz"
    ct = read_ct(images_workflow / "data/LIDC-IDRI/CT" / NORMAL, -1024, 3071)
    lung, _ = read_label(label, ct, "lung_nodule")
    write_image(label, (lung | ndi.binary_dilation(lung, iterations=1)).astype(np.uint8), ct)  # an edited map
    planned = _planned(images_workflow)
    assert planned["preprocess"] == 1 and planned["rois"] == 1 and planned["layout"] == 1


def test_without_label_maps_the_lungs_come_from_the_lung_mask(images_workflow: Path, tmp_path: Path) -> None:
    from lungddpm.preprocessing.preprocess import preprocess_case

    shutil.copytree(images_workflow / "data/LIDC-IDRI/CT", tmp_path / "CT", ignore=shutil.ignore_patterns(NORMAL))
    cfg = load_config(images_workflow / "config/config.yaml", {"data": {"source": "images",
                      "images": {"ct_dir": str(tmp_path / "CT"), "label_dir": None}}})  # fmt: skip
    case = _demo_cases(images_workflow)[0]
    meta = preprocess_case(case, tmp_path / "out", cfg)
    assert meta["lung_source"] == "lungmask" and meta["nodules"] == [] and meta["airway_ml_removed"] > 0
    ours, _ = read_volume(tmp_path / "out/lung_fine.nii.gz")
    labelled, _ = read_volume(images_workflow / f"results/preprocessed/{case}/lung_fine.nii.gz")
    assert 2 * (ours & labelled).sum() / (ours.sum() + labelled.sum()) > 0.97  # our mask against the label's lungs


def test_one_run_names_every_ct_whose_voxels_fail_preprocess(tmp_path: Path) -> None:
    """What only a CT's voxels show (NaN, values not in HU) fails that case's `preprocess` job. The default
    profile's keep-going runs every other case's job, so one run names them all; before, Snakemake stopped
    scheduling at the first failure (with 2 cores, at most 2 of these 3 were ever named in a run)."""
    own = {"data": {"source": "images", "images": {"ct_dir": "CT", "label_dir": None}}}
    work = make_workdir(tmp_path / "work", own)
    geom = scan_geometry(scan_info(_demo_cases(work)[0]))
    write_dicom_series(synthesize_thorax(geom, [], seed=7)[0], geom, tmp_path / "dicom", quirks_for(1))
    series = read_ct(tmp_path / "dicom", -1024, 3071)
    hu = series.hu.astype(np.int16)
    nan = series.hu.copy()
    nan[len(nan) // 2, 100:102, 100] = np.nan
    volumes = {"good": hu, "nan": nan, "stored": hu + np.int16(1024), "blank": np.zeros_like(hu)}
    for case, array in volumes.items():
        write_image(work / "CT" / f"{case}.nii.gz", array, series)
    proc = snakemake(work, *[f"results/preprocessed/{case}/meta.json" for case in volumes], check=False)
    assert proc.returncode != 0
    assert read_json(work / "results/preprocessed/good/meta.json")["lung_source"] == "lungmask"
    logs = {case: (work / f"logs/preprocess/{case}.log").read_text() for case in ("nan", "stored", "blank")}
    assert "ImageError: CT/nan.nii.gz: 2 NaN or infinite voxel(s)" in logs["nan"]  # ct_dir as given: relative
    for case in ("stored", "blank"):
        assert f"ImageError: CT/{case}.nii.gz: " in logs[case] and "not a chest CT in Hounsfield units" in logs[case]
    assert all(not (work / f"results/preprocessed/{case}").exists() for case in logs)
