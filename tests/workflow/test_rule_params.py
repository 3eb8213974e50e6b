"""What reruns and what is scheduled, as Snakemake sees it: rule params, the split's rerun when a label map changes,
and sampling from a given checkpoint. Each test parses the workflow (seconds); only the split rule is run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, make_workdir, snakemake

from lungddpm.config import load_config
from lungddpm.preprocessing.cases import case_split, list_cases

IMAGES = {"source": "images", "images": {"ct_dir": "data/CT", "label_dir": "data/SEG"}}
EDGE = 8  # voxels: the split reads only the file names and the label maps' values
LUNG, NODULE = 1, 2  # Lung-DDPM's label convention (data.images.label_convention: lung_nodule)

# Snakemake has no public call that returns a rule's params; the API's parsed workflow holds them
PARAMS = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

snakefile, workdir, overrides, rules = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(snakefile=snakefile, workdir=workdir, resource_settings=ResourceSettings(cores=1),
                      config_settings=ConfigSettings(configfiles=[workdir / "ci.yaml"], config=overrides))
    params = {}
    for spec in rules:  # rule, or rule:key=value,... (wildcards: callable params are called with them)
        name, _, given = spec.partition(":")
        wildcards = SimpleNamespace(**dict(kv.split("=") for kv in given.split(","))) if given else None
        given_params = wf._workflow.get_rule(name).params.items()
        params[spec] = {k: repr(v(wildcards) if callable(v) else v) for k, v in given_params
                        if wildcards is not None or not callable(v)}
print("PARAMS " + json.dumps(params))
"""


