from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support import THREADS, TINY_MODEL, tiny_config, tiny_data, write_cases

from lungddpm.diffusion.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    fingerprint,
    load_checkpoint,
    load_model,
)
from lungddpm.diffusion.data import TrainData, data_digest
from lungddpm.diffusion.distributed import Dist, seed_rank
from lungddpm.diffusion.jobs import make_job, run_job
from lungddpm.diffusion.process import DiffusionConfig, GaussianDiffusion
from lungddpm.diffusion.train import build_model, train
from lungddpm.diffusion.unet import UNet3D, UNetConfig
from lungddpm.errors import LungDDPMError


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_overfit_fixed_sample() -> None:
    """Fixed clean volume, noise and timestep: the loss must fall far below its start."""
    torch.manual_seed(0)
    data = tiny_data(1)
    model = UNet3D(UNetConfig(image_size=16, **{**TINY_MODEL, "channel_mult": (1, 2), "attention_resolutions": (8,)}))
    d = GaussianDiffusion(DiffusionConfig())
    noise = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([60])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = d.loss(model, data.images, data.layouts, t, noise).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.7 and min(losses[-10:]) < 0.25 * losses[0]


def test_trainer_writes_outputs_and_learns(tmp_path: Path) -> None:
    cfg = tiny_config(steps=120, checkpoint_every=60, log_every=10, preview_every=60)
    result = train(tiny_data(), cfg, tmp_path / "out", tmp_path / "state", tiny_data(1), threads=THREADS)
    assert result.step == 120
    rows = read_log(tmp_path / "out" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(10, 121, 10))
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "seconds", "samples_per_s"]
    assert float(rows[-1]["loss"]) < 0.6 * float(rows[0]["loss"])
    assert (tmp_path / "out" / "preview.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "state" / "previews" / "step_0000060.png").is_file()
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 120 and ckpt["hu_window"] == [-1000.0, 400.0]
    model, _ = load_model(tmp_path / "out" / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt["ema"].values()))
    assert sorted(p.name for p in (tmp_path / "state").glob("step_*.pt")) == ["step_0000060.pt", "step_0000120.pt"]


