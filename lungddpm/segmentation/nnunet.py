"""nnU-Net v2 through its Python API, one arm (and seed) per nnU-Net folder tree, each stage in a child process.

nnunetv2 reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` (and its process counts) from the
environment, some of it when first imported. So this module never imports nnunetv2 in the calling process: the
parent writes the raw dataset (plain NIfTI + ``dataset.json``), then runs ``python -m
lungddpm.segmentation.nnunet_stages <stage> <job.json>`` with the arm's paths in the child's environment only, and
streams its output into the log. The child's ``__main__`` guard also keeps nnU-Net's spawned worker pools from
re-running the stage.

Stages (:mod:`.nnunet_stages`): ``plan`` (integrity check, fingerprint, plan, preprocess, the 5 folds) and ``train``
(one fold, then predict the test images). nnU-Net's trees live under ``state/`` (not rule outputs: a rerun resumes
from ``checkpoint_latest.pth`` or reuses ``checkpoint_final.pth`` when the data and settings are unchanged); the rule
outputs are manifests and the test predictions, written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LungDDPMError
from ..io import files_sha256, read_json, read_volume, write_json, write_volume
from ..preprocessing.layout import NODULE, read_case_pair
from ..versions import output_version
from .arms import Arm, SegmentationConfig, check_fold_cases
from .datasets import EvalCase, TrainingCase

log = logging.getLogger(__name__)

DATASET_SUFFIX = "LungNodule"
FILE_ENDING = ".nii.gz"
READER_WRITER = "SimpleITKIO"  # reads spacing, origin and direction from our NIfTI affine
LABELS = {"background": 0, "nodule": 1}


class NnUNetError(LungDDPMError):
    """nnU-Net failed, or produced something that does not match its inputs."""


def dataset_name(dataset_id: int) -> str:
    """nnU-Net's folder name, ``Dataset501_LungNodule``."""
    return f"Dataset{dataset_id:03d}_{DATASET_SUFFIX}"


def tree(state_dir: Path, fold: str | None = None) -> dict[str, Path]:
    """nnU-Net's three roots for one arm and seed (``state_dir``); each fold has its own results root, so that
    folds can train side by side."""
    roots = {"nnUNet_raw": state_dir / "nnUNet_raw", "nnUNet_preprocessed": state_dir / "nnUNet_preprocessed"}
    roots["nnUNet_results"] = state_dir / (f"fold_{fold}" if fold is not None else "plan") / "nnUNet_results"
    return roots


def nnunet_env(roots: Mapping[str, Path], cfg: SegmentationConfig, threads: int) -> dict[str, str]:
    """The child's environment: this process's, plus nnU-Net's paths and process counts (its default DA: <= threads)."""
    env = dict(os.environ)
    env.update({k: str(Path(v).resolve()) for k, v in roots.items()})
    env["nnUNet_def_n_proc"] = str(cfg.workers(threads))
    env["nnUNet_compile"] = "true" if cfg.compile else "false"  # the child forces false on CPU
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA  # 12 (by hostname), capped by the node

    da = cfg.da_processes if cfg.da_processes is not None else min(get_allowed_n_proc_DA(), max(1, threads))
    env["nnUNet_n_proc_DA"] = str(da)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def export_raw_dataset(cases: Sequence[TrainingCase], raw_root: Path, dataset_id: int, nodule_fraction: float) -> Path:
    """Write ``<raw_root>/DatasetXXX_LungNodule/{imagesTr/<id>_0000.nii.gz, labelsTr/<id>.nii.gz, dataset.json}``.

    Images: int16 HU [Z, Y, X] (rounded) with the CT's affine; labels: uint8, 1 where the layout is nodule (2). A
    case with a ``grid`` is resampled onto that CT's grid first (its label by ``nodule_fraction``, :func:`onto_grid`).
    Any previous export is replaced. Returns the dataset folder."""
    from tqdm import tqdm

    folder = raw_root / dataset_name(dataset_id)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    for case in tqdm(cases, desc="nnU-Net raw dataset", unit="case", mininterval=5.0):
        ct, layout, geometry = read_case_pair(case.image, case.layout)
        target = (layout == NODULE).astype(np.uint8)
        if case.grid is not None:
            ct, target, geometry = onto_grid(ct, target, geometry, Path(case.grid), nodule_fraction)
        hu = np.clip(np.rint(ct), -32768, 32767).astype(np.int16)  # 10.7 HU is 11, not 10
        write_volume(folder / "imagesTr" / f"{case.identifier}_0000{FILE_ENDING}", hu, geometry)
        write_volume(folder / "labelsTr" / f"{case.identifier}{FILE_ENDING}", target, geometry)
    write_json(
        folder / "dataset.json",
        {
            "name": DATASET_SUFFIX,
            "description": "lungddpm: lung nodules (layout label 2) on preprocessed chest CT, int16 HU",
            "channel_names": {"0": "CT"},  # nnU-Net's CT normalisation (dataset-wide foreground percentiles)
            "labels": LABELS,
            "numTraining": len(cases),
            "file_ending": FILE_ENDING,
            "overwrite_image_reader_writer": READER_WRITER,
        },
    )
    return folder


