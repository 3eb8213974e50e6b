from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_workdir, snakemake

from lungddpm.data import lidc
from lungddpm.data.sources import DEMO_ROOT


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lungddpm.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cases_lists_the_demo_split() -> None:
    proc = run_cli("--set", "data.demo.n_scans=3", "cases")
    assert proc.returncode == 0, proc.stderr
    split = json.loads(proc.stdout)
    assert list(split) == ["LIDC-IDRI-0078", "LIDC-IDRI-0171", "LIDC-IDRI-0719"]
    assert set(split.values()) == {"train", "val", "test"}


def test_config_errors_exit_2_with_the_key() -> None:
    proc = run_cli("--set", "preprocess.size=[4,4,4]", "cases")
    assert proc.returncode == 2
    assert "preprocess.size.0: 4 is less than the minimum of 8" in proc.stderr
    proc = run_cli("--set", "data.source=lidc", "cases")
    assert proc.returncode == 2 and "data.dicom_root: required" in proc.stderr


def test_demo_selection_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path))
    first = lidc.select_demo_cases(2, 10.0, 3, 200)
    files = [f for f in tmp_path.glob("*.json") if "cases" in json.loads(f.read_text())]  # alone: the scan table too
    assert len(files) == 1 and json.loads(files[0].read_text())["cases"] == first
    files[0].write_text("{corrupt")  # a damaged cache is recomputed, not trusted
    assert lidc.select_demo_cases(2, 10.0, 3, 200) == first
    assert json.loads(files[0].read_text())["cases"] == first


def test_benchmarks_print_numbers() -> None:
    tiny = [
        "--set",
        "model.model_channels=8",
        "--set",
        "model.channel_mult=[1,2]",
        "--set",
        "model.norm_groups=4",
        "--set",
        "preprocess.size=[16,16,16]",
    ]
    proc = run_cli(*tiny, "bench", "train", "--model", "config", "--size", "16", "--steps", "1", "--threads", "1",
                   "--batch", "1", "2", "--precision", "fp32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["batch"] for r in rows] == [1, 2] and rows[0]["updates_skipped"] == 0  # every batch, not the first
    row = rows[0]
    assert row["size"] == 16 and row["train_step_s"] > 0 and row["forward_s"] > 0 and row["peak_memory_mb"] > 0
    # --scale lesion trains the config's lesion network (it timed the paper's network)
    from lungddpm.cli import _config, parse_args
    from lungddpm.config import lesion_config
    from lungddpm.diffusion.unet import UNet3D, count_parameters, unet_config_from_dict

    small = ["--set", "lesion.model={model_channels: 8, channel_mult: [1, 2], norm_groups: 4}",
             "--set", "lesion.model.attention_resolutions=[]", "--set", "lesion.roi.size=16"]  # fmt: skip
    lesion = lesion_config(_config(parse_args([*small, "cases"])))
    expected = count_parameters(UNet3D(unet_config_from_dict(lesion.model, image_size=16)))
    proc = run_cli(*small, "bench", "train", "--scale", "lesion", "--steps", "1", "--threads", "1",
                   "--precision", "fp32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lesion_row = json.loads(proc.stdout.splitlines()[-1])
    assert lesion_row["parameters"] == expected != 40_226_433 and lesion_row["size"] == 16  # the ROI's edge
    proc = run_cli(
        *tiny,
        "bench",
        "sample",
        "--model",
        "config",
        "--size",
        "16",
        "--samplers",
        "ddim:2",
        "dpm++:3",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 2), ("dpm++", 3)]
    assert all(r["seconds_per_volume"] > 0 for r in rows)
    bad = run_cli(*tiny, "bench", "sample", "--samplers", "ddim")
    assert bad.returncode == 2 and "expected NAME:STEPS" in bad.stderr


def test_python_m_lungddpm_is_the_cli() -> None:
    cmd = [sys.executable, "-m", "lungddpm", "--set", "data.demo.n_scans=3", "cases"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(run_cli("--set", "data.demo.n_scans=3", "cases").stdout)


def test_a_series_written_by_demo_dicom_is_kept_by_the_workflow(tmp_path: Path) -> None:
    """`lungddpm demo-dicom` writes the rule's outputs, the manifest last, so Snakemake does not write them again."""
    work = make_workdir(tmp_path / "work")
    cases = json.loads(run_cli("--configfile", str(work / "ci.yaml"), "cases", cwd=work).stdout)
    first = sorted(cases)[0]
    # a bad --case beside a good one: refused before any series is written (the good one was written first)
    proc = run_cli("--configfile", str(work / "ci.yaml"), "demo-dicom", "--case", first, "--case", "LIDC-IDRI-9999",
                   cwd=work)  # fmt: skip
    assert proc.returncode != 0 and "--case LIDC-IDRI-9999: not one of the demo cases" in proc.stderr
    assert not (work / DEMO_ROOT).exists()
    proc = run_cli("--configfile", str(work / "ci.yaml"), "demo-dicom", "--case", first, cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((work / DEMO_ROOT / "series" / f"{first}.json").read_text())
    assert manifest["case_id"] == first and any((work / manifest["series_dir"]).iterdir())
    planned = snakemake(work, "-n", "--quiet", "rules").stdout
    jobs = dict(line.split()[:2] for line in planned.splitlines() if line.split()[:1] in (["demo_dicom"], ["total"]))
    assert int(jobs["demo_dicom"]) == len(cases) - 1, planned  # every case but the one written by the CLI
