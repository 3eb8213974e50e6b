"""Speed side by side: the original Lung-DDPM network against ours, in one run, per mode (precision, compile).

Both networks get the same random weights (the original's, imported into ours as ``lungddpm import-lungddpm``
does), so the run also checks that they compute the same function. Per (mode, grid, batch): a training step (the
original's loss, Adam and fp32 as its ``train.py``; ours AdamW), a no-grad forward, a DPM-Solver++-20 volume with
anatomically-aware blending (one sampler for both), peak memory, and for compiled modes the largest difference
from eager. GPU: CUDA events after warm-up; batch ``max`` = the largest training batch that fits. CPU: each mode in
its own process, for its own peak RSS. Shapes: images [B, 1, S, S, S], layouts [B, 2, S, S, S] in {-1, 1}, t [B].
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LungDDPMError
from ..io import write_text
from .convert import original_state_to_ours
from .device import pick_device
from .optim import EMA, apply_update, make_optimizer
from .precision import autocast, forward_differences, resolve_precision
from .process import DiffusionConfig, GaussianDiffusion
from .profiling import device_name, largest_batch, peak_memory_mb, profile_tables, reset_peak_memory
from .unet import LUNG_DDPM_TIME_MAX_PERIOD, UNet3D, UNetConfig, count_parameters

log = logging.getLogger(__name__)

FLAGS = ("channels-last", "device-rng", "checkpoint")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
GPU_MODES = ("original:fp32", "original:bf16", "ours:fp32", "ours:bf16", "ours:bf16:default",
             "ours:bf16:reduce-overhead", "ours:bf16:default:device-rng")  # fmt: skip
CPU_MODES = ("original:fp32", "ours:fp32", "ours:bf16")
PAPER_LR = 1e-5  # Lung-DDPM's train.py --train_lr
PAPER_GRAD_CLIP = 1.0  # lungddpm's default train.grad_clip (config/paper.yaml: 0); docs/speed.md
ORIGINAL_EMA_EVERY = 10  # Lung-DDPM's Trainer(update_ema_every=10)
PARITY_SIZE = 32  # the grid of the fp32 parity check of the two networks (on the CPU, before any timing)


@dataclass(frozen=True)
class Mode:
    """One way of running a network: ``network:precision[:compile mode][:flag...]`` (flags: :data:`FLAGS`)."""

    network: str  # original | ours
    precision: str  # fp32 | bf16 (autocast)
    compile: str = "off"  # a torch.compile mode, or off
    channels_last: bool = False
    device_rng: bool = False  # the sampler draws its noise on the device (not seed-identical across devices)
    checkpoint: bool = False  # gradient checkpointing of every block (model.use_checkpoint): memory for time

    @classmethod
    def parse(cls, text: str) -> Mode:
        parts = text.split(":")
        extra = set(parts[2:])
        compiled = [p for p in parts[2:] if p in COMPILE_MODES]
        unknown = extra - set(COMPILE_MODES) - set(FLAGS)
        if len(parts) < 2 or parts[0] not in ("original", "ours") or parts[1] not in ("fp32", "bf16") or unknown:
            raise LungDDPMError(
                f"--modes {text!r}: expected NETWORK:PRECISION[:COMPILE][:FLAG...] with NETWORK original|ours, "
                f"PRECISION fp32|bf16, COMPILE one of {', '.join(COMPILE_MODES)}, FLAG {'|'.join(FLAGS)}"
            )
        if parts[0] == "original" and extra:
            raise LungDDPMError(f"--modes {text!r}: the original network runs as released (only its precision varies)")
        return cls(parts[0], parts[1], compiled[0] if compiled else "off", "channels-last" in extra,
                   "device-rng" in extra, "checkpoint" in extra)  # fmt: skip

    @property
    def label(self) -> str:
        bits = [self.network, self.precision] + ([] if self.compile == "off" else [f"compile={self.compile}"])
        flags = ["channels-last"] * self.channels_last + ["device-rng"] * self.device_rng
        return " ".join(bits + flags + ["checkpoint"] * self.checkpoint)


def load_original(checkout: Path) -> Any:
    """The ``diffusion_model.unet`` module of a Manem-Lab/Lung-DDPM checkout, imported under a private name."""
    unet = checkout / "diffusion_model" / "unet.py"
    if not unet.is_file():
        raise LungDDPMError(
            f"{unet} not found: --lung-ddpm must be a checkout of Manem-Lab/Lung-DDPM (git clone "
            "https://github.com/Manem-Lab/Lung-DDPM into a git-ignored folder such as peers/Lung-DDPM)"
        )
    name = "_lungddpm_original_diffusion_model"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(unet.parent)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{name}.unet")


class OriginalNet(nn.Module):
    """The original network behind our call signature: ``forward(x, t, layout)`` = net(cat([x, layout]), t)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, layout.to(x.dtype)], dim=1), t)