def test_the_logs_seconds_per_step_leave_out_writing_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint that takes 2 s to write: the next log row's seconds per step were 1 s longer (a 0.6 GB paper
    checkpoint every 1000 steps slowed every 100th row)."""
    import lungddpm.diffusion.train as training

    write = training.save_atomic
    monkeypatch.setattr(training, "save_atomic", lambda *a, **k: (time.sleep(2.0), write(*a, **k))[1])
    train(tiny_data(2), tiny_config(steps=6, checkpoint_every=2, log_every=2), tmp_path / "o", tmp_path / "s",
          threads=THREADS)  # fmt: skip
    seconds = [float(r["seconds"]) for r in read_log(tmp_path / "o" / "train_log.csv")]
    assert len(seconds) == 3 and max(seconds) - min(seconds) < 0.5, seconds


def _states_equal(a: dict, b: dict) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_is_bit_for_bit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config(steps=20, checkpoint_every=10)
    train(tiny_data(), cfg, tmp_path / "a", tmp_path / "sa", threads=THREADS)
    first = train(tiny_data(), cfg, tmp_path / "b", tmp_path / "sb", threads=THREADS, stop_after=10)
    assert first.step == 10 and not (tmp_path / "b" / "checkpoint.pt").exists()  # stopped: no declared output
    train(tiny_data(), cfg, tmp_path / "b", tmp_path / "sb", threads=THREADS)  # resumes at step 10
    a = load_checkpoint(tmp_path / "sa" / "step_0000020.pt")
    b = load_checkpoint(tmp_path / "sb" / "step_0000020.pt")
    for key in ("model", "ema", "optimizer", "rng_cpu", "step"):
        assert _states_equal(a[key], b[key]), key
    log_a, log_b = read_log(tmp_path / "a" / "train_log.csv"), read_log(tmp_path / "b" / "train_log.csv")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and len(log_a) == 20
    # a resume between two log rows: the row after it averages the same steps (9-12) as the uninterrupted run's
    # (before, 11-12: the losses of steps 9 and 10 were lost with the process)
    sparse = tiny_config(steps=20, checkpoint_every=10, log_every=4)
    train(tiny_data(), sparse, tmp_path / "d", tmp_path / "sd", threads=THREADS, stop_after=10)
    train(tiny_data(), sparse, tmp_path / "d", tmp_path / "sd", threads=THREADS)
    train(tiny_data(), sparse, tmp_path / "e", tmp_path / "se", threads=THREADS)
    log_d, log_e = read_log(tmp_path / "d" / "train_log.csv"), read_log(tmp_path / "e" / "train_log.csv")
    assert [r["step"] for r in log_d] == [r["step"] for r in log_e] == ["4", "8", "12", "16", "20"]
    assert [r["loss"] for r in log_d] == [r["loss"] for r in log_e]
    assert float(log_e[2]["loss"]) == pytest.approx(np.mean([float(r["loss"]) for r in log_a[8:12]]), abs=2e-6)
    # a finished run of 10 steps extended to 20 by train.steps: its row at 10 (off the cadence) no longer cuts the
    # window, so row 12 averages 9-12 as the unbroken run's (it averaged 11-12)
    train(tiny_data(), tiny_config(steps=10, checkpoint_every=10, log_every=4), tmp_path / "f", tmp_path / "sf",
          threads=THREADS)  # fmt: skip
    train(tiny_data(), sparse, tmp_path / "f", tmp_path / "sf", threads=THREADS)
    log_f = read_log(tmp_path / "f" / "train_log.csv")
    assert [r["step"] for r in log_f] == ["4", "8", "10", "12", "16", "20"]
    assert [r["loss"] for r in log_f if r["step"] != "10"] == [r["loss"] for r in log_e]
    again = train(tiny_data(), cfg, tmp_path / "a", tmp_path / "sa", threads=THREADS)  # finished: nothing left to train
    assert again.step == 20 and again.final_loss == float(log_a[-1]["loss"])  # the logged loss, not NaN
    # fewer steps than the newest checkpoint: refused with the way out, never a silently longer model
    with pytest.raises(LungDDPMError, match=r"sa: the newest checkpoint is at step 20, past train.steps 15; raise"):
        train(tiny_data(), tiny_config(steps=15, checkpoint_every=10), tmp_path / "c", tmp_path / "sa", threads=THREADS)
    assert not (tmp_path / "c").exists()
    # a finished training whose weight-shaping settings changed is refused, never handed back as if retrained...
    with pytest.raises(LungDDPMError, match=r"sa: this training finished \(step 20 of 20\) with other train settings "
                       r"\(lr 0.002 then, 0.0001 now\); to train anew with them choose a new train.name"):  # fmt: skip
        train(tiny_data(), tiny_config(steps=20, checkpoint_every=10, lr=1e-4), tmp_path / "c", tmp_path / "sa")
    # ... nor resumed on other data (another split, preprocessing, ROIs, texture levels)
    other = tiny_data()
    other = TrainData(other.images.flip(-1), other.layouts, other.case_ids)
    assert data_digest(other) != data_digest(tiny_data()) == data_digest(tiny_data())
    with pytest.raises(CheckpointError, match=r"step_0000020.pt: trained with another training data \(the train"):
        train(other, cfg, tmp_path / "c", tmp_path / "sa", threads=THREADS)
    assert not (tmp_path / "c").exists()
    # the lesion model's refusal names its own keys (a demo upgraded to new ROIs was told train.name)
    with pytest.raises(CheckpointError, match=r"choose a new lesion.train.name \(or set lesion.train.resume: never"):
        train(other, cfg, tmp_path / "c", tmp_path / "sa", threads=THREADS, stage="train_lesion")
    # how often it logs or checkpoints does not shape the weights: handed back as is
    same = train(tiny_data(), tiny_config(steps=20, checkpoint_every=5, log_every=2), tmp_path / "c", tmp_path / "sa")
    assert same.step == 20 and (tmp_path / "c" / "checkpoint.pt").is_file()
    caplog.set_level(logging.INFO, logger="lungddpm.diffusion")
    train(
        tiny_data(),
        tiny_config(steps=21, checkpoint_every=10, lr=1e-4),
        tmp_path / "a",
        tmp_path / "sa",
        threads=THREADS,
    )
    assert "step_0000020.pt (step 20)" in caplog.text  # continued with another lr: a deliberate change mid-run
    assert "train settings changed since the checkpoint of step 20: lr\n" in caplog.text


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse it."""


