"""nnU-Net's stages in the child process (see :mod:`.nnunet`): ``python -m lungddpm.segmentation.nnunet_stages
{plan,train} <job.json>``, run with one arm's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` in the
environment, which nnunetv2 reads when first imported — so only this process ever imports nnunetv2.

``plan``: integrity check, fingerprint, plan, preprocess one configuration, nnU-Net's 5-fold split. ``train``: train
one fold on an instantiated trainer with the configured length (resuming or reusing nnU-Net's checkpoints when the
job's stamp matches), then predict the test images.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.pool
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from ..atomic import atomic_path
from ..io import read_json, write_json, zip_damage
from .nnunet import FILE_ENDING, dataset_name

log = logging.getLogger(__name__)
NNUNET_SPLIT_SEED = 12345  # nnU-Net's do_split seed
_np_core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1.26
# what an nnU-Net checkpoint holds besides tensors and builtins: numpy scalars (its _best_ema, a float32)
NUMPY_SCALARS = [_np_core.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "?"))]


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ThreadPoolContext:
    """multiprocessing's spawn context, but ``Pool`` runs the tasks in threads of this process (see
    :func:`in_process_pools`)."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def Pool(self, processes: int | None = None) -> multiprocessing.pool.ThreadPool:
        return multiprocessing.pool.ThreadPool(processes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


@contextlib.contextmanager
def in_process_pools(processes: int) -> Iterator[None]:
    """With one process (``segmentation.processes: 1``), nnU-Net's worker pools (integrity check, fingerprint,
    preprocessing, validation export: ``multiprocessing.get_context("spawn").Pool(n)``) run in a thread of this
    process: a spawned worker re-imports torch and nnunetv2 (7-8 s of CPU each on 2 cores, three per prepare job) to
    do what one thread does in a fraction of that. Only ``Pool`` is replaced; with more processes, nothing is."""
    if processes != 1:
        yield
        return
    real = multiprocessing.get_context

    def get_context(method: str | None = None) -> Any:
        context = real(method)
        return _ThreadPoolContext(context) if method == "spawn" else context

    multiprocessing.get_context = get_context  # type: ignore[assignment]
    try:
        yield
    finally:
        multiprocessing.get_context = real  # type: ignore[assignment]


def _plan(job: dict[str, Any]) -> dict[str, Any]:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    _planner_class(job["planner"])  # before the fingerprint: a wrong name fails in seconds, naming the key
    samples = job["fingerprint_samples"]

    class Fingerprint(DatasetFingerprintExtractor):  # only its constructor differs: nothing of it is pickled
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if samples is not None:  # nnU-Net draws 1e8 with replacement, ~2 s of CPU per case even at 32^3; it
                # takes samples // cases per case: at least one each (0 left its statistics empty, an IndexError)
                self.num_foreground_voxels_for_intensitystats = max(int(samples), len(self.dataset))

    dataset_id, n = int(job["dataset_id"]), int(job["processes"])
    verify_dataset_integrity(str(Path(os.environ["nnUNet_raw"]) / dataset_name(dataset_id)), n)
    extract_fingerprint_dataset(dataset_id, Fingerprint, n, clean=True, verbose=False, show_progress_bar=False)
    # the planner sets torch's threads to nnUNet_n_proc_DA while sizing the network: 0 (augment in-process) crashes it
    da = os.environ.get("nnUNet_n_proc_DA")
    with _env(nnUNet_n_proc_DA=str(max(1, int(job["threads"])))) if da == "0" else contextlib.nullcontext():
        plans_identifier = plan_experiments([dataset_id], job["planner"])
    configurations = [job["configuration"], *["3d_fullres"] * (job["configuration"] == "3d_lowres")]  # the
    # cascade's next stage: nnU-Net's final validation of a 3d_lowres model reads 3d_fullres's preprocessed data
    preprocess([dataset_id], plans_identifier, configurations, [n] * len(configurations), verbose=False,
               show_progress_bar=False)  # fmt: skip
    _write_splits(dataset_id, job.get("groups"))
    return {"plans_identifier": plans_identifier}


def grouped_splits(groups: dict[str, str], seed: int, n_splits: int = 5) -> list[dict[str, list[str]]] | None:
    """A seeded ``n_splits``-fold split of the identifiers (``groups``: identifier -> its group, the patient of its
    source case) that keeps each group in one fold, so that no validation case shares a patient (a nodule's jittered
    ROIs, a patient's series) with its fold's training cases; None with fewer groups than folds."""
    labels = sorted(set(groups.values()))
    if len(labels) < n_splits:
        return None
    order = np.random.default_rng(seed).permutation(len(labels))
    folds = [{labels[i] for i in chunk} for chunk in np.array_split(order, n_splits)]
    return [{"train": sorted(k for k, g in groups.items() if g not in f),
             "val": sorted(k for k, g in groups.items() if g in f)} for f in folds]  # fmt: skip


def _write_splits(dataset_id: int, groups: dict[str, str] | None = None) -> None:
    """The seeded 5-fold split, written once here (atomically) instead of by the first fold to train: folds of one arm
    train side by side and would race on a half-written ``splits_final.json``. Grouped by patient
    (:func:`grouped_splits`) where ``groups`` names at least 5; else nnU-Net's own split of the identifiers, whose
    validation then shares patients with training (its pseudo-Dice flatters; the test set is never touched)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    labels = Path(os.environ["nnUNet_raw"]) / dataset_name(dataset_id) / "labelsTr"
    identifiers = sorted(p.name.removesuffix(FILE_ENDING) for p in labels.glob(f"*{FILE_ENDING}"))
    if len(identifiers) < 5:  # nnU-Net's 5-fold split needs 5 cases; such arms train fold "all" only
        return
    splits = grouped_splits({i: (groups or {}).get(i, i) for i in identifiers}, NNUNET_SPLIT_SEED) if groups else None
    if splits is None:
        if groups:
            log.warning(
                "%d patients are too few for 5 grouped folds: nnU-Net's own split of %d cases, whose "
                "validation shares patients with training",
                len(set(groups.values())),
                len(identifiers),
            )
        splits = generate_crossval_split(identifiers, seed=NNUNET_SPLIT_SEED, n_splits=5)
    write_json(Path(os.environ["nnUNet_preprocessed"]) / dataset_name(dataset_id) / "splits_final.json", splits)


def _planner_class(name: str) -> type:
    """nnU-Net's experiment planner class ``name`` (nnU-Net's own lookup gives None for an unknown one, and then a
    TypeError deep inside its planning)."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), name,
                                        current_module="nnunetv2.experiment_planning")  # fmt: skip
    if found is None:
        raise ValueError(f"segmentation.planner: {name!r} is no nnU-Net experiment planner (nnunetv2."
                         "experiment_planning); use e.g. ExperimentPlanner or nnUNetPlannerResEncM")  # fmt: skip
    return found


