"""Faults: kill -9 of train and of a sample shard (through Snakemake), non-finite loss, a full disk.

Kills are deterministic: ``LUNGDDPM_KILL_AT=<point>:<n>`` makes the job SIGKILL itself at a fixed point
(lungddpm.faults), never on a timer.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import snakemake
from support import tiny_config, tiny_data

from lungddpm import faults
from lungddpm.atomic import DiskFullError
from lungddpm.diffusion.checkpoint import load_checkpoint
from lungddpm.diffusion.process import GaussianDiffusion
from lungddpm.diffusion.train import TrainingDivergedError, train
from lungddpm.io import Geometry, read_json, read_volume, write_json, write_volume

CHECKPOINT = "results/models/demo/checkpoint.pt"
UPSTREAM = (
    "resources/demo/series",
    "resources/demo/truth",
    "results/preprocessed",
    "results/layouts",
    "results/splits.csv",
)


def copy_upstream(src: Path, dst: Path, *extra: str) -> Path:
    """A workdir ``dst`` with the config and the finished upstream files of the workdir ``src`` (mtimes kept, no
    Snakemake metadata), so that only the rules under test run there."""
    for rel in ("ci.yaml", "config", *UPSTREAM, *extra):
        s, d = src / rel, dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)
    return dst


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_train_killed_after_checkpoint_resumes_through_snakemake(
    demo_workflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = copy_upstream(demo_workflow, tmp_path / "w")
    steps = yaml.safe_load((work / "ci.yaml").read_text())["train"]
    kill_at = steps["checkpoint_every"]
    monkeypatch.setenv(faults.ENV, f"checkpoint:{kill_at}")
    proc = snakemake(work, CHECKPOINT, check=False)
    assert proc.returncode != 0
    assert "died with <Signals.SIGKILL: 9>" in proc.stdout + proc.stderr  # what Snakemake saw
    log = (work / "logs/train/demo.log").read_text()
    assert f"{faults.ENV}=checkpoint:{kill_at} reached: killing this process" in log
    state = work / "state/models/demo"
    assert [p.name for p in state.glob("step_*.pt")] == [f"step_{kill_at:07d}.pt"]
    assert not (work / CHECKPOINT).exists() and not (work / "results/models/demo/train_log.csv").exists()

    monkeypatch.delenv(faults.ENV)
    snakemake(work, CHECKPOINT)
    log = (work / "logs/train/demo.log").read_text()
    assert f"resuming from state/models/demo/step_{kill_at:07d}.pt" in log, log
    ckpt = torch.load(work / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == steps["steps"]
    # the resumed run is the uninterrupted one, bit for bit: same losses, same weights
    ref_dir = demo_workflow / "results/models/demo"
    ours = read_log(work / "results/models/demo/train_log.csv")
    assert [r["loss"] for r in ours] == [r["loss"] for r in read_log(ref_dir / "train_log.csv")]
    assert [int(r["step"]) for r in ours] == list(range(1, steps["steps"] + 1))
    ref = torch.load(ref_dir / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(ref[key][n], ckpt[key][n]) for n in ref[key]), key


def test_killed_sample_shard_leaves_nothing_a_rerun_accepts(
    demo_workflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = copy_upstream(demo_workflow, tmp_path / "w", "results/models/demo")
    shard = next(s for s in (0, 1) if read_json(demo_workflow / f"results/synthetic/eval/shard_{s}.json")["items"])
    target = f"results/synthetic/eval/shard_{shard}.json"
    first = read_json(demo_workflow / target)["items"][0]
    image, layout = work / first["image"], work / first["layout"]
    out = image.parent
    # the 2nd atomic write of the job: the first item's volume is in place, its layout is being renamed
    monkeypatch.setenv(faults.ENV, "rename:2")
    proc = snakemake(work, target, check=False)
    assert proc.returncode != 0 and "died with <Signals.SIGKILL: 9>" in proc.stdout + proc.stderr
    assert image.is_file() and not layout.exists() and not (work / first["provenance"]).exists()
    assert list(out.glob(f".{layout.name}.*.tmp.nii.gz")), sorted(p.name for p in out.iterdir())
    assert not (work / target).exists()

    monkeypatch.delenv(faults.ENV)
    snakemake(work, target)
    log = (work / f"logs/sample/eval_{shard}.log").read_text()
    assert "complete, skipped" not in log  # the volume without provenance was not accepted
    assert "left by an interrupted write" in log
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    items = read_json(work / target)["items"]
    assert items and not any(it["skipped"] for it in items)
    for it in items:
        assert read_json(work / it["provenance"])["item"] == it["item"]
        ours, _ = read_volume(work / it["image"])
        ref, _ = read_volume(demo_workflow / it["image"])
        assert np.array_equal(ours, ref)  # the item's own seed: the volume an uninterrupted run made


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    cfg = tiny_config(steps=6, checkpoint_every=2)
    real_loss = GaussianDiffusion.loss
    calls = {"n": 0}

    def poisoned(self: GaussianDiffusion, *args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * bad if calls["n"] == 3 else loss  # step 3 (batch 1, no accumulation: one call per step)

    monkeypatch.setattr(GaussianDiffusion, "loss", poisoned)
    state = tmp_path / "state"
    with pytest.raises(TrainingDivergedError, match=r"step 3: loss (nan|inf).*step_0000002\.pt is kept") as err:
        train(tiny_data(), cfg, tmp_path / "out", state, threads=1)
    assert "Lower train.lr" in str(err.value)
    assert sorted(p.name for p in state.glob("step_*.pt")) == ["step_0000002.pt"]
    kept = load_checkpoint(state / "step_0000002.pt")
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    # with the cause gone, a rerun resumes from the kept checkpoint and finishes
    monkeypatch.setattr(GaussianDiffusion, "loss", real_loss)
    assert train(tiny_data(), cfg, tmp_path / "out", state, threads=1).step == 6
    rows = read_log(tmp_path / "out" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and all(np.isfinite(float(r["loss"])) for r in rows)


def test_runaway_learning_rate_is_stopped_not_saved(tmp_path: Path) -> None:
    """A real divergence (no injection): lr 1e30 blows the weights up; no non-finite checkpoint is ever written."""
    cfg = tiny_config(steps=6, checkpoint_every=1, lr=1e30, grad_clip=0.0)
    with pytest.raises(TrainingDivergedError, match="not finite"):
        train(tiny_data(), cfg, tmp_path / "out", tmp_path / "state", threads=1)
    for path in (tmp_path / "state").glob("step_*.pt"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values()), path


def enospc(write_some: bool = True):
    """A writer that puts a few bytes into its target, then fails as a full disk does."""

    def fail(*args: object, **kwargs: object) -> None:
        path = next(a for a in args if isinstance(a, str | os.PathLike))
        if write_some:
            with open(path, "wb") as fh:
                fh.write(b"\x1f\x8b partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return fail


def test_disk_full_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    geom = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    volume, doc = tmp_path / "v.nii.gz", tmp_path / "d.json"
    write_volume(volume, np.arange(64, dtype=np.int16).reshape(4, 4, 4), geom)
    write_json(doc, {"version": 1})
    before = {p: p.read_bytes() for p in (volume, doc)}

    monkeypatch.setattr(sitk, "WriteImage", lambda image, name, *a, **k: enospc()(name))
    with pytest.raises(DiskFullError, match=r"v\.nii\.gz: no space left on device.*previous version.*untouched"):
        write_volume(volume, np.zeros((4, 4, 4), np.int16), geom)
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: enospc()(self))
    with pytest.raises(DiskFullError, match=r"d\.json: no space left on device"):
        write_json(doc, {"version": 2})
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in (volume, doc)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "v.nii.gz"]  # no temporaries left
    assert json.loads(doc.read_text()) == {"version": 1} and read_volume(volume)[0].sum() == np.arange(64).sum()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(steps=4, checkpoint_every=2)
    real_save = torch.save
    saves = {"n": 0}

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        saves["n"] += 1
        if saves["n"] == 2:  # the step-4 checkpoint
            enospc()(f)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    state = tmp_path / "state"
    with pytest.raises(DiskFullError, match=r"step_0000004\.pt: no space left on device"):
        train(tiny_data(), cfg, tmp_path / "out", state, threads=1)
    assert sorted(p.name for p in state.iterdir() if p.suffix == ".pt") == ["step_0000002.pt"]
    assert not [p for p in state.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(state / "step_0000002.pt")["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    assert train(tiny_data(), cfg, tmp_path / "out", state, threads=1).step == 4  # resumes from step 2
    # the final loss log's copy into the declared output folder: it left train_log.csv.tmp there, with OSError
    from lungddpm.diffusion import train as training

    monkeypatch.setattr(training.shutil, "copyfile", lambda src, dst, **k: enospc()(dst))
    with pytest.raises(DiskFullError, match=r"train_log\.csv: no space left on device"):
        train(tiny_data(), cfg, tmp_path / "out2", state, threads=1)
    assert list((tmp_path / "out2").iterdir()) == []