class Shell:
    """A pickle that would call os.system on load (never run: weights_only refuses its module)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("true",)


def test_unsafe_corrupt_and_foreign_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_config(steps=20, checkpoint_every=10)
    state = tmp_path / "state"
    train(tiny_data(), cfg, tmp_path / "out", state, threads=THREADS)
    expected = fingerprint(cfg, data_digest(tiny_data()))
    # a truncated newest checkpoint is skipped, never loaded
    newest = state / "step_0000020.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    (state / ".step_0000030.pt.x.tmp.pt").write_bytes(b"partial")  # an interrupted atomic write
    assert find_resume_checkpoint(state, expected)["step"] == 10
    # a configuration change is refused, naming it, with the way out
    with pytest.raises(CheckpointError, match=r"another grid \(preprocess.size\): \[16, 16, 16\] then, \[32, 32, 32\] "
                       r"now; to train anew .*train.resume: never"):  # fmt: skip
        find_resume_checkpoint(state, {**expected, "size": [32, 32, 32]})
    # a checkpoint from before the data digest still resumes (a warning says that its data cannot be checked)
    old = load_checkpoint(state / "step_0000010.pt")
    old["fingerprint"].pop("data")
    torch.save(old, state / "step_0000010.pt")
    assert find_resume_checkpoint(state, expected)["step"] == 10
    # a diffusion key added later and left at null (snr_gamma) does not enter the fingerprint: an older training
    # resumes; set, it is a change like any other
    assert "snr_gamma" in cfg.raw["diffusion"] and "snr_gamma" not in expected["diffusion"]
    with pytest.raises(CheckpointError, match=r"another diffusion process \(diffusion.\*\)"):
        find_resume_checkpoint(state, {**expected, "diffusion": {**expected["diffusion"], "snr_gamma": 5.0}})
    # a pickle that needs arbitrary objects is refused, loudly
    evil = state / "step_0000040.pt"
    torch.save({"model": {}, "payload": Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        find_resume_checkpoint(state, expected)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(evil)
    torch.save({"model": {}, "payload": Shell()}, evil)  # a blocked module (posix): refused too, not "damaged"
    with pytest.raises(CheckpointError, match="refused — .* arbitrary Python objects"):
        find_resume_checkpoint(state, expected)
    with pytest.raises(CheckpointError, match="not a lungddpm model checkpoint"):
        load_model(state / "step_0000010.pt")
    # a damaged pickle (an opcode that no pickle holds) is skipped like a truncated file, not refused as unsafe
    evil.unlink()
    good, damaged = state / "step_0000010.pt", state / "step_0000050.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            out.writestr(name, data[:2] + b"\xff" + data[3:] if name.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match=r"step_0000050.pt: not a readable .* pickle is damaged .*operand 255"):
        load_model(damaged)
    assert find_resume_checkpoint(state, expected)["step"] == 10
    # one flipped bit in the weights: torch reads the record without its CRC-32 (other weights, silently); the
    # archive's check finds it, and a resume falls back to the checkpoint before, as for a file cut short
    raw = good.read_bytes()
    with zipfile.ZipFile(good) as zf:
        record = max(zf.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
    at = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + record.file_size // 2
    damaged.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :])
    with pytest.raises(CheckpointError, match=rf"step_0000050.pt: .* its member {record.filename} fails its CRC-32"):
        load_model(damaged)
    assert find_resume_checkpoint(state, expected)["step"] == 10
    damaged.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"step_0000050.pt: not a readable .* it is cut short"):
        load_model(damaged)
    assert find_resume_checkpoint(state, expected)["step"] == 10


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    cts, lays = write_cases(tmp_path / "data", 3)
    one = tiny_config(steps=4, batch_size=2, checkpoint_every=4, preview_every=0)
    two = tiny_config(steps=4, batch_size=1, checkpoint_every=4, preview_every=0, processes=2)
    run_job(make_job(one, cts, lays, [], [], tmp_path / "one", tmp_path / "s1", threads=1))
    job = make_job(two, cts, lays, [], [], tmp_path / "two", tmp_path / "s2", threads=1)
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lungddpm.cli",
            "train-job",
            str(tmp_path / "job.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_log(tmp_path / "one" / "train_log.csv"), read_log(tmp_path / "two" / "train_log.csv")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-4)
        assert float(rb["grad_norm"]) == pytest.approx(float(ra["grad_norm"]), rel=1e-3)
    wa = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    # Adam divides by sqrt(v): near-zero gradients turn summation-order noise into lr-sized steps, so weights
    # agree to a few learning-rate steps while the loss trajectory agrees to 1e-4
    assert all(torch.allclose(wa[k], wb[k], atol=4 * 2e-3) for k in wa)
    assert np.mean([float((wa[k] - wb[k]).abs().mean()) for k in wa]) < 1e-4


def test_cpu_bf16_training_probes_the_convolution_gradients_of_its_levels(tmp_path: Path, caplog) -> None:
    """A 16³ grid with four levels has a 2x2x2 level of 32 channels: where this CPU's bf16 convolution gradients
    are wrong there (oneDNN on AVX512-BF16), an explicit bf16 stops with the fix and auto trains in fp32."""
    from lungddpm.config import Config, validate_config
    from lungddpm.diffusion import precision

    def cfg(prec: str) -> Config:
        model = {**TINY_MODEL, "channel_mult": [1, 2, 4, 4], "attention_resolutions": []}
        tr = {"steps": 2, "checkpoint_every": 2, "preview_every": 0, "preview_sampler_steps": 2, "precision": prec}
        return Config.from_dict(validate_config({"preprocess": {"size": [16, 16, 16]}, "model": model, "train": tr}))

    convs = precision.network_convolutions(build_model(cfg("bf16"), 0), (16, 16, 16), False)
    errors = [precision.bf16_conv_grad_error(c[0], *c[1:]) for c in convs]  # on this machine (all at most 6³)
    wrong = not all(e <= precision.CONV_GRAD_TOLERANCE for e in errors)
    if wrong:
        with pytest.raises(LungDDPMError, match=r"channels \(stride 1\) on 2x2x2 voxels.*auto or fp32, or choose"):
            train(tiny_data(), cfg("bf16"), tmp_path / "a", tmp_path / "sa", threads=THREADS)
        assert not (tmp_path / "a").exists()
    else:
        assert train(tiny_data(), cfg("bf16"), tmp_path / "a", tmp_path / "sa", threads=THREADS).step == 2
    caplog.clear()  # the auto run's records only (the explicit bf16 run logs "bfloat16" where INFO is captured)
    with caplog.at_level(logging.INFO):
        assert train(tiny_data(), cfg("auto"), tmp_path / "b", tmp_path / "sb", threads=THREADS).step == 2
    native = precision.cpu_has_native_bf16()
    assert ("training in fp32 instead" in caplog.text) == (wrong and native)
    assert ("bfloat16" in caplog.text) == (native and not wrong)  # the run's precision, as logged


def test_a_resume_applies_todays_weight_decay(tmp_path: Path) -> None:
    """load_state_dict alone put the checkpoint's weight decay (and fused, betas, eps) back over today's."""
    import shutil

    before = tiny_config(steps=4, checkpoint_every=2, weight_decay=0.0)
    train(tiny_data(), before, tmp_path / "o", tmp_path / "same", threads=THREADS, stop_after=2)
    shutil.copytree(tmp_path / "same", tmp_path / "decay")
    train(tiny_data(), before, tmp_path / "o", tmp_path / "same", threads=THREADS, stop_after=3)
    after = tiny_config(steps=4, checkpoint_every=2, weight_decay=0.1)
    train(tiny_data(), after, tmp_path / "o", tmp_path / "decay", threads=THREADS, stop_after=3)
    same = load_checkpoint(tmp_path / "same" / "step_0000003.pt")
    decay = load_checkpoint(tmp_path / "decay" / "step_0000003.pt")
    assert [g["weight_decay"] for g in same["optimizer"]["param_groups"]] == [0.0]
    assert [g["weight_decay"] for g in decay["optimizer"]["param_groups"]] == [0.1]
    assert all(g["lr"] == 2e-3 and g["fused"] is False for g in decay["optimizer"]["param_groups"])
    assert not all(torch.equal(same["model"][k], decay["model"][k]) for k in same["model"])  # step 3 decayed


def test_only_the_main_rank_keeps_the_loss_window(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every rank appended each step's loss, only rank 0 (which logs) cleared them: the other ranks kept them all."""
    import weakref

    from lungddpm.diffusion import train as train_module
    from lungddpm.diffusion.distributed import Dist

    monkeypatch.setattr(train_module, "setup_distributed", lambda: Dist(1, 1, 1, torch.device("cpu")))
    batches = train_module.StepBatches  # rank 1 of a world of 1 (no process group): rank 0's batches
    monkeypatch.setattr(train_module, "StepBatches", lambda *a: batches(*a[:4], 0, *a[5:]))
    losses: list[weakref.ref] = []
    alive: list[int] = []

    def all_mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
        alive.append(sum(r() is not None for r in losses))  # earlier steps' losses still referenced
        out = value.clone()
        losses.append(weakref.ref(out))
        return out

    monkeypatch.setattr(train_module, "all_mean", all_mean)
    train(tiny_data(), tiny_config(steps=6, checkpoint_every=6), tmp_path / "o", tmp_path / "s", stop_after=6)
    assert alive == [0, 1, 1, 1, 1, 1]  # the previous step's (last_loss) only
    assert not (tmp_path / "s").exists()  # a rank other than 0 writes nothing


