from __future__ import annotations

import json
from pathlib import Path

from lungddpm.io import write_csv
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


def test_stages_switched_off_are_said_with_the_key_not_left_out(tmp_path: Path) -> None:
    """Without segmentation and the lesion scale the report said nothing of them (no heading, no note)."""
    summary = _summary(tmp_path, None, _manifest(tmp_path, "/models/external.pt"))
    for heading, key in (
        ("## Downstream nodule segmentation", "segmentation.enabled"),
        ("## Lesion scale", "lesion.enabled"),
    ):
        section = summary.split(heading, 1)[1].split("##", 1)[0]
        assert f"Not run: `{key}: false` in this run's config. Set it to true and rerun" in section


def test_the_lesion_section_counts_train_cts_and_seconds_per_nodule(tmp_path: Path) -> None:
    """2 train CTs x 2 items of 3 and 1 sites: 8 nodules in 2 CTs (not 4 items), and the seconds per nodule
    averaged over the nodules (3 nodules at 1 s and 1 at 5 s per CT: 2.00 s, where the items' mean is 3.00); each
    batch size of the items."""
    from lungddpm.report.summary import lesion_section

    items = []
    for case in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        for k, (n_sites, seconds) in enumerate(((3, 1.0), (1, 5.0))):
            name = f"{case}_{k}"
            files = {f"s{j}_montage": f"{name}_s{j}_montage.png" for j in range(n_sites)}
            for f in files.values():
                (tmp_path / f).write_bytes(b"png")
            prov = {"source_case": case, "sites": [{}] * n_sites, "seconds_per_nodule": seconds, "files": files,
                    "sample": {"sampler": "dpm++", "steps": 20}, "batch_size": 4 if k == 0 else 1,
                    "device": "cpu", "insert": {"feather_mm": 2.0, "margin_mm": 3.0}}  # fmt: skip
            (tmp_path / f"{name}.json").write_text(json.dumps(prov))
            items.append({"item": name})
    manifest = tmp_path / "shard_0.json"
    manifest.write_text(json.dumps({"items": items}))
    texture = tmp_path / "texture.csv"
    texture.write_text("texture_class,inserted_mean_hu,inserted_sd_hu,n_inserted,real_mean_hu,real_sd_hu,n_real\n")
    text = "\n".join(lesion_section([manifest], texture, tmp_path / "figures", tmp_path, montages=1))
    assert "8 nodules inserted into the nodule-free lung ROIs of 2 train CT(s)" in text
    # every item's batch size (a resume keeps items of another; the last item's alone was said), and the device
    assert "dpm++ 20 steps, 2.00 s of sampling per nodule in a shard job (batched 4 / 1, on cpu;" in text
    assert "Texture control" in text
    # lesion.enabled false, the lesion run made for a whole-scale arm of synthetic_source lesion: the run is shown,
    # and the heading says what did not run (it said the lesion stages had not run, and showed no lesion run)
    text = "\n".join(lesion_section([manifest], None, tmp_path / "figures", tmp_path, montages=1))
    assert "8 nodules inserted" in text and "Texture control" not in text
    quality = tmp_path / "image_quality.csv"
    quality.write_text("metric,region,comparison,value,ci_low,ci_high,n_a,n_b,features\n")
    out = tmp_path / "report"
    write_report(out / "summary.md", quality, None, [_manifest(tmp_path / "figures", "/m.pt")], out / "loss.png",
                 out / "quality.png", out / "figures", 0, demo=False, lesion_manifests=[manifest])  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert "The lesion run ran for the segmentation arms that use it (`synthetic_source: lesion`)" in summary
    assert "Not run: `lesion.enabled" not in summary and "8 nodules inserted into the nodule-free lung" in summary