def onto_grid(ct: np.ndarray, target: np.ndarray, geometry: Any, grid: Path, fraction: float) -> tuple[Any, Any, Any]:
    """A native CT [Z, Y, X] and its 0/1 target resampled onto the grid of the CT ``grid`` (a model-grid CT of the
    same patient): HU antialiased and linear; the target by the rule of the real cases' nodule labels
    (:func:`..preprocessing.grid.nodule_labels`): a voxel at least ``fraction`` covered by a nodule (each 26-connected
    component of the target), and each nodule's centroid voxel, so small nodules are not lost. Voxels beyond the
    native CT keep the grid CT's values (its ``preprocess.padding_hu``). -> (int16 HU, uint8 0/1, the grid's
    geometry)."""
    from ..data.nodules import components
    from ..preprocessing.grid import SliceGrid, nodule_labels, resample_regular

    ref, ref_geometry = read_volume(grid)
    hu = resample_regular(ct, geometry, ref_geometry, ref.shape, order=1, fill=np.nan)
    hu = np.where(np.isnan(hu), ref, hu)
    nodules = components(target > 0, tuple(float(v) for v in geometry.spacing))
    labels, _ = nodule_labels(nodules, SliceGrid.of_regular(geometry, ct.shape[0]), ref_geometry, ref.shape, fraction)
    return np.rint(hu).astype(np.int16), (labels > 0).astype(np.uint8), ref_geometry


def apply_network(plans: dict[str, Any], configuration: str, network: Mapping[str, int | None]) -> dict[str, Any]:
    """Resize nnU-Net's planned network: ``features_per_stage[i] = min(features_base * 2**i, features_max)``, the
    batch size and the (cubic) training patch, each only where set (None keeps nnU-Net's plan). A patch must be a
    multiple of the network's total stride per axis. Returns the changes made."""
    conf = plans["configurations"][configuration]
    arch = conf["architecture"]["arch_kwargs"]
    changes: dict[str, Any] = {}
    if network.get("patch_size") is not None:
        patch = [int(network["patch_size"])] * len(conf["patch_size"])
        stride = np.prod(np.asarray(arch["strides"]), axis=0).astype(int).tolist()
        if any(p % s for p, s in zip(patch, stride)):
            raise NnUNetError(
                f"segmentation.network.patch_size {patch[0]} is not a multiple of the planned network's total stride "
                f"{stride} (patch {conf['patch_size']}); choose a multiple of {max(stride)}"
            )
        changes["patch_size"] = [conf["patch_size"], patch]
        conf["patch_size"] = patch
    base, top = network.get("features_base"), network.get("features_max")
    if base is not None or top is not None:
        old = list(arch["features_per_stage"])
        base = base if base is not None else old[0]
        top = top if top is not None else max(old)
        arch["features_per_stage"] = [int(min(base * 2**i, top)) for i in range(len(old))]
        changes["features_per_stage"] = [old, arch["features_per_stage"]]
    if network.get("batch_size") is not None:
        changes["batch_size"] = [conf["batch_size"], int(network["batch_size"])]
        conf["batch_size"] = int(network["batch_size"])
    return changes