def test_gpu_rng_state_is_this_devices_and_restores_to_it_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 saved every visible GPU's state and each rank restored the whole list: with fewer GPUs on resume
    (train.gpus 2 -> 1) that indexed a missing one. Now one state, this device's; older lists still load."""
    from torch import nn

    from lungddpm.diffusion import train as train_module
    from lungddpm.diffusion.optim import EMA

    state_of = {torch.device("cuda:1"): torch.tensor([1], dtype=torch.uint8)}
    restored: list[tuple[list[int], torch.device]] = []

    def every_gpu() -> list[torch.Tensor]:
        raise AssertionError("saved every GPU's state")

    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: state_of[torch.device(device)])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s.tolist(), device)))
    model = nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cuda1 = torch.device("cuda:1")
    state = train_module._state(model, EMA(model, 0.9, False), opt, scaler, 1, tiny_config(), {}, cuda1, 1)
    assert state["rng_cuda"].tolist() == [1]
    cpu = torch.get_rng_state()
    a, b = torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)
    cases = [
        (state["rng_cuda"], cuda1, [([1], cuda1)]),  # this format: the saved device's state, into this device
        ([a, b], cuda1, [([8], cuda1)]),  # an older list: this device's entry...
        ([a], cuda1, [([7], cuda1)]),  # ... or the first, when it holds fewer GPUs
        ([], cuda1, []),  # a CPU checkpoint resumed on a GPU
        (state["rng_cuda"], torch.device("cpu"), []),  # a GPU checkpoint resumed on the CPU
    ]
    for saved, device, expected in cases:
        restored.clear()
        train_module.restore_rng({"rng_cpu": cpu, "rng_cuda": saved}, device)
        assert restored == expected


