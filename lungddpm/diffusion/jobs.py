"""Training jobs: the JSON job a (possibly multi-process) run reads, the GPUs and ranks it gets, and the launch
in this process or under ``torchrun --standalone``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import LungDDPMError
from .data import load_training_data
from .train import TrainResult, train
from .unet import downsampling

log = logging.getLogger(__name__)


def make_job(
    cfg: Config,
    train_cts: Sequence[Path],
    train_layouts: Sequence[Path],
    val_cts: Sequence[Path],
    val_layouts: Sequence[Path],
    out_dir: Path,
    state_dir: Path,
    threads: int,
    scale: str = "whole",
) -> dict[str, Any]:
    """Everything a (possibly multi-process) training run needs, as plain JSON-able data. ``scale`` ``lesion``:
    ``train_cts`` / ``val_cts`` are ROI tables (``rois.csv``) and the layouts are unused."""
    return {
        "scale": scale,
        "config": cfg.raw,
        "train_cts": [str(p) for p in train_cts],
        "train_layouts": [str(p) for p in train_layouts],
        "val_cts": [str(p) for p in val_cts],
        "val_layouts": [str(p) for p in val_layouts],
        "out_dir": str(out_dir),
        "state_dir": str(state_dir),
        "threads": threads,
    }


JOB_KEYS = ("config", "train_cts", "train_layouts", "val_cts", "val_layouts", "out_dir", "state_dir", "threads")


def read_job(path: Path) -> dict[str, Any]:
    """The job :func:`make_job` wrote to ``path`` (``lungddpm train-job``'s argument), refused with the file named
    where it is missing, not JSON or lacks a key."""
    import json

    fix = "it is written by `lungddpm train` (or the train rules), which runs it: rerun that"
    try:
        job = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LungDDPMError(f"{path}: not a readable training job ({exc}); {fix}") from exc
    missing = [k for k in JOB_KEYS if k not in job] if isinstance(job, dict) else list(JOB_KEYS)
    if missing:
        raise LungDDPMError(f"{path}: not a training job (missing {', '.join(missing)}); {fix}")
    return job


def run_job(job: dict[str, Any], stop_after: int | None = None) -> TrainResult:
    """Load the cases of ``job`` and train (one process of a torchrun group, or the only one)."""
    from ..config import config_from_mapping, lesion_config

    cfg = config_from_mapping(job["config"])
    if job.get("scale") == "lesion":
        from ..preprocessing.roi_training import load_roi_training_data

        cfg = lesion_config(cfg)
        data = load_roi_training_data([Path(p) for p in job["train_cts"]], cfg)
        val = load_roi_training_data([Path(p) for p in job["val_cts"]], cfg, "val") if job["val_cts"] else None
        return train(
            data, cfg, Path(job["out_dir"]), Path(job["state_dir"]), val, job["threads"], stop_after, "train_lesion"
        )
    multiple = downsampling(cfg.model["channel_mult"])
    data = load_training_data(
        [Path(p) for p in job["train_cts"]], [Path(p) for p in job["train_layouts"]], cfg.intensity.hu_window, multiple
    )
    val = None
    if job["val_cts"]:
        val = load_training_data(
            [Path(p) for p in job["val_cts"]], [Path(p) for p in job["val_layouts"]], cfg.intensity.hu_window, multiple
        )
    return train(data, cfg, Path(job["out_dir"]), Path(job["state_dir"]), val, job["threads"], stop_after)


def job_gpus(requested: int, env: Mapping[str, str] | None = None) -> int:
    """GPUs this job holds: the ``gpu`` resource it was scheduled with (Slurm ``--gpus``), capped by the devices it
    can see: where CUDA is available, the count CUDA itself gives (it reads ``CUDA_VISIBLE_DEVICES``, which Slurm
    and most schedulers set to the job's GPUs, with its own rules: UUIDs, MIG slices, invalid entries); elsewhere
    ``CUDA_VISIBLE_DEVICES`` (of ``env``) up to its first invalid entry, and without it the request stands
    (:func:`launch` refuses to start a job that holds GPUs on a host where CUDA shows none)."""
    import torch

    requested = max(0, int(requested))
    if torch.cuda.is_available():
        present = torch.cuda.device_count()
        if present < requested:
            log.warning("the job requested %d GPU(s) but CUDA shows %d", requested, present)
        return min(requested, present)
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return requested
    entries = [d.strip() for d in visible.split(",")]
    seen = next((i for i, d in enumerate(entries) if not d or d == "-1"), len(entries))  # CUDA reads up to there
    if seen < requested:
        log.warning("the job requested %d GPU(s) but CUDA_VISIBLE_DEVICES=%r shows %d", requested, visible, seen)
    return min(max(0, int(requested)), seen)


def train_processes(configured: int, gpus: int) -> int:
    """torchrun ranks for a training job: ``train.processes`` when set above 1, else one per GPU of the job."""
    if configured > 1:
        if gpus and configured > gpus:
            raise LungDDPMError(
                f"train.processes is {configured} but the job holds {gpus} GPU(s): one process per GPU; lower "
                "train.processes or request more GPUs (train.gpus, or the train rule's gpu resource in the profile)"
            )
        return configured
    return max(1, gpus)


def torchrun_command(job_path: Path, processes: int) -> list[str]:
    """The command that runs ``lungddpm train-job job_path`` as ``processes`` DDP ranks on this node."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "lungddpm.cli",
        "train-job",
        str(job_path),
    ]


def launch_training(job: dict[str, Any], requested_gpus: int, configured_processes: int = 1) -> None:
    """Run a training ``job`` on the GPUs it holds (``requested_gpus``, e.g. its rule's ``gpu`` resource, capped by
    :func:`job_gpus`): one rank per GPU, or ``train.processes`` (:func:`train_processes`); refused by :func:`launch`
    where CUDA shows none of them. The train and train_lesion rules and ``lungddpm train`` go through here."""
    gpus = job_gpus(requested_gpus)
    launch({**job, "gpus": gpus}, train_processes(configured_processes, gpus))


def launch(job: dict[str, Any], processes: int) -> None:
    """Run ``job`` in this process, or under ``torchrun --standalone`` with ``processes`` ranks (DDP). A job holding
    GPUs (its ``gpus``, :func:`job_gpus`) where CUDA shows fewer than its ranks need is refused: its ranks would
    train on the CPU, for days, while the GPUs stay reserved."""
    held = int(job.get("gpus", 0))
    if held:
        import torch

        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen < min(held, processes):
            raise LungDDPMError(
                f"this job holds {held} GPU(s) (its rule's gpu resource, from train.gpus or a profile) for {processes} "
                f"rank(s), but CUDA shows {seen} here (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
                "; check the node's GPU driver and the profile's gpu / gpu_model, or set train.gpus: 0 (in a profile: "
                "the rule's gpu resource) to train on the CPU"
            )
    if processes == 1:
        run_job(job)
        return
    import json
    import subprocess

    job_path = Path(job["state_dir"]) / "job.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    per_rank = max(1, int(job["threads"]) // processes)  # each rank sets torch's threads from its job
    job_path.write_text(json.dumps({**job, "threads": per_rank}, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(per_rank))
    cmd = torchrun_command(job_path, processes)
    log.info("launching %s", " ".join(cmd))
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout or ():  # the ranks' log lines (and errors) into this job's log
            log.info("| %s", line.rstrip())
    if proc.returncode != 0:
        raise LungDDPMError(f"torchrun exited with {proc.returncode}; see the ranks' lines above ({job_path})")
