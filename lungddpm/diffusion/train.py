"""The training loop: cached data, deterministic batches, AdamW, EMA, mixed precision, DDP, checkpoints.

Determinism: the t-th optimizer step draws its global batch — which case, timestep and noise for global sample
``j`` — from seeds derived from ``(train.seed, step, j)`` only. Hence a resumed run sees exactly the batches an
uninterrupted run sees, and ``torchrun --nproc_per_node N`` with batch ``b`` follows the same trajectory as one
process with batch ``N * b``: rank ``r`` takes its slice of the same global batch.

Resumable state lives in ``state/models/<name>/`` (no rule declares it): ``step_XXXXXXX.pt`` checkpoints
(written atomically, loadable with ``weights_only=True``: model, EMA, optimizer, scaler, step, RNG states as
tensors, config, version) and ``train_log.csv``. The declared outputs — ``checkpoint.pt`` last — are written at
the end.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import Config, TrainConfig
from ..errors import LungDDPMError
from ..faults import kill_point
from ..intensity import ANY_TEXTURE, hu_to_model, layout_to_channels, model_to_hu
from ..io import atomic_path
from ..layout import read_case_pair
from .checkpoint import CheckpointError, load_checkpoint, resolve_precision
from .process import DiffusionConfig, GaussianDiffusion
from .unet import UNet3D, count_parameters, unet_config_from_dict

log = logging.getLogger(__name__)

LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "seconds", "samples_per_s")
CKPT_KEYS = {"model", "ema", "optimizer", "scaler", "step", "rng_cpu", "rng_cuda", "fingerprint", "config", "version"}


class TrainingDivergedError(LungDDPMError):
    """The loss or the gradient norm became NaN or infinite."""


# ------------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class TrainData:
    """Training volumes cached in memory."""

    images: torch.Tensor  # [N, 1, D, H, W] in [-1, 1]
    layouts: torch.Tensor  # [N, 2, D, H, W] in {-1, 1} (lesion scale: the nodule channel at texture levels)
    case_ids: tuple[str, ...]
    weights: torch.Tensor | None = None  # [N, 1, D, H, W] lesion-focused loss weights, or None (uniform)
    groups: tuple[str, ...] | None = None  # per sample: texture class or 'free' (train.balance_textures)


def load_training_data(
    ct_paths: Sequence[Path], layout_paths: Sequence[Path], hu_window: tuple[float, float], multiple: int
) -> TrainData:
    """Read preprocessed CTs and their layouts (each pair on the same grid, every grid the same shape)."""
    if not ct_paths:
        raise LungDDPMError("no training cases: the train split is empty (check split.* and data.*)")
    images, layouts, ids = [], [], []
    shape = None
    for ct_path, layout_path in zip(ct_paths, layout_paths, strict=True):
        hu, lay, _ = read_case_pair(ct_path, layout_path)
        if shape is None:
            shape = hu.shape
            if any(s % multiple for s in shape):
                raise LungDDPMError(
                    f"{ct_path}: grid {shape} is not a multiple of {multiple} (the UNet halves it "
                    f"{int(np.log2(multiple))} times); change preprocess.size or model.channel_mult"
                )
        elif hu.shape != shape:
            raise LungDDPMError(f"{ct_path}: grid {hu.shape} differs from {shape}; rerun preprocess")
        images.append(hu_to_model(hu, hu_window)[None])
        layouts.append(layout_to_channels(lay, str(layout_path)))
        ids.append(Path(layout_path).name.removesuffix(".nii.gz"))
    return TrainData(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(layouts)), tuple(ids))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset indexed by optimizer step -> this rank's micro-batches for that step."""

    def __init__(
        self,
        data: TrainData,
        seed: int,
        micro: int,
        world: int,
        rank: int,
        accum: int,
        timesteps: int,
        first_step: int,
        last_step: int,
        cond_dropout: float = 0.0,
        flip: bool = False,
        balance: bool = False,
    ) -> None:
        self.data, self.seed, self.micro, self.world, self.rank = data, seed, micro, world, rank
        self.accum, self.timesteps, self.first, self.last = accum, timesteps, first_step, last_step
        self.cond_dropout, self.flip = cond_dropout, flip
        self.probs = None
        if balance and data.groups is not None:  # each group equally often
            groups = np.asarray(data.groups)
            counts = {g: int((groups == g).sum()) for g in set(data.groups)}
            self.probs = np.array([1.0 / (counts[g] * len(counts)) for g in data.groups])

    def __len__(self) -> int:
        return max(self.last - self.first, 0)

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        step = self.first + i + 1  # optimizer steps are numbered from 1
        n = len(self.data.case_ids)
        rng = np.random.default_rng(_seed(self.seed, step))
        if self.probs is None:
            cases = rng.integers(0, n, size=self.global_batch)
        else:
            cases = rng.choice(n, size=self.global_batch, p=self.probs)
        out = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.micro
            idx = list(range(lo, lo + self.micro))
            ts, noises, samples = [], [], []
            for j in idx:
                g = torch.Generator().manual_seed(_seed(self.seed, step, j))
                ts.append(torch.randint(0, self.timesteps, (1,), generator=g))
                noises.append(torch.randn(self.data.images.shape[1:], generator=g))
                samples.append(self._augment(int(cases[j]), g))
            batch = {k: torch.stack([smp[k] for smp in samples]) for k in samples[0]}
            out.append({**batch, "t": torch.cat(ts), "noise": torch.stack(noises)})
        return out

    def _augment(self, case: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """One sample, with the nodule texture dropped to 'any texture' (p = ``cond_dropout``) and random flips;
        the random draws come after the timestep and noise, so they leave those unchanged."""
        d = self.data
        sample = {"x0": d.images[case], "layout": d.layouts[case]}
        if d.weights is not None:
            sample["weight"] = d.weights[case]
        if self.cond_dropout > 0 and float(torch.rand((), generator=g)) < self.cond_dropout:
            lay = sample["layout"].clone()
            lay[1] = torch.where(lay[1] > 0, torch.tensor(ANY_TEXTURE), lay[1])
            sample["layout"] = lay
        if self.flip:
            dims = [a + 1 for a in range(3) if float(torch.rand((), generator=g)) < 0.5]
            if dims:
                sample = {k: v.flip(dims) for k, v in sample.items()}
        return sample


# ------------------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Dist:
    world: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read torchrun's environment; one process without it. GPU if available (one per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(world, rank, local_rank, device)


def _all_mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= dist.world
    return value


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------ checkpoints
def fingerprint(cfg: Config) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: network, process, grid and intensity mapping."""
    return {
        "model": {k: v for k, v in cfg.raw["model"].items() if k != "init_from"},  # init_from skips training
        "diffusion": cfg.raw["diffusion"],
        "size": list(cfg.preprocess.size),
        "hu_window": list(cfg.intensity.hu_window),
    }


def _checkpoints(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("step_*.pt"), reverse=True)


def find_resume_checkpoint(state_dir: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The newest complete checkpoint; truncated or corrupt files are skipped (and reported), never loaded."""
    for path in _checkpoints(state_dir):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as exc:
            log.warning("%s: unreadable checkpoint skipped (%s)", path, exc)
            continue
        if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
            log.warning(
                "%s: incomplete checkpoint skipped (keys %s)",
                path,
                sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__,
            )
            continue
        if ckpt["fingerprint"] != expected:
            raise CheckpointError(
                f"{path}: trained with a different model/diffusion/grid config ({ckpt['fingerprint']} vs {expected}); "
                f"delete {state_dir}, set train.resume: never, or choose a new train.name"
            )
        log.info("resuming from %s (step %d)", path, ckpt["step"])
        return ckpt
    return None


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ------------------------------------------------------------------------------------------------------ helpers
class EMA:
    """Exponential moving average of parameters (buffers copied), with the usual warm-up."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int) -> None:
        decay = min(self.decay, (1 + n_updates) / (10 + n_updates)) if self.warmup else self.decay
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _lr_at(step: int, tc: TrainConfig) -> float:
    if tc.lr_warmup_steps and step <= tc.lr_warmup_steps:
        return tc.lr * step / tc.lr_warmup_steps
    return tc.lr


def build_model(cfg: Config, seed: int) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(unet_config_from_dict(cfg.model, image_size=max(cfg.preprocess.size)))


# ------------------------------------------------------------------------------------------------------ train
@dataclass(frozen=True)
class TrainResult:
    step: int
    final_loss: float
    parameters: int
    seconds: float


def _read_log(path: Path, up_to: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if int(row["step"]) <= up_to]


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
    """A fast DDIM sample of ``layout`` [2, D, H, W] next to it (and the real CT), as a three-plane PNG."""
    from ..intensity import channels_to_layout
    from ..viz import three_plane_png
    from .sample import sample

    was_training = model.training
    model.eval()
    with _autocast(device, dtype):
        x = sample(
            model,
            diffusion,
            layout[None].to(device),
            "ddim",
            cfg.train.preview_sampler_steps,
            torch.Generator().manual_seed(cfg.train.seed),
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
) -> TrainResult:
    """Train (or resume) the model ``cfg.train.name``.

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
    if any(s % model.downsampling for s in data.images.shape[2:]):
        raise LungDDPMError(
            f"grid {tuple(data.images.shape[2:])} is not a multiple of {model.downsampling}; "
            "change preprocess.size or model.channel_mult"
        )
    memory_format = torch.channels_last_3d if tc.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    expected = fingerprint(cfg)

    start = 0
    ckpt = find_resume_checkpoint(state_dir, expected) if tc.resume == "auto" else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"]:
            torch.cuda.set_rng_state_all(list(ckpt["rng_cuda"]))
        start = int(ckpt["step"])
    elif tc.resume == "never" and dist.is_main:
        for old in _checkpoints(state_dir):
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
    )
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
    t_window, loss_window, step = time.perf_counter(), [], start
    final_loss = float("nan")
    for step_batches in loader:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, tc)
        step_loss = torch.zeros((), device=device)
        for m, micro in enumerate(step_batches):
            x0 = micro["x0"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            layout = micro["layout"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            sync = m == len(step_batches) - 1 or dist.world == 1
            ctx = contextlib.nullcontext() if sync else net.no_sync()  # type: ignore[operator]
            with ctx, _autocast(device, dtype):
                weight = micro["weight"].to(device) if "weight" in micro else None
                loss = diffusion.loss(net, x0, layout, micro["t"].to(device), micro["noise"].to(device), weight).mean()
                scaler.scale(loss / tc.grad_accum).backward()
            step_loss += loss.detach() / tc.grad_accum
        mean_loss = _all_mean(step_loss, dist)  # the same on every rank, so every rank stops together
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
        )
        # fp16's GradScaler skips steps with inf gradients by design; otherwise a non-finite value is fatal
        if not torch.isfinite(mean_loss) or (not scaler.is_enabled() and not torch.isfinite(grad_norm)):
            bar.close()
            raise _diverged(step, float(mean_loss), float(grad_norm), state_dir)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step - 1)
        final_loss = float(mean_loss)
        loss_window.append(final_loss)
        bar.update(1)
        if dist.is_main and (step % tc.log_every == 0 or step == tc.steps):
            seconds = (time.perf_counter() - t_window) / len(loss_window)
            log_rows.append(
                {
                    "step": step,
                    "loss": f"{np.mean(loss_window):.6f}",
                    "lr": f"{_lr_at(step, tc):.3e}",
                    "grad_norm": f"{float(grad_norm):.4f}",
                    "seconds": f"{seconds:.3f}",
                    "samples_per_s": f"{batches.global_batch / seconds:.3f}",
                }
            )
            bar.set_postfix(loss=f"{np.mean(loss_window):.4f}")
            t_window, loss_window = time.perf_counter(), []
        if step % tc.checkpoint_every == 0 or step == tc.steps or step == stop_after:
            if dist.is_main:
                _write_log(state_dir / "train_log.csv", log_rows)
                _save_atomic(
                    _state(model, ema, optimizer, scaler, step, cfg, expected, device),
                    state_dir / f"step_{step:07d}.pt",
                )
                for old in _checkpoints(state_dir)[tc.keep_checkpoints :]:
                    old.unlink()
                kill_point("checkpoint", step)
            _barrier(dist)
        if dist.is_main and tc.preview_every and step % tc.preview_every == 0:
            t_preview = time.perf_counter()
            show(state_dir / "previews" / f"step_{step:07d}.png")
            t_window += time.perf_counter() - t_preview  # preview time is not step time
        if step == stop_after:
            bar.close()
            return TrainResult(step, final_loss, n_params, bar.format_dict["elapsed"])
    bar.close()

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_log(state_dir / "train_log.csv", log_rows)
        shutil.copyfile(state_dir / "train_log.csv", out_dir / "train_log.csv.tmp")
        os.replace(out_dir / "train_log.csv.tmp", out_dir / "train_log.csv")
        show(out_dir / "preview.png")
        final = {
            "ema": ema.model.state_dict(),
            "model": model.state_dict(),
            "step": step,
            "unet": asdict(model.cfg),
            "diffusion": dict(cfg.diffusion),
            "hu_window": list(cfg.intensity.hu_window),
            "size": list(cfg.preprocess.size),
            "spacing_mm": list(cfg.preprocess.spacing_mm),
            "config": cfg.raw,
            "version": __version__,
        }
        _save_atomic(final, out_dir / "checkpoint.pt")
        log.info("%s: %d steps, final loss %.4f -> %s", tc.name, step, final_loss, out_dir / "checkpoint.pt")
    _barrier(dist)
    return TrainResult(step, final_loss, n_params, bar.format_dict["elapsed"])


