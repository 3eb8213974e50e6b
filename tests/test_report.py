from __future__ import annotations

import json
from pathlib import Path

from lungddpm.report.summary import write_report

SHA = "ab" * 32


def _manifest(tmp_path: Path, checkpoint: str) -> Path:
    prov = tmp_path / "eval_0.json"
    record = {"checkpoint": checkpoint, "checkpoint_sha256": SHA, "sampler": "dpm++", "steps": 3, "device": "cpu"}
    prov.write_text(json.dumps({**record, "seconds": 1.5}))
    manifest = tmp_path / "shard_0.json"
    manifest.write_text(json.dumps({"run": "eval", "items": [{"item": "eval_0", "provenance": str(prov)}]}))
    return manifest


def _summary(tmp_path: Path, train_log: Path | None, manifest: Path) -> str:
    quality = tmp_path / "image_quality.csv"
    quality.write_text("metric,region,comparison,value,ci_low,ci_high,n_a,n_b,features\n")
    out = tmp_path / "report"
    write_report(
        out / "summary.md", quality, train_log, [manifest], out / "loss.png", out / "quality.png", out / "figures", 0,
        demo=False,
    )  # fmt: skip
    return (out / "summary.md").read_text()


def test_a_model_not_trained_here_is_named_by_the_checkpoint_the_samples_came_from(tmp_path: Path) -> None:
    summary = _summary(tmp_path, None, _manifest(tmp_path, "/models/external.pt"))
    training = summary.split("## Training (whole-volume model)", 1)[1].split("##", 1)[0]
    assert "Not trained here" in training and f"`/models/external.pt` (SHA-256 `{SHA[:12]}`)" in training
    assert (tmp_path / "report/loss.png").is_file()


def test_a_model_trained_here_shows_its_loss_without_the_note(tmp_path: Path) -> None:
    log = tmp_path / "train_log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n")
    summary = _summary(tmp_path, log, _manifest(tmp_path, "results/models/demo/checkpoint.pt"))
    assert "Not trained here" not in summary and "![training loss](loss.png)" in summary
