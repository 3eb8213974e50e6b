"""End-to-end: the CI-size demo through every stage that exists, and partial reruns on it."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_workdir, snakemake
from support import lidc_config, reverse_keys

from lungddpm.config import Config, validate_config
from lungddpm.data import lidc
from lungddpm.errors import DicomError
from lungddpm.io import read_json, read_volume, write_volume
from lungddpm.preprocessing.preprocess import preprocess_case


def cases_of(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "results/preprocessed").iterdir())


def test_demo_outputs(demo_workflow: Path) -> None:
    cases = cases_of(demo_workflow)
    assert len(cases) == 4
    for case in cases:
        ct = nib.load(demo_workflow / f"results/preprocessed/{case}/ct.nii.gz")
        layout = nib.load(demo_workflow / f"results/layouts/{case}.nii.gz")
        assert ct.get_data_dtype() == np.int16 and ct.shape == (32, 32, 32)
        assert np.allclose(ct.affine, layout.affine)
        meta = read_json(demo_workflow / f"results/preprocessed/{case}/meta.json")
        spacing = meta["geometry"]["spacing_zyx_mm"]
        origin = np.asarray(meta["geometry"]["origin_lps_xyz_mm"])
        # NIfTI is RAS: x and y flip sign against DICOM's LPS
        assert np.allclose(np.diag(ct.affine)[:3], [-spacing[2], -spacing[1], spacing[0]], atol=1e-4)
        assert np.allclose(ct.affine[:3, 3], origin * [-1, -1, 1], atol=1e-3)
        hu = np.asanyarray(ct.dataobj)
        lab = np.asanyarray(layout.dataobj)
        assert set(np.unique(lab)) == {0, 1, 2}
        assert -900 < np.median(hu[lab == 1]) < -600  # lung parenchyma (10 mm voxels: partial volume)
        assert hu.max() > 150 and hu.min() >= -1024  # bone present, padding removed
        assert len(meta["nodules"]) >= 1 and max(n["diameter_mm"] for n in meta["nodules"]) >= 10


def test_demo_qc_meets_acceptance(demo_workflow: Path) -> None:
    with open(demo_workflow / "results/qc/demo_segmentation.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for row in rows:
        assert float(row["lung_dice_fine"]) >= 0.95, row
        assert float(row["max_centroid_error_voxels"]) < 1.0 and row["n_missing"] == "0", row


def test_demo_qc_counts_a_nodule_that_preprocessing_lost(demo_workflow: Path, tmp_path: Path) -> None:
    """A nodule with consensus voxels and none on the model grid was skipped, and the case scored as perfect."""
    from lungddpm.data.demo import qc_case

    case = next(r["case_id"] for r in csv.DictReader(open(demo_workflow / "results/splits.csv")))
    shutil.copytree(demo_workflow / "results/preprocessed" / case, tmp_path / case)
    labels, geometry = read_volume(tmp_path / case / "nodules.nii.gz")
    found = [n for n in np.unique(labels) if n > 0]
    labels[labels == found[0]] = 0  # as if preprocessing had lost the first nodule
    write_volume(tmp_path / case / "nodules.nii.gz", labels, geometry)
    truth = next((demo_workflow / "resources").rglob(f"truth/{case}/lung.nii.gz"))
    before = qc_case(case, truth, demo_workflow / "results/preprocessed" / case)
    after = qc_case(case, truth, tmp_path / case)
    assert (before["n_missing"], after["n_missing"]) == (0, 1) and after["n_nodules"] == before["n_nodules"] - 1


def test_split_and_logs(demo_workflow: Path) -> None:
    with open(demo_workflow / "results/splits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["case_id"] for r in rows) == cases_of(demo_workflow)
    assert {r["subset"] for r in rows} <= {"train", "val", "test"}
    for rule in ("demo_dicom", "preprocess", "layout", "demo_qc"):
        logs = list((demo_workflow / "logs" / rule).glob("*.log"))
        assert len(logs) == 4 and all("INFO" in p.read_text() for p in logs)


def test_dry_run_is_clean_and_forcerun_layout_reruns_only_layout_onwards(demo_workflow: Path) -> None:
    assert "Nothing to be done" in snakemake(demo_workflow, "-n").stdout
    ci = demo_workflow / "ci.yaml"
    text = ci.read_text()
    try:  # the same settings with every mapping's keys in reverse order: the same params, nothing to rerun
        ci.write_text(yaml.safe_dump(reverse_keys(yaml.safe_load(text)), sort_keys=False))
        assert ci.read_text() != text
        assert "Nothing to be done" in snakemake(demo_workflow, "-n").stdout
    finally:
        ci.write_text(text)
    out = snakemake(demo_workflow, "-n", "--forcerun", "layout", "--quiet", "rules").stdout
    rules = {line.split()[0] for line in out.splitlines() if line.strip() and line.split()[-1].isdigit()}
    rules -= {"total", "job"}
    assert {"layout", "train", "sample", "metrics", "report", "all"} <= rules, out
    assert not rules & {"demo_dicom", "preprocess", "split", "demo_qc", "nodule_bank"}, out  # upstream untouched


def test_lint_is_clean(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "--lint", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in text, text


def _copy_series(demo_workflow: Path, case: str, tmp_path: Path) -> tuple[Path, Path]:
    info = lidc.scan_info(case)
    src = lidc.series_dir_hint(demo_workflow / "resources/demo/LIDC-IDRI", info)
    root = tmp_path / "LIDC-IDRI"
    dst = lidc.series_dir_hint(root, info)
    shutil.copytree(src, dst)
    return root, dst


def _cfg() -> Config:
    return Config.from_dict(validate_config(yaml.safe_load((REPO / "config/config.yaml").read_text())))


@pytest.mark.parametrize("damage", ["missing", "corrupt", "mixed"])
def test_bad_series_is_refused_without_partial_output(demo_workflow: Path, tmp_path: Path, damage: str) -> None:
    case, other = cases_of(demo_workflow)[:2]
    root, series = _copy_series(demo_workflow, case, tmp_path)
    files = sorted(series.glob("*.dcm"))
    if damage == "missing":
        files[len(files) // 2].unlink()
        expected = "pylidc expects .*re-download the series"
    elif damage == "corrupt":
        files[3].write_bytes(files[3].read_bytes()[:2000])
        expected = f"{files[3].name}: corrupt or incomplete DICOM file"
    else:
        _, other_series = _copy_series(demo_workflow, other, tmp_path / "o")
        shutil.copy(sorted(other_series.glob("*.dcm"))[0], series / "zz_foreign.dcm")
        expected = "files of 2 series are mixed"
    out = tmp_path / "out"
    with pytest.raises(DicomError, match=expected):
        preprocess_case(case, out, lidc_config(_cfg(), root))
    assert not (out / "meta.json").exists() and not list(out.glob("*.nii.gz")) if out.exists() else True


def test_resampled_nodules_sit_at_the_annotations(demo_workflow: Path) -> None:
    case = cases_of(demo_workflow)[0]
    labels, geometry = read_volume(demo_workflow / f"results/preprocessed/{case}/nodules.nii.gz")
    meta = read_json(demo_workflow / f"results/preprocessed/{case}/meta.json")
    checked = 0
    for n, row in enumerate(meta["nodules"], start=1):
        if row["diameter_mm"] < 10:
            continue
        ours = geometry.index_to_world(np.argwhere(labels == n).mean(axis=0)[None])[0]
        assert np.all(np.abs(ours - row["centroid_lps_mm"]) < np.asarray(geometry.spacing[::-1]))
        checked += 1
    assert checked  # the first case has a nodule of 10 mm or more


def test_bad_config_stops_snakemake_before_any_job(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    proc = snakemake(workdir, "-n", "--config", "data={source: lidc}", check=False)
    assert proc.returncode != 0
    assert "data.dicom_root: required when data.source is 'lidc'" in proc.stdout + proc.stderr
    proc = snakemake(workdir, "-n", "--config", f"data={{source: lidc, dicom_root: {tmp_path / 'none'}}}", check=False)
    assert proc.returncode != 0 and "data.dicom_root does not exist" in proc.stdout + proc.stderr


def test_a_disabled_segmentation_asked_for_by_name_checks_its_arms(tmp_path: Path) -> None:
    """segmentation.enabled: false leaves it out of the default target; `snakemake segment_compare` still plans it,
    and its arms were then never checked against the split (a job failed late): now the plan stops, naming the arm."""
    from conftest import CI_CONFIG

    arms = [{"name": "real", "real": True, "synthetic_fraction": 0.0},
            {"name": "lots", "real": True, "synthetic_fraction": 50.0}]  # fmt: skip
    seg = {**CI_CONFIG["segmentation"], "enabled": False, "scale": "whole", "arms": arms}
    workdir = make_workdir(tmp_path, {"segmentation": seg})
    assert snakemake(workdir, "-n", "--quiet", "rules").returncode == 0
    proc = snakemake(workdir, "-n", "segment_compare", check=False)
    assert proc.returncode != 0
    assert "segmentation.arms[lots]: synthetic_fraction 50.0 needs" in proc.stdout + proc.stderr
    # the sweep (its own target) was never checked: a fraction the augment run cannot feed failed in its
    # segment_prepare job, after the sampling; now its plan stops, naming the sweep's key
    seg = {**seg, "enabled": True, "arms": arms[:1], "sweep": {"fractions": [0, 50], "real_fraction": 1.0}}
    workdir = make_workdir(tmp_path / "sweep", {"segmentation": seg})
    assert snakemake(workdir, "-n", "--quiet", "rules").returncode == 0
    proc = snakemake(workdir, "-n", "segment_sweep", check=False)
    assert proc.returncode != 0
    assert "segmentation.sweep.fractions (sweep_50x): synthetic_fraction 50.0 needs" in proc.stdout + proc.stderr


def test_training_outputs_and_resume_from_undeclared_state(demo_workflow: Path) -> None:
    model_dir = demo_workflow / "results/models/demo"
    ckpt = torch.load(model_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and set(ckpt) >= {"ema", "model", "unet", "diffusion", "hu_window", "config"}
    with open(model_dir / "train_log.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]
    assert (model_dir / "preview.png").read_bytes()[:4] == b"\x89PNG"
    state = demo_workflow / "state/models/demo"
    assert sorted(p.name for p in state.glob("step_*.pt")) == ["step_0000003.pt", "step_0000006.pt"]
    # Snakemake deletes a rule's declared outputs before rerunning it; the undeclared state survives,
    # so the rerun resumes at step 6 instead of retraining
    # the target first: after --forcerun (a list) it would be read as another rule to force, and the default target
    # would rerun every sampling job downstream
    proc = snakemake(demo_workflow, "results/models/demo/checkpoint.pt", "--forcerun", "train")
    out = proc.stdout + proc.stderr
    assert "rule train:" in out and "rule sample:" not in out  # not the downstream
    log = (demo_workflow / "logs/train/demo.log").read_text()
    assert "resuming from" in log and "step_0000006.pt" in log
    assert torch.load(model_dir / "checkpoint.pt", weights_only=True)["step"] == 6


def test_synthetic_runs_never_mix_and_keep_the_reference(demo_workflow: Path) -> None:
    with open(demo_workflow / "results/splits.csv") as fh:
        subsets = {r["case_id"]: r["subset"] for r in csv.DictReader(fh)}
    for run, subset in (("eval", "test"), ("augment", "train")):
        items = []
        for shard in (0, 1):
            items += read_json(demo_workflow / f"results/synthetic/{run}/shard_{shard}.json")["items"]
        k = 2 if run == "eval" else 1  # the CI config's eval_samples_per_layout
        assert sorted(i["case_id"] for i in items) == sorted(k * [c for c, s in subsets.items() if s == subset])
        for it in items:
            prov = read_json(demo_workflow / it["provenance"])
            assert prov["run"] == run and prov["steps"] == 3 and prov["sampler"] == "dpm++"
            assert bool(prov["edits"]) == (run == "augment")
            case = it["case_id"]
            ct = nib.load(demo_workflow / f"results/preprocessed/{case}/ct.nii.gz")
            syn = nib.load(demo_workflow / it["image"])
            assert np.allclose(syn.affine, ct.affine) and syn.get_data_dtype() == np.int16
            layout = np.asanyarray(nib.load(demo_workflow / it["layout"]).dataobj)
            from lungddpm.diffusion.sample import keep_mask

            keep = keep_mask(layout, (1, 1, 1))  # 10 mm margin on the 10 mm grid
            assert np.array_equal(np.asanyarray(syn.dataobj)[keep], np.asanyarray(ct.dataobj)[keep])


def test_image_quality_and_report(demo_workflow: Path) -> None:
    with open(demo_workflow / "results/metrics/eval/image_quality.csv") as fh:
        rows = list(csv.DictReader(fh))
    dist = [r for r in rows if "paired" not in r["comparison"]]
    comparisons = ("synthetic-vs-real", "real-vs-real", "synthetic minus real-vs-real")
    assert {(r["metric"], r["region"], r["comparison"]) for r in dist} == {
        (m, g, c) for m in ("kid", "fid", "mmd") for g in ("whole", "lung") for c in comparisons
    }
    for r in dist:  # astra features, both comparisons at the same N
        assert r["features"].startswith("astra-") and r["reportable"] == "True" and r["n_a"] == "2"
        # no interval (not a zero-width one): the synthetic set is 2 samples of one test layout, one patient; the
        # floor 2 one-volume patients, whose every resample with FID's 2 distinct rows is the set reordered
        assert r["ci_low"] == r["ci_high"] == "" and r["value"] != ""
    paired = {(r["metric"], r["region"]) for r in rows if "paired" in r["comparison"]}
    assert {("mse", "whole"), ("mse", "lung"), ("ssim", "lung"), ("hu_w1", "lung")} <= paired
    with open(demo_workflow / "results/metrics/eval/per_case.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2  # one test layout x 2 samples
    summary = (demo_workflow / "results/report/summary.md").read_text()
    assert "| synthetic vs real | real vs real (floor) | synthetic − floor [paired] |" in summary
    # each cell's value [interval] is its comparison's row of image_quality.csv (4 significant digits; n/a: none)
    table = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("KID", "FID", "MMD"):
            table[(cells[0].lower(), cells[1])] = cells[2:5]
    by = {(r["metric"], r["region"], r["comparison"]): r for r in dist}
    assert set(table) == {(m, g) for m in ("kid", "fid", "mmd") for g in ("whole", "lung")}
    for (metric, region), cells in table.items():
        for cell, comparison in zip(cells, comparisons):
            row = by[(metric, region, comparison)]
            shown = re.findall(r"n/a|nan|-?inf|-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", cell)
            assert len(shown) == 3, (metric, region, comparison, cell)
            for text, key in zip(shown, ("value", "ci_low", "ci_high")):
                assert (text == "n/a") == (row[key] == ""), (metric, region, comparison, key, cell)
                if text != "n/a":
                    assert float(text) == pytest.approx(float(row[key]), rel=1e-3, abs=1e-12, nan_ok=True), cell
    assert "not evidence about real CT" in summary
    assert "## Sampling" in summary and "dpm++" in summary
    for png in ("training_loss.png", "image_quality.png"):
        assert (demo_workflow / "results/report" / png).read_bytes()[:4] == b"\x89PNG"
    linked = [line.split("](")[1].split(")")[0] for line in summary.splitlines() if "](figures/" in line]
    assert linked and all((demo_workflow / "results/report" / f).is_file() for f in linked)
    # the feature cache lives in undeclared state, so a metrics rerun reuses it
    assert any((demo_workflow / "state/feature_cache").rglob("*.npy"))
    html = demo_workflow / "report.html"
    snakemake(demo_workflow, "--report", str(html))
    text = html.read_text()  # the declared report items, by category and file name
    assert all(name in text for name in ("Image quality", "image_quality.png", "summary.md", "training_loss.png"))