def _diverged(step: int, loss: float, grad_norm: float, state_dir: Path) -> TrainingDivergedError:
    kept = _checkpoints(state_dir)
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
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "fingerprint": expected,
        "config": cfg.raw,
        "version": __version__,
    }


# ------------------------------------------------------------------------------------------------------ entry
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


def run_job(job: dict[str, Any], stop_after: int | None = None) -> TrainResult:
    """Load the cases of ``job`` and train (one process of a torchrun group, or the only one)."""
    from ..config import config_from_mapping, lesion_config

    cfg = config_from_mapping(job["config"])
    if job.get("scale") == "lesion":
        from ..preprocessing.rois import load_roi_training_data

        cfg = lesion_config(cfg)
        data = load_roi_training_data([Path(p) for p in job["train_cts"]], cfg)
        val = load_roi_training_data([Path(p) for p in job["val_cts"]], cfg) if job["val_cts"] else None
        return train(data, cfg, Path(job["out_dir"]), Path(job["state_dir"]), val, job["threads"], stop_after)
    multiple = 2 ** (len(cfg.model["channel_mult"]) - 1)
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
    can see (``CUDA_VISIBLE_DEVICES``, which Slurm and most schedulers set to the job's GPUs) when that is set."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return max(0, int(requested))
    seen = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
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


def launch(job: dict[str, Any], processes: int) -> None:
    """Run ``job`` in this process, or under ``torchrun --standalone`` with ``processes`` ranks (DDP)."""
    if processes == 1:
        run_job(job)
        return
    import json
    import subprocess

    job_path = Path(job["state_dir"]) / "job.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, int(job["threads"]) // processes)))
    cmd = torchrun_command(job_path, processes)
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise LungDDPMError(f"torchrun exited with {proc.returncode}; see the log above ({job_path})")