def rule_params(workdir: Path, overrides: dict, *rules: str) -> dict[str, dict[str, str]]:
    """The ``repr`` of each param of ``rules`` (what Snakemake compares to rerun a job), with the CI config and
    ``overrides`` (as ``--config``); a rule given as ``rule:run=eval,shard=0`` has its callable params called with
    those wildcards, one given by name alone only its other params."""
    args = [str(REPO / "Snakefile"), str(workdir), json.dumps(overrides), *rules]
    proc = subprocess.run([sys.executable, "-c", PARAMS, *args], capture_output=True, text=True, cwd=workdir)
    line = [x for x in proc.stdout.splitlines() if x.startswith("PARAMS ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[0].removeprefix("PARAMS "))


def test_train_lesion_reruns_on_lesion_settings_not_on_whole_volume_only_ones(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    base = rule_params(workdir, {}, "train_lesion", "train")
    whole = rule_params(workdir, {"train": {"steps": 500, "name": "other"}}, "train_lesion", "train")
    lesion = rule_params(workdir, {"lesion": {"train": {"name": "ci", "steps": 7}}}, "train_lesion")
    assert whole["train"] != base["train"]  # the whole-volume model does retrain
    assert whole["train_lesion"] == base["train_lesion"]  # lesion.train.steps overrides train.steps
    assert lesion["train_lesion"] != base["train_lesion"]
    how = {"num_workers": 3, "compile": True, "log_every": 7, "gpus": 1, "checkpoint_every": 9}  # not the weights
    running = rule_params(workdir, {"train": how, "lesion": {"train": how}}, "train_lesion", "train")
    assert running == base  # a rerun would rewrite the checkpoint, and everything sampled with it would follow
    # keys only the lesion scale's data reads retrain the lesion model (which inherits them), not the whole-volume one
    lesion_only = {"focus_margin_mm": 2.0, "focus_weight": 1.5, "balance_textures": True, "cond_dropout": 0.3}
    edited = rule_params(workdir, {"train": lesion_only}, "train")
    assert edited["train"] == base["train"]
    flips = [rule_params(workdir, {"train": {"flip": True, "cond_dropout": p}}, "train")["train"] for p in (0, 0.3)]
    assert flips[0] != flips[1]  # with flips, the dropout's draw shifts theirs: it shapes the weights


def test_sampling_reruns_on_what_changes_its_volumes_only(tmp_path: Path) -> None:
    """Batching, compiling and the intensity section (the checkpoint's) never change a sampled volume; layout
    editing shapes the augment run only, eval_samples_per_layout the eval run only. A rerun would rewrite the
    manifests and rerun the metrics and the segmentation arms after them."""
    workdir = make_workdir(tmp_path)
    runs = ("sample:run=eval,shard=0", "sample:run=augment,shard=0", "synthesize_lesion:shard=0", "lesion_texture")
    base = rule_params(workdir, {}, *runs)
    how = {"sample": {"batch_size": 3, "compile": True}, "lesion": {"sample": {"batch_size": 5, "compile": True}},
           "intensity": {"hu_window": [-1100, 500]}}  # fmt: skip
    assert rule_params(workdir, how, *runs) == base
    edit = rule_params(workdir, {"sample": {"eval_samples_per_layout": 3}}, *runs[:2])
    assert edit[runs[1]] == base[runs[1]] and edit[runs[0]]["shard_items"] != base[runs[0]]["shard_items"]
    assert edit[runs[0]]["settings"] == base[runs[0]]["settings"]
    augment = rule_params(workdir, {"layout_edit": {"insert": 2}}, *runs[:2])
    assert augment[runs[0]] == base[runs[0]] and augment[runs[1]]["settings"] != base[runs[1]]["settings"]
    # inserting nothing, the bank's filters and the placement tries shape nothing (they resampled the augment run)
    none = [rule_params(workdir, {"layout_edit": {"insert": 0, **e}}, runs[1])[runs[1]]
            for e in ({}, {"diameter_mm": [3, 5], "max_attempts": 7, "textures": [5]})]  # fmt: skip
    assert none[0] == none[1] and none[0]["settings"] != base[runs[1]]["settings"]
    # the inserted nodules' label fraction: another one remakes the augment run (and the texture check at the lesion
    # scale), not the eval run; the default, written out, changes nothing
    for fraction, changed in ((0.5, False), (0.3, True)):
        got = rule_params(workdir, {"preprocess": {"nodule_fraction": fraction},
                                    "lesion": {"roi": {"nodule_fraction": fraction}}}, *runs)  # fmt: skip
        assert got[runs[0]] == base[runs[0]]
        assert (got[runs[1]]["settings"] != base[runs[1]]["settings"]) is changed
        assert (got[runs[3]]["settings"] != base[runs[3]]["settings"]) is changed
    steps = rule_params(workdir, {"sample": {"steps": 7}, "lesion": {"sample": {"steps": 7}}}, *runs)
    assert all(steps[r]["settings"] != base[r]["settings"] for r in runs)
    # with blending off, the blend's margin and start shape nothing (they reran sampling)
    off = [rule_params(workdir, {"sample": {"blend": False, **m}}, runs[0])[runs[0]]["settings"]
           for m in ({}, {"blend_margin_mm": 20, "blend_start_fraction": 0.5})]  # fmt: skip
    assert off[0] == off[1] != base[runs[0]]["settings"]
    # the trained model's path written out as sample.checkpoint is its default: the same params (it reran sampling)
    trained = {"sample": {"checkpoint": str(workdir / "results/models/demo/checkpoint.pt")}}
    assert rule_params(workdir, trained, *runs[:2]) == {r: base[r] for r in runs[:2]}


def _images_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bool]]:
    """A workdir of 6 own-image cases (data.source images), the first 3 with a nodule: (workdir, case -> nodule)."""
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path / "cache"))
    workdir = make_workdir(tmp_path / "wd", {"data": IMAGES, "segmentation": {"enabled": False}})
    for sub in ("CT", "SEG"):
        (workdir / "data" / sub).mkdir(parents=True)
    cases = [f"LIDC-IDRI-{i:04d}" for i in range(1, 7)]
    nodules = {c: i < len(cases) // 2 for i, c in enumerate(cases)}
    for case in cases:
        _write_case(workdir / "data", case, nodules[case])
    return workdir, nodules


def _write_case(data: Path, case: str, nodule: bool) -> None:
    ct = np.full((EDGE,) * 3, -1000, np.int16)
    label = np.zeros((EDGE,) * 3, np.uint8)
    label[2:-2, 2:-2, 2:-2] = LUNG
    label[EDGE // 2, EDGE // 2, EDGE // 2] = NODULE if nodule else LUNG
    sitk.WriteImage(sitk.GetImageFromArray(ct), str(data / "CT" / f"{case}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(data / "SEG" / f"{case}.nii.gz"))


def _splits(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as fh:
        return {r["case_id"]: (r["subset"], r["has_nodule"]) for r in csv.DictReader(fh)}


def test_split_reruns_when_a_label_map_gains_a_nodule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With images the split's strata come from the label maps: fixing one changes the split the workflow uses
    at parse time, so a splits.csv written before is refused, naming the way out, and rewritten once deleted."""
    workdir, nodules = _images_workdir(tmp_path, monkeypatch)
    data, cases = workdir / "data", sorted(nodules)
    snakemake(workdir, "results/splits.csv")
    assert "Nothing to be done" in snakemake(workdir, "-n", "results/splits.csv").stdout
    nodules[cases[-1]] = True  # a nodule that the first label map missed
    _write_case(data, cases[-1], nodules[cases[-1]])
    dry = snakemake(workdir, "-n", "results/splits.csv", check=False)
    said = dry.stdout + dry.stderr
    assert dry.returncode != 0 and "results/splits.csv: the label maps of 1 case(s) (LIDC-IDRI-0006)" in said, said
    assert "delete results/splits.csv to rerun the split" in said  # before: "Nothing to be done"
    (workdir / "results/splits.csv").unlink()
    snakemake(workdir, "results/splits.csv")
    monkeypatch.chdir(workdir)
    cfg = load_config(workdir / "config/config.yaml", {"data": IMAGES})
    split = case_split(cfg, list_cases(cfg))
    assert _splits(workdir / "results/splits.csv") == {c: (split[c], str(int(nodules[c]))) for c in cases}


def test_a_source_file_replaced_by_an_older_one_reruns_its_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snakemake reruns a job for a newer input only: a label map restored with cp -p, rsync -a or from a backup
    (an older mtime) rebuilt nothing, while the split read the new file. Each source file's size and mtime are in
    the preprocess job's params."""
    workdir, _ = _images_workdir(tmp_path, monkeypatch)
    rule = "preprocess:case=LIDC-IDRI-0001"
    before = rule_params(workdir, {"data": IMAGES}, rule)[rule]
    assert "SEG/LIDC-IDRI-0001.nii.gz" in before["sources"] and "CT/LIDC-IDRI-0001.nii.gz" in before["sources"]
    label = workdir / "data" / "SEG" / "LIDC-IDRI-0001.nii.gz"
    _write_case(workdir / "data", "LIDC-IDRI-0001", False)  # the nodule gone, then the file dated back
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns - 10**12))
    after = rule_params(workdir, {"data": IMAGES}, rule)[rule]
    assert after["sources"] != before["sources"] and after["settings"] == before["settings"]


def test_a_bumped_output_version_reruns_its_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A code change that alters what a stage writes bumps its number in lungddpm.versions: the next run reruns
    that stage (here the split, bumped by a sitecustomize in Snakemake's process), named for its params."""
    workdir, _ = _images_workdir(tmp_path, monkeypatch)
    snakemake(workdir, "results/splits.csv")
    assert "Nothing to be done" in snakemake(workdir, "-n", "results/splits.csv").stdout
    bump = tmp_path / "bump"
    bump.mkdir()
    (bump / "sitecustomize.py").write_text("import lungddpm.versions as v\nv.OUTPUT_VERSIONS['split'] += 1\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(bump), os.environ.get("PYTHONPATH")])))
    dry = snakemake(workdir, "-n", "results/splits.csv").stdout
    assert "rule split:" in dry and "reason: Params have changed since last execution" in dry, dry


def test_a_given_checkpoint_is_sampled_without_training_the_whole_volume_model(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    checkpoint = tmp_path / "external.pt"
    checkpoint.write_bytes(b"")  # an input of the sample jobs; a dry run never reads it

    def scheduled(*config: str) -> set[str]:
        out = snakemake(workdir, "-n", "--quiet", "rules", *config).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip() and line.split()[-1].isdigit()}

    assert {"train", "sample", "report"} <= scheduled()
    given = scheduled("--config", f"sample={{checkpoint: {checkpoint}}}")
    assert "train" not in given and {"sample", "report"} <= given
    imported = workdir / "results/models/lung-ddpm/checkpoint.pt"  # where `lungddpm import-lungddpm` suggests
    imported.parent.mkdir(parents=True)
    imported.write_bytes(b"")
    given = scheduled("--config", "sample={checkpoint: results/models/lung-ddpm/checkpoint.pt}")
    assert "train" not in given and {"sample", "report"} <= given  # before: a train job that overwrote it


def test_a_key_added_at_its_old_behaviour_reruns_nothing(tmp_path: Path) -> None:
    """sample.timestep_spacing arrived after workdirs existed: at its default (what sampling did before it) it is
    not in the sampling rules' params, so its arrival reruns no sampling; another value does."""
    workdir = make_workdir(tmp_path)
    rules = ("sample:run=eval,shard=0", "synthesize_lesion:shard=0", "lesion_texture")
    base = rule_params(workdir, {}, *rules)
    assert not any("timestep_spacing" in v for r in rules for v in base[r].values())
    quad = rule_params(workdir, {"sample": {"timestep_spacing": "quadratic"},
                                 "lesion": {"sample": {"timestep_spacing": "quadratic"}}}, *rules)  # fmt: skip
    assert all(quad[r] != base[r] for r in rules)


def test_the_feature_preprocessing_key_reruns_the_metrics_only_away_from_its_old_behaviour(tmp_path: Path) -> None:
    """metrics.features.preprocessing arrived after workdirs existed: at lungddpm (what was done before it) it is not
    in the metrics rule's params, so a finished workdir reruns nothing; hagan reruns the metrics."""
    workdir = make_workdir(tmp_path)
    base = rule_params(workdir, {}, "metrics")
    assert "'features'" in base["metrics"]["settings"] and "preprocessing" not in base["metrics"]["settings"]
    hagan = rule_params(workdir, {"metrics": {"features": {"preprocessing": "hagan"}}}, "metrics")
    assert "'preprocessing': 'hagan'" in hagan["metrics"]["settings"]
    # where the feature network runs is how, not what (as segmentation.device): it reran the metrics; so is the
    # random network's seed under astra (it reran them too)
    assert rule_params(workdir, {"metrics": {"features": {"device": "cpu", "seed": 5}}}, "metrics") == base
    random = {"metrics": {"features": {"extractor": "random"}}}
    assert rule_params(workdir, random, "metrics") != rule_params(workdir, {"metrics": {"features": {
        "extractor": "random", "seed": 5}}}, "metrics")  # fmt: skip


def test_the_medicalnet_weight_file_is_an_input_of_the_metrics(tmp_path: Path) -> None:
    """A weight file replaced at the same path must rerun the metrics (its features change): it is declared."""
    workdir = make_workdir(tmp_path, {"metrics": {"features": {"extractor": "medicalnet", "weights": "w.pth"}}})
    dry = snakemake(workdir, "-n", "results/metrics/eval/image_quality.csv", check=False)
    assert dry.returncode != 0 and "Missing input files for rule metrics" in dry.stdout + dry.stderr
    (workdir / "w.pth").write_bytes(b"weights")
    dry = snakemake(workdir, "-n", "--forceall", "results/metrics/eval/image_quality.csv")
    assert dry.returncode == 0 and "rule metrics" in dry.stdout


def test_an_invalid_config_names_its_files_in_merge_order(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path, {"sample": {"stpes": 3}})
    dry = snakemake(workdir, "-n", "--config", "train={steps: 5}", check=False)
    assert dry.returncode != 0
    out = dry.stdout + dry.stderr
    assert f"snakemake config (config/config.yaml, then {workdir / 'ci.yaml'}, then --config): invalid" in out
    assert "sample: Additional properties are not allowed ('stpes' was unexpected)" in out


def test_a_demo_case_is_written_again_only_when_what_shapes_it_changes(tmp_path: Path) -> None:
    """demo_dicom's params: not demo.n_scans (which cases there are; before, a new one rewrote every phantom and
    reran every case after it), but the noise and the seed (a case's own draws come from the seed and its id)."""
    workdir = make_workdir(tmp_path)
    rule = "demo_dicom:case=LIDC-IDRI-0078"
    base = rule_params(workdir, {}, rule)
    assert rule_params(workdir, {"data": {"demo": {"n_scans": 5}}}, rule) == base
    assert rule_params(workdir, {"data": {"demo": {"noise_hu": 5}}}, rule) != base
    # nor which cases are chosen (the split's case list says it), nor another source's keys, nor data.min_readers
    # (every reader's nodule is painted); each reran every case, and the split, with the case list unchanged
    rules = (rule, "preprocess:case=LIDC-IDRI-0078", "split")
    base = rule_params(workdir, {}, *rules)
    quiet = {"demo": {"min_nodule_diameter_mm": 9, "min_readers": 2, "max_slices": 250},
             "images": {"label_convention": "binary", "patient_regex": "(.*)"}}  # fmt: skip
    assert rule_params(workdir, {"data": quiet}, *rules) == base
    readers = rule_params(workdir, {"data": {"min_readers": 2}}, *rules)
    assert readers[rule] == base[rule] and readers["preprocess:case=LIDC-IDRI-0078"] != base[rules[1]]


def test_check_only_and_how_it_runs_keys_rerun_nothing(tmp_path: Path) -> None:
    """Keys that only refuse input (a layout's sanity limits, data.images.max_air_nodule_ml) or change how a job runs
    (train.processes) are no rule's params: each reran the layouts or the training and all after them; the texture
    check reads neither the run's texture nor its samples per case. What shapes them still reruns them."""
    workdir = make_workdir(tmp_path)
    rules = ("layout:case=LIDC-IDRI-0078", "train:name=ci", "lesion_texture", "preprocess:case=LIDC-IDRI-0078", "split")
    base = rule_params(workdir, {}, *rules)
    quiet = {"layout": {"min_side_fraction": 0.05, "max_lung_ml": 20000}, "train": {"processes": 2},
             "data": {"images": {"max_air_nodule_ml": 300}},
             "lesion": {"insert": {"samples_per_case": 2, "texture": "solid", "feather_mm": 1.25}}}  # fmt: skip
    assert rule_params(workdir, quiet, *rules) == base  # the texture check pastes nothing back: not feather_mm
    assert not any("max_air_nodule_ml" in v or "dicom_root" in v for r in rules for v in base[r].values())
    shaping = rule_params(workdir, {"train": {"lr": 1e-3}, "lesion": {"insert": {"margin_mm": 6.0}}}, *rules)
    assert shaping["train:name=ci"] != base["train:name=ci"] and shaping["lesion_texture"] != base["lesion_texture"]


def test_an_import_reruns_on_what_it_reads_only(tmp_path: Path) -> None:
    """import_checkpoint reads init_convention and model.num_heads / norm_groups; the other model keys are the file's
    (a warning says where they differ), yet editing one reran the import and everything sampled after it."""
    workdir = make_workdir(tmp_path)
    (workdir / "released.pt").write_bytes(b"not read when parsing")
    given = {"model": {"init_from": "released.pt"}, "train": {"name": "imp"}}
    rule = "import_checkpoint:name=imp"
    base = rule_params(workdir, given, rule)
    wider = rule_params(workdir, {**given, "model": {"init_from": "released.pt", "model_channels": 16}}, rule)
    heads = rule_params(workdir, {**given, "model": {"init_from": "released.pt", "num_heads": 2}}, rule)
    assert wider == base and heads != base
