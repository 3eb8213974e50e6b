"""The training loop: AdamW, EMA, mixed precision, DDP, resumable checkpoints, divergence handling.

Resumable state lives in ``state/models/<name>/`` (no rule declares it): ``step_XXXXXXX.pt`` checkpoints
(written atomically, loadable with ``weights_only=True``: model, EMA, optimizer, scaler, step, RNG states as
tensors, config, version) and ``train_log.csv``. The declared outputs — ``checkpoint.pt`` last — are written at
the end. Batches come from :mod:`lungddpm.diffusion.data`, checkpoints are read and found by
:mod:`lungddpm.diffusion.checkpoint`, jobs are launched by :mod:`lungddpm.diffusion.jobs`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_path
from ..config import Config, TrainConfig
from ..errors import LungDDPMError
from ..faults import kill_point
from ..io import read_csv
from .checkpoint import (
    check_global_batch,
    check_resume,
    find_resume_checkpoint,
    fingerprint,
    save_atomic,
    step_checkpoints,
)
from .data import StepBatches, TrainData, data_digest
from .distributed import all_mean, barrier, seed_rank, setup_distributed
from .encoding import model_to_hu
from .optim import EMA, apply_update, load_optimizer_state, make_optimizer
from .precision import autocast, checked_cpu_bf16, network_convolutions, resolve_precision
from .process import DiffusionConfig, GaussianDiffusion
from .unet import UNet3D, count_parameters, unet_config_from_dict

log = logging.getLogger(__name__)

LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "seconds", "samples_per_s")


class TrainingDivergedError(LungDDPMError):
    """The loss or the gradient norm became NaN or infinite."""


def _lr_at(step: int, tc: TrainConfig) -> float:
    if tc.lr_warmup_steps and step <= tc.lr_warmup_steps:
        return tc.lr * step / tc.lr_warmup_steps
    return tc.lr


def build_model(cfg: Config, seed: int) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(unet_config_from_dict(cfg.model, image_size=max(cfg.preprocess.size)))


@dataclass(frozen=True)
class TrainResult:
    step: int
    final_loss: float
    parameters: int
    seconds: float


def _read_log(path: Path, up_to: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    return [row for row in read_csv(path) if int(row["step"]) <= up_to]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def preview(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    layout: torch.Tensor,
    reference: torch.Tensor | None,
    cfg: Config,
    path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """A fast DDIM sample of ``layout`` [2, D, H, W] next to it (and the real CT), as a three-plane PNG; with the
    context channels ([4, D, H, W]) the reference is kept outside the generated region."""
    from ..viz import three_plane_png
    from .encoding import channels_to_layout
    from .sample import Blend, sample

    blend = None
    if model.cfg.context and reference is not None:  # inpaint the generated region only
        blend = Blend(reference[None], (layout[-1:] > 0)[None])
    was_training = model.training
    model.eval()
    with autocast(device, dtype):
        x = sample(
            model,
            diffusion,
            layout[None].to(device),
            "ddim",
            cfg.train.preview_sampler_steps,
            torch.Generator().manual_seed(cfg.train.seed),
            blend=blend,
        )
    model.train(was_training)
    window = cfg.intensity.hu_window
    panels = [
        ("layout", channels_to_layout(layout.cpu().numpy()), "layout"),
        ("sample", model_to_hu(x[0, 0].float().cpu().numpy(), window), "hu"),
    ]
    if reference is not None:
        panels.append(("real", model_to_hu(reference[0].cpu().numpy(), window), "hu"))
    three_plane_png(path, panels, spacing=cfg.preprocess.spacing_mm)


def train(
    data: TrainData,
    cfg: Config,
    out_dir: Path,
    state_dir: Path,
    preview_data: TrainData | None = None,
    threads: int | None = None,
    stop_after: int | None = None,
    stage: str = "train",
) -> TrainResult:
    """Train (or resume) the model ``cfg.train.name`` for the workflow stage ``stage`` (``train`` or ``train_lesion``:
    whose :mod:`lungddpm.versions` number a resume compares).

    Declared outputs in ``out_dir``: ``train_log.csv``, ``preview.png`` and, last, ``checkpoint.pt`` (EMA and raw
    weights, configs). ``stop_after`` ends the run right after step ``stop_after`` (and its checkpoint), leaving
    the declared outputs unwritten — for tests and schedulers with time limits.
    """
    tc = cfg.train
    if threads:
        torch.set_num_threads(threads)
    dist = setup_distributed()
    device = dist.device
    dtype = resolve_precision(tc.precision, device)
    state_dir, out_dir = Path(state_dir), Path(out_dir)
    if dist.is_main:
        state_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg, tc.seed).to(device)
    n_params = count_parameters(model)
    diffusion = GaussianDiffusion(DiffusionConfig(**cfg.diffusion))
    if tc.crop % model.downsampling or any(s % model.downsampling for s in data.images.shape[2:]):
        raise LungDDPMError(
            f"grid {tuple(data.images.shape[2:])} or train.crop {tc.crop} is not a multiple of "
            f"{model.downsampling}; change preprocess.size, train.crop or model.channel_mult"
        )
    grid = (tc.crop,) * 3 if tc.crop else tuple(data.images.shape[2:])
    convs = functools.partial(network_convolutions, model, grid, tc.channels_last)  # listed only when probed
    dtype = checked_cpu_bf16(dtype, device, convs, tc.precision)  # the convolutions' bf16 gradients on this CPU
    memory_format = torch.channels_last_3d if tc.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(model.parameters(), tc.lr, tc.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup, tc.ema_every, tc.ema_start)
    expected = fingerprint(cfg, data_digest(data), stage)

    start, carried = 0, []  # carried: the losses of the steps since the last log row, as checkpointed
    keys = "lesion.train" if stage == "train_lesion" else "train"  # what a refusal tells the user to change
    ckpt = find_resume_checkpoint(state_dir, expected, keys) if tc.resume == "auto" else None
    if ckpt is not None:
        check_resume(ckpt, cfg, state_dir, keys)
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        load_optimizer_state(optimizer, ckpt["optimizer"])  # with today's weight decay, betas, fused
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, device)
        start, carried = int(ckpt["step"]), [float(v) for v in ckpt.get("loss_window", [])]
    elif tc.resume == "never" and dist.is_main:
        for old in step_checkpoints(state_dir):
            old.unlink()
    log_rows: list[dict[str, Any]] = _read_log(state_dir / "train_log.csv", start) if dist.is_main else []

    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    batches = StepBatches(
        data,
        tc.seed,
        tc.batch_size,
        dist.world,
        dist.rank,
        tc.grad_accum,
        diffusion.num_timesteps,
        start,
        tc.steps,
        tc.cond_dropout,
        tc.flip,
        tc.balance_textures,
        tc.crop,
    )
    if ckpt is not None and dist.is_main:
        check_global_batch(ckpt, batches.global_batch, tc.steps)
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=tc.num_workers > 0,
        generator=torch.Generator().manual_seed(tc.seed),  # keep the global RNG (dropout) untouched
    )
    if dist.is_main:
        log.info(
            "training %s: %d parameters, %d cases, global batch %d (%d process(es) x %d x %d accum), steps "
            "%d..%d, %s, precision %s",
            tc.name,
            n_params,
            len(data.case_ids),
            batches.global_batch,
            dist.world,
            tc.batch_size,
            tc.grad_accum,
            start + 1,
            tc.steps,
            device,
            "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        )
    preview_src = preview_data if preview_data is not None and preview_data.case_ids else data

    def show(path: Path) -> None:
        preview(ema.model, diffusion, preview_src.layouts[0], preview_src.images[0], cfg, path, device, dtype)

    from tqdm import tqdm

    bar = tqdm(
        total=tc.steps, initial=start, desc=f"train {tc.name}", unit="step", disable=not dist.is_main, mininterval=5.0
    )
    model.train()
    # a resumed window goes on with the losses its checkpoint carried, so each log row averages the same steps as
    # an uninterrupted run's; its time per step counts this process's steps only
    loss_window = [torch.tensor(v, device=device) for v in carried] if dist.is_main else []
    t_window, timed, step = time.perf_counter(), 0, start
    final_loss = float(log_rows[-1]["loss"]) if log_rows else float("nan")  # a finished run resumed: as logged
    last_loss: torch.Tensor | None = None
    for step_batches in loader:
        seed_rank(tc.seed, step, dist)  # ranks past the first: their dropout stream from (seed, step, rank)
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, tc)
        step_loss = torch.zeros((), device=device)
        for m, micro in enumerate(step_batches):
            x0 = micro["x0"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            layout = micro["layout"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            sync = m == len(step_batches) - 1 or dist.world == 1
            ctx = contextlib.nullcontext() if sync else net.no_sync()  # type: ignore[operator]
            with ctx, autocast(device, dtype):
                weight = micro["weight"].to(device) if "weight" in micro else None
                loss = diffusion.loss(net, x0, layout, micro["t"].to(device), micro["noise"].to(device), weight).mean()
                scaler.scale(loss / tc.grad_accum).backward()
            step_loss += loss.detach() / tc.grad_accum
        mean_loss = all_mean(step_loss, dist)  # the same on every rank, so every rank stops together
        stepped, grad_norm = apply_update(model, optimizer, scaler, ema, step - 1, mean_loss, tc.grad_clip)
        if not stepped:
            bar.close()
            raise _diverged(step, float(mean_loss), float(grad_norm), state_dir)
        if dist.is_main:  # tensors: read back only when logged, so the device is not waited on
            loss_window.append(mean_loss)
            timed += 1
        last_loss = mean_loss
        bar.update(1)
        if dist.is_main and (step % tc.log_every == 0 or step == tc.steps):
            seconds = (time.perf_counter() - t_window) / timed
            window_loss = float(torch.stack(loss_window).double().mean())
            log_rows.append(
                {
                    "step": step,
                    "loss": f"{window_loss:.6f}",
                    "lr": f"{_lr_at(step, tc):.3e}",
                    "grad_norm": f"{float(grad_norm):.4f}",
                    "seconds": f"{seconds:.3f}",
                    "samples_per_s": f"{batches.global_batch / seconds:.3f}",
                }
            )
            bar.set_postfix(loss=f"{window_loss:.4f}")
            if step % tc.log_every == 0:  # the last step's row off the cadence keeps its window: a run extended by
                t_window, loss_window, timed = time.perf_counter(), [], 0  # train.steps logs as an unbroken one
        if step % tc.checkpoint_every == 0 or step == tc.steps or step == stop_after:
            t_checkpoint = time.perf_counter()
            if dist.is_main:
                _write_log(state_dir / "train_log.csv", log_rows)
                state = _state(model, ema, optimizer, scaler, step, cfg, expected, device, batches.global_batch)
                state["loss_window"] = [float(v) for v in loss_window]  # the next log row's losses so far
                save_atomic(state, state_dir / f"step_{step:07d}.pt")
                for old in step_checkpoints(state_dir)[tc.keep_checkpoints :]:
                    old.unlink()
                kill_point("checkpoint", step)
            barrier(dist)
            t_window += time.perf_counter() - t_checkpoint  # nor is writing a checkpoint (it slowed the next row)
        if dist.is_main and tc.preview_every and step % tc.preview_every == 0:
            t_preview = time.perf_counter()
            show(state_dir / "previews" / f"step_{step:07d}.png")
            t_window += time.perf_counter() - t_preview  # preview time is not step time
        if step == stop_after:
            bar.close()
            final_loss = float(last_loss)
            return TrainResult(step, final_loss, n_params, bar.format_dict["elapsed"])
    bar.close()
    final_loss = final_loss if last_loss is None else float(last_loss)

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_log(state_dir / "train_log.csv", log_rows)
        with atomic_path(out_dir / "train_log.csv") as tmp:  # a failed copy leaves no partial file
            shutil.copyfile(state_dir / "train_log.csv", tmp)
        show(out_dir / "preview.png")
        final = {
            "ema": ema.model.state_dict(),
            "model": model.state_dict(),
            "step": step,
            "unet": asdict(model.cfg),
            "global_batch": batches.global_batch,  # the ranks come from the job's GPUs; not in the model digest
            "diffusion": dict(cfg.diffusion),
            "hu_window": list(cfg.intensity.hu_window),
            "size": list(cfg.preprocess.size),
            "spacing_mm": list(cfg.preprocess.spacing_mm),
            "config": cfg.raw,
            "version": __version__,
        }
        save_atomic(final, out_dir / "checkpoint.pt")
        log.info("%s: %d steps, final loss %.4f -> %s", tc.name, step, final_loss, out_dir / "checkpoint.pt")
    barrier(dist)
    return TrainResult(step, final_loss, n_params, bar.format_dict["elapsed"])


def restore_rng(ckpt: dict[str, Any], device: torch.device) -> None:
    """Put a checkpoint's RNG states back: the CPU's and, on a GPU, the saved device's state into ``device`` only (an
    older checkpoint's list of every visible GPU's states gives ``device``'s entry, or its first one when it holds
    fewer GPUs than ``device``'s index, e.g. after train.gpus was lowered). A CPU checkpoint leaves the GPU's as is."""
    torch.set_rng_state(ckpt["rng_cpu"])
    saved = ckpt["rng_cuda"]
    if isinstance(saved, list | tuple):  # older checkpoints: every visible GPU's state; CPU ones: empty
        index = device.index or 0
        saved = (saved[index] if index < len(saved) else saved[0]) if saved else None
    if device.type == "cuda" and saved is not None:
        torch.cuda.set_rng_state(saved, device)


def _diverged(step: int, loss: float, grad_norm: float, state_dir: Path) -> TrainingDivergedError:
    kept = step_checkpoints(state_dir)
    last = f"the last good checkpoint {kept[0]} is kept and a rerun resumes from it" if kept else "no checkpoint yet"
    return TrainingDivergedError(
        f"step {step}: loss {loss}, gradient norm {grad_norm} — not finite, so training stopped before this step "
        f"changed the weights; {last}. Lower train.lr, keep train.grad_clip > 0, prefer train.precision fp32 or "
        "bf16 to fp16, and check the training CTs for NaN voxels"
    )


def _state(
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    cfg: Config,
    expected: dict[str, Any],
    device: torch.device,
    global_batch: int,
) -> dict[str, Any]:
    return {
        "global_batch": global_batch,
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else [],  # this device's only
        "fingerprint": expected,
        "config": cfg.raw,
        "version": __version__,
    }