def test_each_rank_draws_its_own_dropout_masks() -> None:
    """After ``seed_rank`` (fresh or resumed: every rank starts from rank 0's RNG state) rank 0 draws as one process
    does and rank 1 other masks, the same on every run, and other ones after a resume at another step."""
    drop = torch.nn.Dropout(0.5)

    def masks(rank: int, step: int) -> torch.Tensor:
        torch.manual_seed(7)  # build_model's seed, or a checkpoint's restored state: the same on every rank
        seed_rank(7, step, Dist(2, rank, rank, torch.device("cpu")))
        return drop(torch.ones(256)) > 0

    torch.manual_seed(7)
    one_process = drop(torch.ones(256)) > 0
    assert torch.equal(masks(0, 0), one_process) and torch.equal(masks(0, 40), one_process)
    assert torch.equal(masks(1, 0), masks(1, 0))
    assert (masks(1, 0) != one_process).float().mean() > 0.3  # independent masks differ in ~half the units
    assert (masks(1, 40) != masks(1, 0)).float().mean() > 0.3


def test_torchrun_ranks_get_their_share_of_threads_and_log_into_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """launch writes each rank's share of the threads into job.json (the ranks set torch's threads from it, which
    overrode OMP_NUM_THREADS) and forwards the ranks' output into this job's log (it went to stderr only)."""
    from lungddpm.diffusion import jobs

    def fake_torchrun(job_path: Path, processes: int) -> list[str]:
        code = (
            "import json, os, sys; j = json.load(open(sys.argv[1])); "
            "print('rank threads', j['threads'], 'omp', os.environ['OMP_NUM_THREADS']); sys.exit(j['exit'])"
        )
        return [sys.executable, "-c", code, str(job_path)]

    monkeypatch.setattr(jobs, "torchrun_command", fake_torchrun)
    caplog.set_level(logging.INFO, logger="lungddpm.diffusion.jobs")
    jobs.launch({"state_dir": str(tmp_path), "threads": 16, "exit": 0}, 4)
    assert "| rank threads 4 omp 4" in caplog.text
    with pytest.raises(LungDDPMError, match="torchrun exited with 3"):
        jobs.launch({"state_dir": str(tmp_path), "threads": 16, "exit": 3}, 4)


