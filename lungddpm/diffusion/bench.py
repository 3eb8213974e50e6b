"""``lungddpm bench``: training step time and peak memory, seconds per volume or inpainted nodule, sampler quality."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import ConfigError, LungDDPMError
from .device import pick_device
from .optim import EMA, apply_update, make_optimizer
from .precision import autocast, resolve_precision
from .process import DiffusionConfig, GaussianDiffusion
from .profiling import device_name, peak_memory_mb, reset_peak_memory
from .unet import UNet3D, count_parameters, downsampling, unet_config_from_dict

DEFAULT_SIZE = 64  # `lungddpm bench train / sample`'s grid edge without --size (the lesion scale: its ROI's)


def _setup(
    cfg: Config, precision: str, channels_last: bool, threads: int, image_size: int | None
) -> tuple[torch.device, torch.dtype | None, UNet3D, torch.memory_format]:
    """Threads, device, autocast dtype and a seeded network in the requested memory format."""
    torch.set_num_threads(threads)
    device = pick_device()
    dtype = resolve_precision(precision, device)
    torch.manual_seed(0)
    model = UNet3D(unet_config_from_dict(cfg.model, image_size=image_size or max(cfg.preprocess.size))).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return device, dtype, model.to(memory_format=fmt), fmt


def bench_train(
    cfg: Config,
    size: int,
    batch: int,
    precision: str,
    compiled: bool,
    channels_last: bool,
    steps: int,
    threads: int,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Time ``steps`` training steps (after a warm-up) of the config's network on random [batch, 1, size³] data.

    ``image_size`` places the attention levels (default: the config's grid); Lung-DDPM's network is built for
    128, so at any input size it attends at 1/8 of the input's edge.
    """
    device, dtype, model, fmt = _setup(cfg, precision, channels_last, threads, image_size)
    net = torch.compile(model) if compiled else model
    diffusion = GaussianDiffusion(DiffusionConfig(**cfg.diffusion))
    tc = cfg.train
    opt = make_optimizer(model.parameters(), tc.lr, tc.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    x0 = (torch.rand(batch, 1, size, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    channels = model.cfg.layout_channels  # 2, or 4 with a context model's known image and keep mask
    layout = torch.rand(batch, channels, size, size, size, device=device).round() * 2 - 1
    layout = layout.contiguous(memory_format=fmt)
    noise = torch.randn_like(x0)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    skipped = [0]  # timed steps whose update the finite check skipped (no AdamW, no EMA: a faster, wrong step)

    def train_step() -> None:  # the training loop's update: clipping, the finite check, AdamW, EMA
        with autocast(device, dtype):
            loss = diffusion.loss(net, x0, layout, t, noise).mean()
        scaler.scale(loss).backward()
        skipped[0] += not apply_update(model, opt, scaler, ema, 0, loss.detach(), tc.grad_clip)[0]

    def forward() -> None:
        with torch.no_grad(), autocast(device, dtype):
            net(x0, t, layout)

    t_compile = time.perf_counter()
    train_step()
    forward()
    sync()
    warmup_s = time.perf_counter() - t_compile
    peak_kind = reset_peak_memory(device)
    skipped[0] = 0
    timings = {}
    for name, fn in (("train_step_s", train_step), ("forward_s", forward)):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        timings[name] = (time.perf_counter() - t0) / steps
    peak = peak_memory_mb(device)
    return {
        "device": device_name(device, threads),
        "parameters": count_parameters(model),
        "size": size,
        "batch": batch,
        "precision": "fp32" if dtype is None else precision,
        "compiled": compiled,
        "channels_last": channels_last,
        "train_step_s": round(timings["train_step_s"], 4),
        "forward_s": round(timings["forward_s"], 4),
        "samples_per_s": round(batch / timings["train_step_s"], 4),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "updates_skipped": skipped[0],  # of the steps timed: > 0, a non-finite step (see docs: Mixed precision)
        "warmup_s": round(warmup_s, 1),
    }


def bench_sample(
    cfg: Config,
    size: int,
    specs: list[tuple[str, int]],
    precision: str,
    channels_last: bool,
    threads: int,
    image_size: int | None = None,
) -> list[dict[str, Any]]:
    """Seconds per volume and peak memory for each (sampler, steps) with anatomically-aware blending on."""
    from .sample import Blend, sample

    device, dtype, model, fmt = _setup(cfg, precision, channels_last, threads, image_size)
    model = model.eval()
    diffusion = GaussianDiffusion(DiffusionConfig(**cfg.diffusion))
    layout = (torch.rand(1, 2, size, size, size, device=device).round() * 2 - 1).contiguous(memory_format=fmt)
    keep = torch.zeros(1, 1, size, size, size, dtype=torch.bool)
    keep[..., : size // 4] = True
    blend = Blend(torch.zeros(1, 1, size, size, size), keep)
    sample(model, diffusion, layout, "ddim", 1, torch.Generator().manual_seed(0), blend=blend, autocast_dtype=dtype)
    out = []
    for name, steps in specs:
        peak_kind = reset_peak_memory(device)
        t0 = time.perf_counter()
        sample(
            model, diffusion, layout, name, steps, torch.Generator().manual_seed(0), blend=blend, autocast_dtype=dtype
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = peak_memory_mb(device)
        out.append(
            {
                "device": device_name(device, threads),
                "parameters": count_parameters(model),
                "size": size,
                "sampler": name,
                "steps": steps,
                "precision": "fp32" if dtype is None else precision,
                "seconds_per_volume": round(seconds, 3),
                "seconds_per_step": round(seconds / steps, 4),
                "peak_memory_mb": round(peak, 1),
                "peak_memory_kind": peak_kind,
            }
        )
    return out


def compare_samplers(
    cfg: Config,
    checkpoint: Any,
    pairs: list[tuple[Any, Any]],
    samplers: Sequence[str],
    k: int,
    threads: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Quality of each of ``samplers`` (NAME:STEPS, :func:`sampler_specs` against the checkpoint's schedule) on
    ``pairs`` of (reference CT path, layout path): lung-region MSE (HU²)
    and HU histogram distance inside the lungs, with anatomically-aware blending and the weights (EMA or raw) as
    ``sample`` configures them (``blend``, ``use_ema``), k samples per
    layout; mean and 95% bootstrap interval resampling whole layouts (the k samples of one layout share its CT;
    a single layout gives no interval: None)."""
    import numpy as np

    from ..metrics.voxel import bootstrap_ci, hu_histogram_distance, region_mse
    from ..preprocessing.layout import read_case_pair
    from .checkpoint import load_model
    from .convention import convention_from_checkpoint
    from .sample import Blend, blend_radii, keep_mask, sample

    torch.set_num_threads(threads)
    sc = cfg.raw["sample"]
    model, ckpt = load_model(checkpoint, use_ema=sc["use_ema"])
    diffusion = GaussianDiffusion(DiffusionConfig(**ckpt["diffusion"]))
    convention = convention_from_checkpoint(ckpt, checkpoint)
    results = []
    for name, steps in sampler_specs(samplers, int(ckpt["diffusion"]["timesteps"])):
        mse, hist, seconds, groups = [], [], [], []
        for index, (ct_path, layout_path) in enumerate(pairs):
            ct, layout, geometry = read_case_pair(ct_path, layout_path)
            margin = blend_radii(sc["blend_margin_mm"], geometry.spacing)
            keep = keep_mask(layout, margin) if sc["blend"] else np.zeros(layout.shape, bool)
            lung = layout > 0
            inp = convention.to_model(ct, layout, keep)
            blend = None
            if sc["blend"]:
                blend = Blend(
                    torch.from_numpy(inp.image)[None], torch.from_numpy(inp.keep)[None], sc["blend_start_fraction"]
                )
            lay = torch.from_numpy(inp.layout)[None]
            for j in range(k):
                t0 = time.perf_counter()
                x = sample(
                    model,
                    diffusion,
                    lay,
                    name,
                    steps,
                    torch.Generator().manual_seed(seed + j),
                    blend=blend,
                    clip_x0=sc["clip_x0"],
                    timestep_spacing=sc["timestep_spacing"],
                )
                seconds.append(time.perf_counter() - t0)
                hu = convention.to_hu(x[0, 0].numpy(), inp)
                mse.append(region_mse(ct, hu, lung))
                hist.append(hu_histogram_distance(ct, hu, lung))
                groups.append(index)
        m, lo, hi = bootstrap_ci(mse, seed=seed, groups=groups)
        h, hlo, hhi = bootstrap_ci(hist, seed=seed, groups=groups)
        results.append(
            {
                "sampler": name,
                "steps": steps,
                "n": len(mse),
                "lung_mse_hu2": round(m, 1),
                "lung_mse_ci95": None if np.isnan(lo) else [round(lo, 1), round(hi, 1)],
                "lung_hist_w1_hu": round(h, 2),
                "lung_hist_w1_ci95": None if np.isnan(hlo) else [round(hlo, 2), round(hhi, 2)],
                "seconds_per_volume": round(float(np.mean(seconds)), 2),
            }
        )
    return results


def bench_inpaint(
    cfg: Config, batches: list[int], sampler: str, steps: int, precision: str, threads: int, repeats: int = 2
) -> list[dict[str, Any]]:
    """Lesion scale: seconds per inserted nodule and peak memory when ``batch`` ROIs of the (lesion) config's grid
    are inpainted together — a 10 mm sphere generated inside a 3-voxel margin, the rest of the ROI kept — with the
    config's texture guidance (``lesion.sample.guidance`` > 1: two network passes per step against ``any``, three
    against the ``classes``: ``guidance_against``)."""
    import numpy as np

    from .sample import Blend, sample

    n = int(cfg.preprocess.size[0])
    device, dtype, model, _ = _setup(cfg, precision, False, threads, None)
    model = model.eval()
    diffusion = GaussianDiffusion(DiffusionConfig(**cfg.diffusion))
    zz, yy, xx = np.ogrid[:n, :n, :n]
    r2 = (zz - n / 2) ** 2 + (yy - n / 2) ** 2 + (xx - n / 2) ** 2
    radius = 5.0 / float(cfg.preprocess.spacing_mm[0])
    nodule, generated = r2 <= radius**2, r2 <= (radius + 3) ** 2
    guidance = float(cfg.raw["lesion"]["sample"]["guidance"])
    against = cfg.raw["lesion"]["sample"].get("guidance_against", "any")
    out = []
    for batch in batches:
        planes = [np.ones((n, n, n)), np.where(nodule, 0.75, -1.0)]
        if model.cfg.context:  # the known ROI (zeros here) and the keep mask
            planes += [np.zeros((n, n, n)), np.where(generated, -1.0, 1.0)]
        layout = torch.from_numpy(np.stack(planes).astype(np.float32))
        layout = layout[None].repeat(batch, 1, 1, 1, 1).to(device)
        blend = Blend(
            torch.zeros(batch, 1, n, n, n), torch.from_numpy(~generated)[None, None].repeat(batch, 1, 1, 1, 1)
        )
        levels = (1.0,) if against == "any" else (-0.5, 0.0)  # any texture; or the other two classes (timing alike)
        others = [layout.clone() for _ in levels]
        for other, level in zip(others, levels):
            other[:, 1] = torch.where(other[:, 1] > -1, level, -1.0)
        uncond = others if against == "any" else [layout, *others]  # the requested class's own pass reused
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        kw = {"blend": blend, "autocast_dtype": dtype, "guidance": guidance, "uncond_layout": uncond}
        sample(model, diffusion, layout, sampler, 2, gens, **kw)  # warm-up
        peak_kind = reset_peak_memory(device)  # and wait for the warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            sample(model, diffusion, layout, sampler, steps, gens, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / repeats
        peak = peak_memory_mb(device)
        out.append(
            {
                "device": device_name(device, threads),
                "scale": "lesion",
                "parameters": count_parameters(model),
                "roi": f"{n}^3 at {cfg.preprocess.spacing_mm[0]} mm",
                "sampler": sampler,
                "steps": steps,
                "precision": "fp32" if dtype is None else precision,
                "guidance": guidance,
                "guidance_against": against,
                "nodules_batched": batch,
                "seconds_per_nodule": round(seconds / batch, 3),
                "peak_memory_mb": round(peak, 1),
                "peak_memory_kind": peak_kind,
            }
        )
    return out


def sampler_specs(items: Sequence[str], timesteps: int, key: str = "diffusion.timesteps") -> list[tuple[str, int]]:
    """["dpm++:20", "ddpm:250"] -> [("dpm++", 20), ("ddpm", 250)], each a known sampler with 1 to ``timesteps``
    (the model's schedule, ``key`` in the config) steps."""
    from .sample import SAMPLERS

    out = []
    for item in items:
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= timesteps:
            raise LungDDPMError(
                f"--samplers {item!r}: expected NAME:STEPS with NAME one of {list(SAMPLERS)} and 1 to {timesteps} "
                f"steps (the model's {key}), e.g. dpm++:20"
            )
        out.append((name, int(steps)))
    return out


def bench_quality(
    cfg: Config, results: Path, samplers: Sequence[str], k: int, threads: int, out: Path | None = None
) -> list[dict[str, Any]]:
    """:func:`compare_samplers` of ``samplers`` (NAME:STEPS) on the eval run's real CTs and layouts under
    ``results`` with the workflow's model; the rows (with the cases and checkpoint) also go to ``out`` if given."""
    from ..io import write_json
    from ..preprocessing.cases import case_ct, case_layout, case_split, list_cases, model_checkpoint, run_cases

    cases = run_cases(case_split(cfg, list_cases(cfg)), "eval")
    pairs = [(case_ct(results, c), case_layout(results, c)) for c in cases]
    checkpoint = model_checkpoint(cfg, results)
    rows = compare_samplers(cfg, checkpoint, pairs, samplers, k, threads)
    if out is not None:
        write_json(out, {"cases": cases, "checkpoint": str(checkpoint), "rows": rows})
    return rows


def refuse_unused(args: Any) -> None:
    """Flags that ``lungddpm bench <what>`` would ignore (its numbers would not be what was asked), refused."""
    lesion, where, batched = args.scale == "lesion", f"bench {args.what}", args.batch != [1]
    where += " --scale lesion" * (lesion and args.what == "sample")
    flags = {"sample": {"--size": lesion and args.size, "--channels-last": lesion and args.channels_last, "--compile":
                        args.compile, "--batch": not lesion and batched, "--steps": args.steps != 3},
             "speed": {"--size": args.size, "--precision": args.precision != ["fp32"], "--compile": args.compile,
                       "--channels-last": args.channels_last, "--batch": batched}}.get(args.what, {})  # fmt: skip
    flags["--profile"] = args.profile and args.what != "speed"  # the profiler runs in bench speed only
    if unused := [name for name, given in flags.items() if given]:
        raise LungDDPMError(f"{', '.join(unused)}: not used by {where} (speed: --sizes, --batch-sizes, --modes; "
                            "compiled or batched training: bench train); leave them out")  # fmt: skip


def bench_entry(args: Any, cfg: Config) -> Iterator[dict[str, Any]]:
    """``lungddpm bench``'s rows for its parsed arguments ``args`` (:func:`refuse_unused` passed): quality, sample
    (whole or lesion) or train."""
    if args.what == "quality":
        out = Path(args.out) if args.out else None
        yield from bench_quality(cfg, Path(args.results), args.samplers, args.k, args.threads, out)
        return
    if args.scale == "lesion":  # the config's lesion network (lesion.model), sampled or trained on its ROI grid
        from ..config import lesion_config

        cfg = lesion_config(cfg)
        if args.what == "sample":
            for name, steps in sampler_specs(
                args.samplers, int(cfg.diffusion["timesteps"]), "lesion.diffusion.timesteps, else diffusion.timesteps"
            ):
                for precision in args.precision:
                    yield from bench_inpaint(cfg, args.batch, name, steps, precision, args.threads)
            return
    elif args.model == "paper":  # the schema defaults are the paper's network and process
        from ..config import validate_config

        raw = dict(cfg.raw)
        raw.update({k: validate_config({})[k] for k in ("model", "diffusion")})
        cfg = Config.from_dict(raw)
    image_size = 128 if args.model == "paper" and args.scale != "lesion" else None
    size = args.size or (int(cfg.preprocess.size[0]) if args.scale == "lesion" else DEFAULT_SIZE)
    step = downsampling(cfg.model["channel_mult"])  # checked before building anything
    if size % step:
        raise ConfigError(
            f"--size {size}: the network halves the grid {len(cfg.model['channel_mult']) - 1} times "
            f"(model.channel_mult {list(cfg.model['channel_mult'])}), so the edge must be a multiple of {step}; "
            f"try --size {max(step, size // step * step)}"
        )
    if args.what == "sample":
        specs = sampler_specs(args.samplers, int(cfg.diffusion["timesteps"]))
        for precision in args.precision:
            yield from bench_sample(cfg, size, specs, precision, args.channels_last,
                                    args.threads, image_size=image_size)  # fmt: skip
        return
    for batch, precision in ((b, p) for b in args.batch for p in args.precision):
        for compiled in [False, True] if args.compile else [False]:
            yield bench_train(cfg, size, batch, precision, compiled, args.channels_last, args.steps,
                              args.threads, image_size=image_size)  # fmt: skip