def _trainer_class(name: str) -> type:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if name == nnUNetTrainer.__name__:
        return nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)  # imports every trainer variant (timm, torchvision)


def cpu_autocast_trainer(cls: type, dtype: Any) -> type:
    """``cls`` whose network's forward runs under CPU autocast to ``dtype`` during training, its outputs cast back
    to fp32 for nnU-Net's loss (nnU-Net autocasts on CUDA only). Same name, so nnU-Net's folders do not change."""
    import torch

    class Trainer(cls):  # type: ignore[misc, valid-type]
        def initialize(self) -> None:
            super().initialize()
            forward = self.network.forward

            def autocast_forward(x: torch.Tensor) -> Any:
                with torch.autocast("cpu", dtype=dtype):
                    out = forward(x)
                return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()

            self.network.forward = autocast_forward  # an instance attribute: the state dict is untouched

    Trainer.__name__ = Trainer.__qualname__ = cls.__name__
    return Trainer


def atomic_checkpoint_trainer(cls: type) -> type:
    """``cls`` whose checkpoints are written atomically (:func:`lungddpm.atomic.atomic_path`): nnU-Net's
    ``torch.save`` onto ``checkpoint_final.pth`` / ``checkpoint_latest.pth`` leaves a cut file where a job is killed
    mid-write, which a rerun would take for a finished or resumable training. And read weights-only
    (:func:`lungddpm.diffusion.checkpoint.load_checkpoint`, numpy's scalars allowed): nnU-Net's own ``torch.load``
    unpickles anything, so a checkpoint put into ``state/`` could run code. Same name, so nnU-Net's folders do not
    change."""
    import torch

    class Trainer(cls):  # type: ignore[misc, valid-type]
        def load_checkpoint(self, filename_or_checkpoint: str) -> None:
            from ..diffusion.checkpoint import load_checkpoint

            torch.serialization.add_safe_globals(NUMPY_SCALARS)  # this child's only (safe_globals: torch >= 2.5)
            checkpoint = load_checkpoint(Path(filename_or_checkpoint))
            with mock.patch.object(torch, "load", lambda *a, **k: checkpoint):  # nnU-Net's dict argument is unused
                super().load_checkpoint(str(filename_or_checkpoint))

        def save_checkpoint(self, filename: str) -> None:
            if self.local_rank != 0 or self.disable_checkpointing:  # nnU-Net writes nothing (and says so)
                super().save_checkpoint(filename)
                return
            with atomic_path(filename) as tmp:
                super().save_checkpoint(str(tmp))

    Trainer.__name__ = Trainer.__qualname__ = cls.__name__
    return Trainer


def without_cpu_autocast(network: Any) -> None:
    """Undo :func:`cpu_autocast_trainer`'s wrapper on ``network`` (a no-op on any other): its class's fp32 forward."""
    network.__dict__.pop("forward", None)