# ----------------------------------------------------------------------------------------------- parent side
def launch(stage: str, job: dict[str, Any], env: Mapping[str, str], work: Path) -> dict[str, Any]:
    """Run one nnU-Net stage in a child process with ``env``; its output goes line by line into the log.
    Returns the child's result (``<work>/<stage>_result.json``)."""
    work.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str((work / f"{stage}_result.json").resolve())}
    Path(job["result"]).unlink(missing_ok=True)
    job_path = work / f"{stage}_job.json"
    write_json(job_path, job)
    cmd = [sys.executable, "-m", "lungddpm.segmentation.nnunet_stages", stage, str(job_path.resolve())]
    log.info("nnU-Net %s: %s (nnUNet_raw=%s)", stage, " ".join(cmd), env.get("nnUNet_raw"))
    proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                log.info("nnU-Net | %s", line.rstrip())
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if rc != 0:
        raise NnUNetError(
            f"nnU-Net {stage} exited with status {rc} (job {job_path}); its output is in the lines above — fix the "
            "cause and rerun the rule (finished work under the job's state folder is reused)"
        )
    return read_json(job["result"])


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _nnunet_version() -> str:
    try:
        return metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        return "not installed"


def prepare_arm(
    arm: Arm,
    seed: int,
    cases: Sequence[TrainingCase],
    test_cases: Sequence[str],
    state_dir: Path,
    out: Path,
    cfg: SegmentationConfig,
    threads: int,
    patients: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Export the arm's raw dataset (``cases``, see :mod:`.datasets`), then fingerprint, plan and preprocess it
    with nnU-Net, resizing its network as ``segmentation.network`` says; write ``out``.

    test_cases: the test split's cases (never a training case's source). ``out`` (JSON) lists the training cases
    and nnU-Net's plan and is what the training rule depends on. ``patients`` (case -> patient) groups the 5 folds.
    """
    t0 = time.perf_counter()
    leaked = sorted({c.source_case for c in cases} & set(test_cases))
    if leaked:
        raise NnUNetError(f"arm {arm.name}: test cases {leaked} are among the training cases; check the split")
    check_fold_cases(cfg, arm.name, len(cases))
    Path(out).unlink(missing_ok=True)  # the data below is replaced: a stale manifest must not outlive a failed run
    roots = tree(state_dir)
    export_raw_dataset(cases, roots["nnUNet_raw"], cfg.dataset_id, cfg.nodule_fraction)
    name = dataset_name(cfg.dataset_id)
    shutil.rmtree(roots["nnUNet_preprocessed"] / name, ignore_errors=True)
    job = {
        "dataset_id": cfg.dataset_id,
        "configuration": cfg.configuration,
        "planner": cfg.planner,
        "fingerprint_samples": cfg.fingerprint_samples,
        "processes": cfg.workers(threads),
        "threads": threads,
        "groups": {c.identifier: (patients or {}).get(c.source_case, c.source_case) for c in cases},
    }
    result = launch("plan", job, nnunet_env(roots, cfg, threads), state_dir / "plan")
    plans_path = roots["nnUNet_preprocessed"] / name / f"{result['plans_identifier']}.json"
    plans = read_json(plans_path)
    if cfg.configuration not in plans["configurations"]:
        raise NnUNetError(
            f"{plans_path}: nnU-Net's planner made no {cfg.configuration} configuration for these images (it drops "
            f"3d_lowres when the images are small); planned: {sorted(plans['configurations'])} — set "
            "segmentation.configuration to one of them"
        )
    changes = apply_network(plans, cfg.configuration, cfg.network)
    if changes:
        write_json(plans_path, plans)
        log.info("nnU-Net network resized by segmentation.network: %s", changes)
    conf = plans["configurations"][cfg.configuration]
    median = conf.get("median_image_size_in_voxels")
    features = conf["architecture"]["arch_kwargs"]["features_per_stage"]
    log.info("nnU-Net plan %s: patch %s, batch %d, spacing %s, features %s, median image %s", cfg.configuration,
             conf["patch_size"], conf["batch_size"], conf["spacing"], features, median)  # fmt: skip
    exported = sorted(p for d in ("imagesTr", "labelsTr") for p in (roots["nnUNet_raw"] / name / d).iterdir())
    manifest = {
        "arm": arm.name,
        "scale": cfg.scale,
        "seed": seed,
        "real": arm.real,
        "real_fraction": arm.real_fraction,
        "synthetic_fraction": arm.synthetic_fraction,
        "synthetic_source": arm.synthetic_source,
        "n_real": sum(c.kind == "real" for c in cases),
        "n_synthetic": sum(c.kind == "synthetic" for c in cases),
        "cases": [
            {"identifier": c.identifier, "kind": c.kind, "source_case": c.source_case, "image": str(c.image)}
            for c in cases
        ],
        "test_cases": sorted(test_cases),
        "dataset": name,
        "dataset_id": cfg.dataset_id,
        "state_dir": str(state_dir),
        "plans_identifier": result["plans_identifier"],
        "plans_sha256": _digest(plans),
        "data_sha256": _digest([files_sha256(exported), job["groups"]]),  # the exported voxels and the fold groups
        "configuration": cfg.configuration,
        "patch_size": conf["patch_size"],
        "batch_size": conf["batch_size"],
        "spacing": conf["spacing"],
        "features_per_stage": features,
        "median_image_size_in_voxels": median,
        "nnunetv2_version": _nnunet_version(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out, manifest)
    return manifest


def training_settings(cfg: SegmentationConfig) -> dict[str, Any]:
    """What a trained model depends on besides its data (a change retrains from scratch)."""
    return {
        "trainer": cfg.trainer,
        "num_epochs": cfg.num_epochs,
        "iterations_per_epoch": cfg.iterations_per_epoch,
        "val_iterations_per_epoch": cfg.val_iterations_per_epoch,
        "initial_lr": cfg.initial_lr,
        "cpu_precision": cfg.cpu_precision,
    }


def train_arm(
    prepared: Path,
    fold: str,
    tests: Sequence[EvalCase],
    predictions: Path,
    out: Path,
    cfg: SegmentationConfig,
    threads: int,
) -> dict[str, Any]:
    """Train fold ``fold`` of the arm prepared in ``prepared`` (its manifest) and predict every test image.

    predictions: a folder, filled with ``<identifier>.nii.gz`` per test case (uint8 [Z, Y, X], 1 = nodule, the test
    image's exact grid and affine). ``out`` (JSON, written last) records the run: seed, fold, iterations, seconds,
    nnU-Net's last training loss and pseudo Dice, and the prediction paths.
    """
    prep = read_json(prepared)
    leaked = sorted({t.source_case for t in tests} & {c["source_case"] for c in prep["cases"]})
    if leaked:
        raise NnUNetError(f"{prepared}: test cases {leaked} are among the training cases; rerun segment_prepare")
    test_images = {t.identifier: t.image for t in tests}
    state_dir = Path(prep["state_dir"])
    roots = tree(state_dir, fold)
    work = state_dir / f"fold_{fold}"
    raw_dir = work / "predictions"
    shutil.rmtree(raw_dir, ignore_errors=True)
    settings = training_settings(cfg)
    data = [prep[k] for k in ("data_sha256",) if k in prep]  # its voxels (a manifest from before the key: as then)
    version = [v] if (v := output_version("segment_train")) else []  # version 1: the stamp as before versions
    # the voxels' digest stands for the image paths (another --results path reuses the training); the older stamp,
    # of the paths too, is accepted where they are the same
    same = [prep["plans_sha256"], *data, settings, prep["seed"], fold, *version]
    cases = [{k: v for k, v in c.items() if k != "image" or not data} for c in prep["cases"]]
    job = {
        "dataset_id": prep["dataset_id"],
        "plans_identifier": prep["plans_identifier"],
        "configuration": prep["configuration"],
        "fold": fold,
        "seed": prep["seed"],
        "threads": threads,
        "device": cfg.device,
        "checkpoint_every": cfg.checkpoint_every,
        "final_validation": cfg.final_validation,
        "test_time_mirroring": cfg.test_time_mirroring,
        "tile_step_size": cfg.tile_step_size,
        **settings,
        "stamp": _digest([cases, *same]),  # the same -> nnU-Net's checkpoints here are reused or resumed
        "stamp_before": _digest([prep["cases"], *same]),
        "test": {case: str(Path(p).resolve()) for case, p in sorted(test_images.items())},
        "predictions_dir": str(raw_dir.resolve()),
    }
    result = launch("train", job, nnunet_env(roots, cfg, threads), work)
    predictions = Path(predictions)
    predictions.mkdir(parents=True, exist_ok=True)
    paths = {case: predictions / f"{case}{FILE_ENDING}" for case in sorted(test_images)}
    for case, image in sorted(test_images.items()):
        _copy_prediction(raw_dir / f"{case}{FILE_ENDING}", Path(image), paths[case])
    run = {
        "arm": prep["arm"],
        "seed": prep["seed"],
        "fold": fold,
        "n_real": prep["n_real"],
        "n_synthetic": prep["n_synthetic"],
        **settings,
        **{k: result[k] for k in ("trained", "epochs", "iterations", "train_seconds", "predict_seconds", "device")},
        "cpu_autocast": result.get("cpu_autocast"),
        "final_train_loss": result.get("final_train_loss"),
        "ema_pseudo_dice": result.get("ema_pseudo_dice"),
        "test_time_mirroring": cfg.test_time_mirroring,
        "scale": prep.get("scale", "whole"),
        "predictions": {case: str(p) for case, p in paths.items()},
    }
    write_json(out, run)
    it, seconds = result["iterations"], result["train_seconds"]
    done = f"{it} iterations in {seconds:.0f} s" if result["trained"] else "model reused"
    log.info("arm %s seed %s fold %s: %s, %d test case(s) predicted in %.1f s", prep["arm"], prep["seed"], fold, done,
             len(test_images), result["predict_seconds"])  # fmt: skip
    return run


def _copy_prediction(src: Path, ct_path: Path, dst: Path) -> None:
    """nnU-Net's prediction -> ``dst`` (uint8, the CT's geometry), refusing a grid that differs from the CT's."""
    if not src.is_file():
        raise NnUNetError(f"{src}: nnU-Net wrote no prediction for {ct_path}; see its output in the log")
    pred, pg = read_volume(src)
    ct, cg = read_volume(ct_path)
    if pred.shape != ct.shape or not pg.same_grid(cg):
        raise NnUNetError(  # nnU-Net writes a prediction on its input's grid: one that is not is a bug to report
            f"{src}: {pred.shape} at {pg.spacing} mm, origin {pg.origin}, direction {pg.direction}: not the grid of "
            f"its CT {ct_path}, {ct.shape} at {cg.spacing} mm, origin {cg.origin}, direction {cg.direction}; report it"
        )
    labels = set(np.unique(pred).tolist())
    if not labels <= set(LABELS.values()):
        raise NnUNetError(f"{src}: labels {sorted(labels)} in the prediction, expected a subset of {{0, 1}}")
    write_volume(dst, pred.astype(np.uint8), cg)