def test_items_sampled_since_the_model_digest_name_it(tmp_path: Path) -> None:
    """Provenance written since 2026-12-05 holds the model's content digest (model_sha256), older the file's."""
    from lungddpm.report.summary import sampled_checkpoints

    new = _manifest(tmp_path, "/models/external.pt")
    prov = tmp_path / "eval_0.json"
    record = json.loads(prov.read_text())
    prov.write_text(json.dumps({**{k: v for k, v in record.items() if k != "checkpoint_sha256"}, "model_sha256": SHA}))
    assert sampled_checkpoints([new]) == [f"`/models/external.pt` (model digest `{SHA[:12]}`)"]


def test_the_lesion_cluster_note_names_the_configured_cluster(tmp_path: Path) -> None:
    """segmentation.evaluation.cluster: patient groups every ROI of a patient, not one nodule's jittered ROIs."""
    comparison = tmp_path / "comparison.csv"
    header = "arm,metric,n_cases,n_clusters,n_models,mean,ci_low,ci_high,baseline,diff,diff_ci_low,diff_ci_high,p_value"
    comparison.write_text(f"{header},test\nreal,fp_per_free_roi,4,2,1,0.5,0,1,real,,,,,\n")
    quality = tmp_path / "image_quality.csv"
    quality.write_text("metric,region,comparison,value,ci_low,ci_high,n_a,n_b,features\n")
    manifest, out = _manifest(tmp_path, "/models/external.pt"), tmp_path / "report"
    notes = {}
    for cluster in ("nodule", "patient"):
        write_report(
            out / "summary.md", quality, None, [manifest], out / "loss.png", out / "quality.png", out / "figures", 0,
            demo=False, segmentation=comparison, cluster=cluster,
        )  # fmt: skip
        notes[cluster] = next(ln for ln in (out / "summary.md").read_text().splitlines() if "A cluster is" in ln)
    assert notes["nodule"].startswith("A cluster is one nodule's jittered ROIs, with the nodules seen in them: inter")
    assert notes["patient"].startswith("A cluster is every ROI of one patient (`segmentation.evaluation.cluster: ")
    assert "jittered" not in notes["patient"]


def test_whole_scale_clusters_paired_patients_and_a_lone_nodule_are_said(tmp_path: Path) -> None:
    """The whole scale's cluster is a patient (it was unexplained); a paired row shows the patients its interval
    resamples (4 pairs of 2 patients looked like 4 units); one real nodule has no spread (it showed '± 0')."""
    from lungddpm.report.summary import quality_section, segmentation_section

    comparison = tmp_path / "comparison.csv"
    header = "arm,metric,n_cases,n_clusters,n_models,mean,ci_low,ci_high,baseline,diff,diff_ci_low,diff_ci_high,p_value"
    comparison.write_text(
        f"{header},test\nreal,dice,12,9,5,0.5,0.4,0.6,real,,,,,\nreal,fp_per_scan,12,9,5,1,0,2,real,,,,,\n"
    )
    text = "\n".join(segmentation_section(comparison, None, tmp_path))
    assert "| 12 (9 clusters) x 5 |" in text and "A cluster is one patient (the CTs of its series together)" in text
    paired = {
        "metric": "mse",
        "region": "whole",
        "comparison": "synthetic-vs-real (paired)",
        "value": "7758",
        "ci_low": "6086",
        "ci_high": "9431",
        "n_a": "4",
        "n_b": "2",
        "features": "",
        "reportable": "True",
    }
    assert "| mse | whole | HU² | 7758 [6086, 9431] | 4 (2 patients) |" in "\n".join(quality_section([paired]))
    from lungddpm.report.summary import _mean_sd

    assert _mean_sd("-485.3", "0", "1") == "-485.3 (n=1)" and _mean_sd("-175", "99.9", "25") == "-175 ± 99.9 (n=25)"