def test_a_checkpoint_written_again_with_the_same_content_has_the_same_model_digest(tmp_path: Path) -> None:
    """Sampled items compare the model by content: torch.save's bytes differ between processes (a serialization
    id), so a training rerun that hands back the same weights kept its items only by luck of the bytes before."""
    import subprocess

    from lungddpm.diffusion.checkpoint import model_sha256

    code = (
        "import sys, torch; g = torch.Generator().manual_seed(0); "
        "torch.save({'ema': {'w': torch.randn(4, 4, generator=g)}, 'unet': {'c': 8}, 'version': sys.argv[2]}, "
        "sys.argv[1])"
    )
    for name, version in (("a.pt", "1"), ("b.pt", "2")):  # two processes, and another code version
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name), version], check=True)
    assert model_sha256(tmp_path / "a.pt") == model_sha256(tmp_path / "b.pt")
    torch.save({"ema": {"w": torch.zeros(4, 4)}, "unet": {"c": 8}, "version": "1"}, tmp_path / "c.pt")
    assert model_sha256(tmp_path / "c.pt") != model_sha256(tmp_path / "a.pt")
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    for name, config in (("d", {"sample": {"steps": 5}, "train": {"num_workers": 3}}), ("e", {"lesion": {"roi": 32}})):
        torch.save({**a, "config": config}, tmp_path / f"{name}.pt")  # only what sampling reads of the config counts
    assert model_sha256(tmp_path / "d.pt") == model_sha256(tmp_path / "a.pt") != model_sha256(tmp_path / "e.pt")
    torch.save({**a, "extra": [torch.zeros(3000), torch.ones(3000)]}, tmp_path / "f.pt")
    torch.save({**a, "extra": [torch.zeros(3000), torch.full((3000,), 2.0)]}, tmp_path / "g.pt")
    assert model_sha256(tmp_path / "f.pt") != model_sha256(tmp_path / "g.pt")  # tensors in a list: by value