def _last(trainer: Any, key: str) -> float | None:
    try:
        return round(float(trainer.logger.get_value(key, step=-1)), 5)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _train(job: dict[str, Any], device: Any) -> dict[str, Any]:
    import random

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from ..diffusion.precision import resolve_precision

    seed = int(job["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    name = dataset_name(int(job["dataset_id"]))
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    results = Path(os.environ["nnUNet_results"])
    cls = _trainer_class(job["trainer"])
    dtype = resolve_precision(job["cpu_precision"], device) if device.type == "cpu" else None
    if dtype is not None:
        cls = cpu_autocast_trainer(cls, dtype)
    cls = atomic_checkpoint_trainer(cls)
    # the settings' digest and what this host made of them (device: auto, cpu_precision: auto): a model trained, or
    # half trained, on another device or precision is neither reported as this one's nor resumed under it
    stamp, stamped = results / "lungddpm_stamp.json", [job["stamp"], device.type, str(dtype)]
    held = read_json(stamp) if stamp.is_file() else None
    if held not in (stamped, [job.get("stamp_before"), device.type, str(dtype)]) and results.exists():
        log.info("data, settings, device or precision changed: discarding %s", results)
        shutil.rmtree(results)
    if held != stamped:
        write_json(stamp, stamped)
    fold: int | str = job["fold"] if job["fold"] == "all" else int(job["fold"])
    fold_dir = results / name / f"{cls.__name__}__{job['plans_identifier']}__{job['configuration']}" / f"fold_{fold}"
    final, latest = fold_dir / "checkpoint_final.pth", fold_dir / "checkpoint_latest.pth"
    for ckpt in (final, latest):  # written by earlier lungddpm atomically, or cut by a kill: never loaded damaged
        if ckpt.is_file() and (damage := zip_damage(ckpt, expect_zip=True)) is not None:
            log.warning("%s: %s; discarded (this fold resumes from an intact checkpoint or trains anew)", ckpt, damage)
            ckpt.unlink()
    plans = load_json(str(pre / f"{job['plans_identifier']}.json"))
    plans["continue_training"] = latest.is_file() and not final.is_file()
    trainer = cls(
        plans=plans,
        configuration=job["configuration"],
        fold=fold,
        dataset_json=load_json(str(pre / "dataset.json")),
        device=device,
    )
    # nnU-Net has no trainer with a configurable length: set it on the instance, before initialize() builds the
    # poly learning-rate schedule from num_epochs
    trainer.num_epochs = int(job["num_epochs"])
    trainer.num_iterations_per_epoch = int(job["iterations_per_epoch"])
    trainer.num_val_iterations_per_epoch = int(job["val_iterations_per_epoch"])
    trainer.initial_lr = float(job["initial_lr"])
    trainer.save_every = int(job["checkpoint_every"])
    t0 = time.perf_counter()
    trained = not final.is_file()
    if not trained:
        log.info("%s: complete for this data and these settings, reused", final)
        trainer.load_checkpoint(str(final))
    else:
        if latest.is_file():
            log.info("resuming from %s", latest)
            trainer.load_checkpoint(str(latest))
        trainer.run_training()
        if job["final_validation"]:
            trainer.perform_actual_validation(False)
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    trainer.set_deep_supervision_enabled(False)
    without_cpu_autocast(trainer.network)  # predict in fp32
    trainer.network.eval()
    net = getattr(trainer.network, "_orig_mod", trainer.network)
    predictor = nnUNetPredictor(
        tile_step_size=float(job["tile_step_size"]),
        use_gaussian=True,
        use_mirroring=bool(job["test_time_mirroring"]),
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        trainer.network,
        trainer.plans_manager,
        trainer.configuration_manager,
        [net.state_dict()],
        trainer.dataset_json,
        cls.__name__,
        trainer.inference_allowed_mirroring_axes,
    )
    out_dir = Path(job["predictions_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = sorted(job["test"])
    predictor.predict_from_files_sequential(
        [[job["test"][c]] for c in cases], [str(out_dir / c) for c in cases], False, True, None
    )
    epochs = int(trainer.current_epoch)
    return {
        "trained": trained,
        "epochs": epochs,
        "iterations": epochs * int(job["iterations_per_epoch"]),
        "train_seconds": round(train_seconds, 1),
        "predict_seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "cpu_autocast": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "final_train_loss": _last(trainer, "train_losses"),
        "ema_pseudo_dice": _last(trainer, "ema_fg_dice"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry: ``python -m lungddpm.segmentation.nnunet_stages {plan,train} <job.json>``."""
    from ..logs import setup_logging

    setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("plan", "train"):
        log.error("usage: python -m lungddpm.segmentation.nnunet_stages {plan,train} <job.json>")
        return 2
    stage, job = args[0], read_json(args[1])
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing or "nnunetv2" in sys.modules:
        log.error("nnU-Net's paths %s must be in the environment before nnunetv2 is imported", missing)
        return 2
    import torch

    threads = max(1, int(job["threads"]))
    torch.set_num_threads(threads)
    result: dict[str, Any]
    try:
        with in_process_pools(int(os.environ.get("nnUNet_def_n_proc", "0"))):  # nnU-Net's pool size (nnunet_env)
            if stage == "plan":
                result = _plan(job)
            else:
                want = job["device"]
                device = torch.device(
                    "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
                )
                if device.type != "cuda":
                    os.environ["nnUNet_compile"] = "false"  # nnU-Net's predictor would compile on any device
                result = _train(job, device)
    except Exception:
        log.exception("nnU-Net %s failed", stage)
        return 1
    write_json(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
