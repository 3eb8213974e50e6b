"""Resuming a training where a run of several processes differs from one: the dropout streams of ranks past the
first, and the global batch."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from support import THREADS, tiny_config, tiny_data

from lungddpm.config import Config, validate_config
from lungddpm.diffusion.checkpoint import load_checkpoint
from lungddpm.diffusion.distributed import Dist, seed_rank
from lungddpm.diffusion.train import train
from lungddpm.errors import LungDDPMError


def test_ranks_past_the_first_resume_their_dropout_stream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A rank past the first draws its dropout from (seed, step, rank) at every step: a run stopped at a checkpoint
    and resumed ends with the uninterrupted run's weights (before: it reseeded at the resumed step only, so its
    masks from there on differed; 2 gloo ranks, dropout 0.3: weights 5.6e-3 apart). Rank 0 writes the checkpoints
    here, with rank 1's seeding, since only rank 0 writes them."""
    from lungddpm.diffusion import train as train_module

    as_rank_1 = Dist(2, 1, 1, torch.device("cpu"))
    monkeypatch.setattr(train_module, "seed_rank", lambda seed, step, dist: seed_rank(seed, step, as_rank_1))
    raw = copy.deepcopy(tiny_config(steps=4, checkpoint_every=2).raw)
    raw["model"]["dropout"] = 0.3
    cfg = Config.from_dict(validate_config(raw))
    whole = train(tiny_data(), cfg, tmp_path / "a", tmp_path / "sa", threads=THREADS)
    train(tiny_data(), cfg, tmp_path / "b", tmp_path / "sb", threads=THREADS, stop_after=2)
    resumed = train(tiny_data(), cfg, tmp_path / "b", tmp_path / "sb", threads=THREADS)
    assert whole.step == resumed.step == 4
    a, b = load_checkpoint(tmp_path / "a/checkpoint.pt"), load_checkpoint(tmp_path / "b/checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_resume_with_another_global_batch_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each rank draws train.batch_size, so resuming on another number of GPUs changes the global batch: the
    checkpoint records it, and a resume before the last step goes on with the new one, saying so (here the batch
    size itself changes, one process, which the settings warning names too)."""
    train(tiny_data(), tiny_config(steps=4, checkpoint_every=2, batch_size=2), tmp_path / "o", tmp_path / "s",
          threads=THREADS, stop_after=2)  # fmt: skip
    assert load_checkpoint(tmp_path / "s/step_0000002.pt")["global_batch"] == 2
    caplog.set_level(logging.WARNING, logger="lungddpm.diffusion")
    train(tiny_data(), tiny_config(steps=4, checkpoint_every=2, batch_size=1), tmp_path / "o", tmp_path / "s")
    assert "the global batch was 2 up to step 2 and is 1 from now on (train.batch_size x processes x" in caplog.text
    assert "to keep 2, resume on as many GPUs (processes) as before" in caplog.text
    assert load_checkpoint(tmp_path / "s/step_0000004.pt")["global_batch"] == 1


def test_activation_checkpointing_and_the_process_count_resume_a_training(tmp_path: Path) -> None:
    """model.use_checkpoint trades memory for time and train.processes how the ranks are launched (as train.gpus):
    neither changes the weights, so a training stopped at step 2 resumes with either switched (before: "trained
    with another network (model.*)", or a finished training refused), with the uninterrupted run's weights and
    model digest; a refusal names the key that differs, not the whole section."""
    from lungddpm.diffusion.checkpoint import (
        check_resume,
        fingerprint,
        fingerprint_differences,
        model_digest,
        save_atomic,
    )

    def cfg(use_checkpoint: bool = False, **train: object) -> Config:
        raw = copy.deepcopy(tiny_config(steps=4, checkpoint_every=2, **train).raw)
        raw["model"]["use_checkpoint"] = use_checkpoint
        return Config.from_dict(validate_config(raw))

    train(tiny_data(), cfg(), tmp_path / "a", tmp_path / "sa", threads=THREADS)
    train(tiny_data(), cfg(), tmp_path / "b", tmp_path / "sb", threads=THREADS, stop_after=2)
    train(tiny_data(), cfg(use_checkpoint=True), tmp_path / "b", tmp_path / "sb", threads=THREADS)
    a, b = load_checkpoint(tmp_path / "a/checkpoint.pt"), load_checkpoint(tmp_path / "b/checkpoint.pt")
    assert b["unet"]["use_checkpoint"] and not a["unet"]["use_checkpoint"] and a["global_batch"] == 1
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]) and model_digest(a) == model_digest(b)
    finished = load_checkpoint(tmp_path / "sa/step_0000004.pt")
    check_resume(finished, cfg(processes=2), tmp_path / "sa")  # handed back as is, as with train.gpus
    # a lesion-only key (the lesion model inherits it) does not refuse the whole-volume model, which never reads it
    # (it did, after Snakemake had deleted its checkpoint.pt: the model was lost); the lesion model's it does
    lesion_only = cfg(focus_margin_mm=2.0, focus_weight=1.0, balance_textures=True, cond_dropout=0.2)
    check_resume(finished, lesion_only, tmp_path / "sa")
    with pytest.raises(LungDDPMError, match=r"focus_margin_mm 3.0 then, 2.0 now"):
        check_resume(finished, lesion_only, tmp_path / "sa", "lesion.train")
    finished["fingerprint"]["model"]["use_checkpoint"] = True  # as the code before wrote it for such a run
    save_atomic(finished, tmp_path / "sa/step_0000004.pt")
    assert train(tiny_data(), cfg(use_checkpoint=True), tmp_path / "a", tmp_path / "sa").step == 4  # resumed
    with pytest.raises(LungDDPMError, match=r"with other train settings \(ema_every 1 then, 3 now\)"):
        check_resume(finished, cfg(ema_every=3), tmp_path / "sa")  # a key the checkpoint predates: its old value
    wider = copy.deepcopy(cfg().raw)
    wider["model"]["model_channels"] *= 2
    diff = fingerprint_differences(fingerprint(cfg()), fingerprint(Config.from_dict(validate_config(wider))), tmp_path)
    assert diff == [f"network (model.*): model_channels {cfg().model['model_channels']} then, "
                    f"{wider['model']['model_channels']} now"]  # fmt: skip