def test_the_baseline_mixed_devices_biased_w1_and_empty_inputs_are_said(tmp_path: Path) -> None:
    """The segmentation table names its baseline arm (a NaN difference looked like the baseline's blank one); a run
    sampled on two devices says both (the first item's device was printed beside every item's mean seconds); a W1
    outside its own interval is marked † as the image-quality table marks it; montages link relative to the summary;
    an empty quality table and a lesion run with no items say so (an empty heading, a blank plot before)."""
    from lungddpm.report.summary import _w1, lesion_section, montage_section, segmentation_section, timing_section

    comparison = tmp_path / "comparison.csv"
    header = "arm,metric,n_cases,n_clusters,n_models,mean,ci_low,ci_high,baseline,diff,diff_ci_low,diff_ci_high,p_value"
    comparison.write_text(f"{header},test\nreal,dice,4,4,1,0.5,0.4,0.6,real,,,,,\nsyn,dice,4,4,1,0.6,0.5,0.7,real,"
                          "0.1,0.0,0.2,0.3,wilcoxon\n")  # fmt: skip
    text = "\n".join(segmentation_section(comparison, None, tmp_path))
    assert "Baseline arm: `real`; a difference is the arm's mean minus the baseline's, paired by case." in text
    assert "| syn | dice | 0.6 [0.5, 0.7] | 0.1 [0, 0.2] | 0.3 (wilcoxon) |" in text
    manifest = _manifest(tmp_path, "/models/m.pt")
    other = tmp_path / "eval_1.json"
    record = json.loads((tmp_path / "eval_0.json").read_text())
    other.write_text(json.dumps({**record, "device": "cuda", "seconds": 0.5}))
    data = json.loads(manifest.read_text())
    data["items"].append({"item": "eval_1", "provenance": str(other)})
    manifest.write_text(json.dumps(data))
    assert "| eval | dpm++ | 3 | cpu, cuda | 2 | 1.0 |" in timing_section([manifest])
    row = {"w1_hu": "2.54", "w1_ci_low": "2.568", "w1_ci_high": "6.6", "w1_excess_hu": "-1", "w1_excess_ci_low": "-2",
           "w1_excess_ci_high": "0.5"}  # fmt: skip
    assert _w1(row) == "2.54 [2.568, 6.6] †" and _w1({**row, "w1_hu": "3"}) == "3 [2.568, 6.6]"
    assert _w1(row, "w1_excess") == "-1 [-2, 0.5]"
    assert "†" not in _w1({**row, "w1_ci_low": "nan", "w1_ci_high": "nan"})  # no interval to lie outside of
    for name in ("m.png", "m.gif"):
        (tmp_path / name).write_bytes(b"x")
    data["items"] = [{**data["items"][0], "montage": str(tmp_path / "m.png"), "gif": str(tmp_path / "m.gif")}]
    manifest.write_text(json.dumps(data))
    links = montage_section([manifest], tmp_path / "elsewhere" / "figs", 1, tmp_path / "report")
    assert "![eval_0](../elsewhere/figs/eval_m.png) ![sweep](../elsewhere/figs/eval_m.gif)" in links
    summary = _summary(tmp_path, None, _manifest(tmp_path, "/models/m.pt"))
    assert "No image-quality rows: the table is empty (rerun the metrics rule)." in summary
    empty = tmp_path / "lesion_shard.json"
    empty.write_text(json.dumps({"items": []}))
    said = lesion_section([empty], tmp_path / "texture.csv", tmp_path / "figures", tmp_path, montages=1)
    assert "The lesion run inserted no nodules (its manifests list no items)." in said
    # a class with real nodules but none inserted: said (its table had a floor row alone, its gallery row was blank)
    from lungddpm.report.summary import fidelity_section

    fidelity = tmp_path / "fidelity.csv"
    from lungddpm.metrics.lesion import COLUMNS

    rows = [("solid", "real A vs real B"), ("solid", "synthetic vs real B"), ("part-solid", "real A vs real B"),
            ("all", "real A vs real B"), ("all", "synthetic vs real B")]  # fmt: skip
    write_csv(fidelity, [{**dict.fromkeys(COLUMNS, 1), "texture_class": c, "comparison": k} for c, k in rows], COLUMNS)

    said = "\n".join(fidelity_section(fidelity, [], tmp_path))
    assert "No synthetic nodule of class part-solid was inserted: only its floor is shown." in said
    assert "class solid" not in said