def build_pair(
    checkout: Path, image_size: int, channels: int, seed: int = 0, use_checkpoint: bool = False
) -> tuple[nn.Module, UNet3D]:
    """The original network (its ``create_model`` as its ``train.py`` calls it) with seeded random weights, and
    ours with the same weights (the original's period and attention level)."""
    torch.manual_seed(seed)
    original = load_original(checkout).create_model(image_size, channels, 1, in_channels=3, out_channels=1)
    with torch.no_grad():  # zero-initialised convs (output, attention projection) would make every output 0
        for p in original.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    cfg = UNetConfig(image_size=image_size, model_channels=channels, time_max_period=LUNG_DDPM_TIME_MAX_PERIOD,
                     use_checkpoint=use_checkpoint)  # fmt: skip
    ours = UNet3D(cfg)
    ours.load_state_dict(original_state_to_ours(original.state_dict(), ours, heads=1, where=str(checkout)))
    return OriginalNet(original), ours


def _clock(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds per call of ``fn`` (CUDA events on a GPU, wall clock on the CPU)."""
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


@dataclass(frozen=True)
class Case:
    """What to time: the grid, the batch, repeats and the sampler's steps."""

    size: int
    batch: int
    repeats: int = 5
    warmup: int = 2
    sampler_steps: int = 20
    image_size: int = 128  # the training grid the attention level is relative to (Lung-DDPM: 128)
    channels: int = 64
    guidance: float = 1.0  # != 1: classifier-free guidance, two passes per step (the lesion scale's inpainting)
    profile: str | None = None  # a folder: also write where the time of a step, a forward and a volume goes


def _inputs(case: Case, device: torch.device, fmt: torch.memory_format) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (case.batch, 1, case.size, case.size, case.size)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    layout = torch.rand((case.batch, 2, *shape[2:]), generator=g).round() * 2 - 1
    t = torch.randint(0, 250, (case.batch,), generator=g)
    noise = torch.randn(shape, generator=g)
    out = {"x0": x0, "layout": layout, "t": t, "noise": noise}
    return {k: v.to(device).contiguous(memory_format=fmt) if v.dim() == 5 else v.to(device) for k, v in out.items()}


def run_mode(mode: Mode, checkout: Path, case: Case, threads: int) -> dict[str, Any]:
    """One row: times, peak memory and checks of ``mode`` on ``case`` (batch 0 = the largest that fits, GPU)."""
    from .sample import Blend, sample

    torch.set_num_threads(threads)
    device = pick_device()
    dtype = resolve_precision(mode.precision, device)
    original, ours = build_pair(checkout, case.image_size, case.channels, use_checkpoint=mode.checkpoint)
    eager = (original if mode.network == "original" else ours).to(device)
    fmt = torch.channels_last_3d if mode.channels_last else torch.contiguous_format
    eager = eager.to(memory_format=fmt)
    net = eager if mode.compile == "off" else torch.compile(eager, mode=mode.compile)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=250, schedule="cosine", prediction="epsilon", loss="l1"))
    row: dict[str, Any] = {"mode": mode.label, "device": device_name(device, threads), "size": case.size,
                           "parameters": count_parameters(eager)}  # fmt: skip
    requested = case.batch or "max"
    if case.batch == 0 and device.type != "cuda":
        raise LungDDPMError("speed: batch max (the largest that fits) needs a GPU; give a number on the CPU")
    if case.batch == 0:
        case = replace(case, batch=largest_batch(lambda b: _train_step(mode, net, eager, diffusion,
                       _inputs(replace(case, batch=b), device, fmt), device, dtype)[0]))  # fmt: skip
    row["batch"], row["requested_batch"] = case.batch, requested
    data = _inputs(case, device, fmt)
    if mode.compile != "off":  # on the initial weights, before any optimizer step can have changed them
        inputs = (data["x0"], data["t"], data["layout"])
        row |= forward_differences(eager.eval(), net, inputs, device, dtype)  # within the precision's own error?
    step, stepped = _train_step(mode, net, eager, diffusion, data, device, dtype)
    t0, profiled = time.perf_counter(), ""
    try:
        for _ in range(case.warmup):
            step()
        reset_peak_memory(device)
        row["train_step_s"] = round(_clock(device, step, case.repeats), 4)
        row["peak_train_mb"] = round(peak_memory_mb(device), 1)
        row["weights_finite"] = all(stepped) and all(bool(torch.isfinite(p).all()) for p in eager.parameters())
        profiled = profile_tables({"train step": step}, device) if case.profile else ""
    except RuntimeError as e:  # e.g. the original's attention under autocast: its own gradient checkpoint
        if mode.network != "original":  # recomputes outside autocast and fails (a bf16 input, fp32 weights)
            raise
        row["train_step_s"] = row["peak_train_mb"] = None
        row["train_error"] = str(e).splitlines()[0][:200]
        log.warning("speed: %s: the training step fails: %s", mode.label, row["train_error"])
    del step  # the optimizer's state and the gradients are not part of the inference rows' peaks
    eager.zero_grad(set_to_none=True)
    net.eval()

    def forward() -> torch.Tensor:
        with torch.no_grad(), autocast(device, dtype):
            return net(data["x0"], data["t"], data["layout"])

    for _ in range(case.warmup):
        forward()
    row["forward_s"] = round(_clock(device, forward, case.repeats), 4)
    row["forward_finite"] = bool(torch.isfinite(forward()).all())
    keep = torch.zeros_like(data["x0"], dtype=torch.bool)
    keep[..., : case.size // 4] = True  # a kept reference beside the lungs, as anatomically-aware sampling keeps
    blend = Blend(data["x0"], keep)
    uncond = data["layout"].clone()
    uncond[:, 1] = -1.0  # another condition of the same cost (the guided pass of the lesion scale)

    def volume() -> None:
        gens = [torch.Generator(device if mode.device_rng else "cpu").manual_seed(i) for i in range(case.batch)]
        sample(net, diffusion, data["layout"], "dpm++", case.sampler_steps, gens, blend=blend, autocast_dtype=dtype,
               guidance=case.guidance, uncond_layout=uncond)  # fmt: skip

    if mode.compile != "off" or device.type == "cuda":  # (on the CPU the forwards above warmed it up)
        volume()
    peak_kind = reset_peak_memory(device)
    row["sampler_steps"], row["guidance"] = case.sampler_steps, case.guidance
    row["sample_volume_s"] = round(_clock(device, volume, max(1, case.repeats // 2)) / case.batch, 4)
    row["peak_sample_mb"] = round(peak_memory_mb(device), 1)
    row["warmup_s"] = round(time.perf_counter() - t0, 1)
    row["peak_memory_kind"] = peak_kind
    if case.profile:  # after the timings, which it does not touch
        calls = {"forward": forward, f"DPM-Solver++-{case.sampler_steps} batch": volume}
        name = f"{mode.label.replace(' ', '_').replace('=', '-')}_{case.size}_{case.batch}.txt"
        write_text(Path(case.profile) / name, profiled + profile_tables(calls, device))
    return row


def _train_step(
    mode: Mode,
    net: nn.Module,
    eager: nn.Module,
    diffusion: GaussianDiffusion,
    data: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[Callable[[], None], list[bool]]:
    """One training step as each code base trains, and whether each step was finite. The original: Adam, its
    ``loss.item()`` and its EMA every 10th step (its Trainer). Ours: the training loop's update (:func:`optim.
    apply_update`: fused AdamW on a GPU, clipping at 1, the finite check, EMA every step; not finite: skipped)."""
    net.train()
    stepped: list[bool] = []
    if mode.network == "original":
        opt: torch.optim.Optimizer = torch.optim.Adam(eager.parameters(), lr=PAPER_LR)
        ema_model = copy.deepcopy(eager).requires_grad_(False)

        def original_step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(device, dtype):  # both: L1 between the drawn noise and the predicted noise (ε)
                loss = diffusion.loss(net, data["x0"], data["layout"], data["t"], data["noise"]).mean()
            stepped.append(bool(torch.isfinite(loss)))  # its loss.item(): a wait on the device
            loss.backward()
            opt.step()
            if len(stepped) % ORIGINAL_EMA_EVERY == 0:  # its EMA, one parameter tensor at a time
                for e, p in zip(ema_model.parameters(), eager.parameters()):
                    e.data = e.data * 0.995 + 0.005 * p.data

        return original_step, stepped
    opt = make_optimizer(eager.parameters(), PAPER_LR, 0.0, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    ema = EMA(eager, 0.995, warmup=True)

    def step() -> None:
        with autocast(device, dtype):
            loss = diffusion.loss(net, data["x0"], data["layout"], data["t"], data["noise"]).mean()
        loss.backward()
        stepped.append(apply_update(eager, opt, scaler, ema, 0, loss.detach(), PAPER_GRAD_CLIP)[0])

    return step, stepped


def bench_speed(
    checkout: Path, modes: Sequence[Mode], cases: Sequence[Case], threads: int, isolate: bool | None = None,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (case, mode) row, handed to ``on_row`` (the rows so far) as each finishes; ``isolate`` (default: on
    the CPU) runs each in a fresh process for its own peak RSS."""
    load_original(checkout)  # fail before any timing
    isolate = not torch.cuda.is_available() if isolate is None else isolate
    rows = []
    for case in cases:
        for mode in modes:
            log.info("speed: %s at %d³, batch %s", mode.label, case.size, case.batch or "max")
            if isolate:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    row = pool.submit(run_mode, mode, checkout, case, threads).result()
            else:
                row = run_mode(mode, checkout, case, threads)
                torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
            log.info("speed: %s", row)
            rows.append(row)
            if on_row:
                on_row(rows)
    return rows


def merge_rows(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` without the rows ``new`` measures again (mode, grid, requested batch, guidance), then ``new``."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["mode"], r["size"], r.get("requested_batch", r["batch"]), r.get("guidance", 1.0)

    again = {key(r) for r in new}
    return [r for r in old if key(r) not in again] + list(new)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (seconds; MB; a compiled mode's largest difference from its eager forward, and
    both against fp32)."""
    steps = sorted({r["sampler_steps"] for r in rows})
    head = ["grid", "batch", "mode", "train step s", "forward s", f"DPM-Solver++-{'/'.join(map(str, steps))} s/volume",
            "peak train MB", "peak sample MB", "compiled vs eager", "vs fp32: eager / compiled"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    keys = ("train_step_s", "forward_s", "sample_volume_s", "peak_train_mb", "peak_sample_mb")
    for r in rows:
        diff = r.get("max_rel_diff_vs_eager")
        mode = r["mode"] + (f", guidance {r['guidance']:g}" if r.get("guidance", 1.0) != 1.0 else "")
        mode += "" if r.get("weights_finite", True) and r.get("forward_finite", True) else " (NOT FINITE)"
        values = ["fails" if r[k] is None else r[k] for k in keys]
        low, comp = r.get("eager_vs_fp32"), r.get("compiled_vs_fp32")
        vs32 = "" if low is None else f"{low:.1e} / {comp:.1e}"
        cells = [f"{r['size']}³", r["batch"], mode, *values, "" if diff is None else f"{diff:.1e}", vs32]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def parity(checkout: Path, size: int, channels: int, image_size: int = 128) -> float:
    """Largest relative difference between the original's and our fp32 forward with the same weights (CPU)."""
    original, ours = build_pair(checkout, image_size, channels)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, size, size, size, generator=g)
    layout = torch.randn(1, 2, size, size, size, generator=g).sign()
    t = torch.tensor([100])
    with torch.no_grad():
        a, b = original.eval()(x, t, layout), ours.eval()(x, t, layout)
    return float((a - b).abs().max() / a.abs().max())


def speed_entry(args: Any) -> list[dict[str, Any]]:
    """``lungddpm bench speed``: the rows, the table on stdout, and both under ``--out`` (a folder) when given."""
    from ..io import read_json, write_json

    checkout = Path(args.lung_ddpm)
    default = GPU_MODES if torch.cuda.is_available() else CPU_MODES
    modes = [Mode.parse(m) for m in (args.modes or default)]
    batches = list(args.batch_sizes)  # 0: the largest that fits
    profile = str(Path(args.out or ".") / "profile") if args.profile else None
    cases = [Case(size=s, batch=b, repeats=args.steps, sampler_steps=args.sampler_steps, channels=args.channels,
                  guidance=args.guidance, profile=profile) for s in args.sizes for b in batches]  # fmt: skip
    size = min(PARITY_SIZE, *args.sizes)  # the same function at every grid: checked where the CPU is quick
    diff = parity(checkout, size, args.channels)
    log.info("speed: original vs ours, same weights, fp32 forward at %d³: max relative difference %.1e", size, diff)
    out = Path(args.out) if args.out else None
    old = read_json(out / "speed.json")["rows"] if out and (out / "speed.json").is_file() else []

    def save(rows: list[dict[str, Any]]) -> None:  # after every row: a run cut short keeps what it measured
        merged = merge_rows(old, rows)
        write_json(out / "speed.json", {"parity_max_rel_diff": diff, "torch": torch.__version__, "rows": merged})
        write_text(out / "speed.md", markdown_table(merged))

    rows = bench_speed(checkout, modes, cases, args.threads, on_row=save if out else None)
    print(markdown_table(rows), flush=True)
    return rows
