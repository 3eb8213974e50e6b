"""lungddpm.versions: every rule passes its own output version, and each reuse key takes a bumped number."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from support import tiny_config

from lungddpm import versions
from lungddpm.config import load_config
from lungddpm.diffusion.checkpoint import CheckpointError, find_resume_checkpoint, fingerprint, save_atomic
from lungddpm.errors import LungDDPMError
from lungddpm.synthesis.lesion import run_settings
from lungddpm.synthesis.volume_run import _settings, provenance_complete

REPO = Path(__file__).resolve().parents[1]
RULE = re.compile(r"^([ \t]*)rule (\w+):\n((?:\1[ \t]+.*\n|[ \t]*\n)*)", re.M)


def _rules() -> dict[str, str]:
    """Each rule of the workflow (rules/*.smk and the Snakefile): its name -> the text of its block."""
    out: dict[str, str] = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for m in RULE.finditer(path.read_text()):
            out[m.group(2)] = m.group(3)
    return out


def test_every_rule_passes_its_own_output_version() -> None:
    rules = _rules()
    assert {"preprocess", "train_lesion", "segment_train", "import_checkpoint"} <= set(rules)  # the parse finds them
    assert set(versions.OUTPUT_VERSIONS) == set(rules) - {"all"}
    for name, block in rules.items():
        passed = re.findall(r'\*\*output_version\("(\w+)"\)', block)
        assert passed == ([] if name == "all" else [name]), name
    assert all(isinstance(n, int) and n >= 1 for n in versions.OUTPUT_VERSIONS.values())


def test_output_version_leaves_version_1_out_and_refuses_an_unknown_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, "layout", 1)
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, "metrics", 3)
    assert versions.output_version("layout") == {} and versions.output_version("metrics") == {"version": 3}
    with pytest.raises(LungDDPMError, match=r"no output version for the stage 'sampel'; add it to lungddpm.versions"):
        versions.output_version("sampel")


@pytest.mark.parametrize(("stage", "bump"), [("synthesize_lesion", 2), ("sample", 3)])
def test_a_bumped_sampling_stage_remakes_its_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, bump: int
) -> None:
    """An item's provenance holds its run's version; items of older code (version 1: no key) are not complete."""
    cfg = load_config(REPO / "config/config.yaml")
    settings = {
        "synthesize_lesion": lambda: run_settings(cfg, "x"),
        "sample": lambda: _settings(cfg, "eval", "x", None),
    }
    files = {"provenance": tmp_path / "item.json", "ct": tmp_path / "item_ct.nii.gz"}
    files["ct"].write_bytes(b"")
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, stage, 1)
    old = settings[stage]()
    files["provenance"].write_text(json.dumps(old))
    assert "version" not in old and provenance_complete(files, old)
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, stage, bump)
    assert settings[stage]() == {**old, "version": bump}
    assert not provenance_complete(files, settings[stage]())


def test_a_bumped_training_refuses_to_resume_older_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, "train_lesion", 1)
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, "train", 1)
    old = fingerprint(cfg, "d", "train_lesion")
    assert "version" not in old and old == fingerprint(cfg, "d")  # version 1: the fingerprint as before versions
    state = {"fingerprint": old, "step": 5, "rng_cpu": torch.zeros(1, dtype=torch.uint8), "rng_cuda": []}
    state |= {k: {} for k in ("model", "ema", "optimizer", "scaler", "config")} | {"version": "x"}
    save_atomic(state, tmp_path / "step_0000005.pt")
    assert find_resume_checkpoint(tmp_path, old)["step"] == 5
    monkeypatch.setitem(versions.OUTPUT_VERSIONS, "train_lesion", 2)
    now = fingerprint(cfg, "d", "train_lesion")
    assert now["version"] == 2 and "version" not in fingerprint(cfg, "d", "train")  # each stage its own number
    said = r"step_0000005.pt: trained with another training code \(lungddpm.versions.OUTPUT_VERSIONS\): version 1 then"
    with pytest.raises(CheckpointError, match=said + r", 2 now; to train anew choose a new train"):
        find_resume_checkpoint(tmp_path, now)
