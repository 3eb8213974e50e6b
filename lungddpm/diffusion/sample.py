"""Samplers on ``diffusers`` schedulers — DDPM ancestral (the paper's), DDIM, DPM-Solver++ (multistep) — and
anatomically-aware sampling.

Every sampler is built from the training scheduler's config, so they share its ᾱ_t; the loop is the same for
all: ``set_timesteps`` -> for each t: model output -> ``step``, and every step lands exactly on the noise level of
the next timestep in the list (DDIM is first-order DPM-Solver++, the same update: diffusers' DDIMScheduler steps
to t - T // steps, one level off the list when ``steps`` does not divide T).

Anatomically-aware sampling keeps the reference CT where the layout is background, away from the lungs: in the
*keep mask* (background eroded by a margin, so the seam falls in generated tissue) the sample is replaced after
each step by the reference forward-noised to the noise level the sample has *after* that step (the original
blends one level off), and by the clean reference after the last step. Elsewhere the sampler's output is
untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from ..errors import SamplingError
from .process import GaussianDiffusion, Model

SAMPLERS = ("ddpm", "ddim", "dpm++")
SPACINGS = ("trailing", "quadratic")  # sample.timestep_spacing


def make_sampler(diffusion: GaussianDiffusion, name: str, clip_x0: bool = True) -> Any:
    """A fresh diffusers scheduler of kind ``name`` sharing the diffusion's schedule and prediction type.

    ``clip_x0`` clamps each step's x̂_0 to [-1, 1] (the data range), as Lung-DDPM's sampler does
    (``clip_denoised``); for DDIM and DPM-Solver++ this is diffusers' thresholding with a maximum of 1. DDIM (η = 0)
    is first-order DPM-Solver++: x_s = α_s x̂_0 + σ_s ε̂ with ε̂ re-derived from the clipped x̂_0 (guided-diffusion's
    DDIM; diffusers' DDIMScheduler keeps the unclipped ε by default), its last step returns x̂_0.
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    config = diffusion.scheduler.config
    if name == "ddpm":  # trailing: from t = T - 1, pure noise, at any step count (leading starts lower)
        return DDPMScheduler.from_config(
            config, clip_sample=clip_x0, clip_sample_range=1.0, timestep_spacing="trailing"
        )
    if name in ("ddim", "dpm++"):
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=1 if name == "ddim" else 2,
            lower_order_final=True,
            final_sigmas_type="zero",
            timestep_spacing="trailing",  # "linspace" rounds to a repeated timestep at 250 steps: a step of 0
            thresholding=clip_x0,
            sample_max_value=1.0,
        )
    raise ValueError(f"sampler {name!r} unknown; choose one of {SAMPLERS}")


def sampling_timesteps(num_train: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The ``steps`` timesteps the network is called at, descending from T - 1 = ``num_train`` - 1.

    trailing: round(arange(T, 0, -T / steps)) - 1 (diffusers' trailing; the last call at about T / steps, whence
    the jump to σ = 0 smooths away texture finer than that noise level);
    quadratic: DPM-Solver's time-quadratic grid (Lu et al. 2022): √τ evenly spaced for τ = (t + 1) / T from 1 to
    1 / T, the last call at t = 0 (its denoise-to-zero step), rounded and, near t = 0, raised where rounding would
    repeat a timestep; the low noise levels, where fine texture forms, get more of the steps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"sample.timestep_spacing {spacing!r} unknown; choose one of {SPACINGS}")
    if not 1 <= steps <= num_train:
        raise ValueError(f"sampler steps {steps} must lie in 1..{num_train} (diffusion.timesteps): sample.steps")
    if spacing == "trailing":  # diffusers' list, cut to ``steps``: arange's float end gives one more for some counts
        # (61 of T = 250: a call at t = -1)
        return (np.round(np.arange(num_train, 0, -num_train / steps))[:steps].astype(np.int64) - 1).tolist()
    up = np.round(np.linspace(np.sqrt(num_train), 1.0, steps) ** 2 - 1).astype(np.int64)[::-1]  # (0 ..) T - 1
    k = np.arange(steps)
    up = np.maximum.accumulate(up - k) + k  # the least strictly increasing sequence >= up; it still ends at T - 1
    return up[::-1].tolist()


def start_timesteps(scheduler: Any, steps: int, spacing: str, device: torch.device, at: int = 0) -> None:
    """Set ``scheduler``'s timesteps (:func:`sampling_timesteps`) and start it at list index ``at``: a multistep
    scheduler counts its steps, so a RePaint jump back restarts it (DDIM, first order, carries no history)."""
    plan = sampling_timesteps(scheduler.config.num_train_timesteps, steps, spacing)  # checks spacing and steps
    scheduler.set_timesteps(timesteps=plan, device=device)  # diffusers' own trailing list has the float end too
    if at and hasattr(scheduler, "set_begin_index"):  # DDPM's step looks its timestep up: nothing to restart
        scheduler.set_begin_index(at)


def blend_radii(margin_mm: float, spacing_zyx: Sequence[float]) -> tuple[float, ...]:
    """``sample.blend_margin_mm`` in voxels per axis (z, y, x), not rounded, so that :func:`keep_mask`'s ellipsoid
    is the ball of that margin (until 2026-12-07 rounded: at 1.25 x 0.7 x 0.7 mm and 10 mm, radii (8, 14, 14) kept
    300 reference voxels within the margin of a single lung voxel)."""
    return tuple(float(margin_mm) / float(s) for s in spacing_zyx)


def keep_mask(layout: np.ndarray, margin_vox: Sequence[float]) -> np.ndarray:
    """Where the reference is kept: background (label 0) eroded by an ellipsoid of ``margin_vox`` (z, y, x)
    voxels (:func:`blend_radii`). layout: [D, H, W] labels -> bool [D, H, W]. The volume border does not erode it."""
    background = layout == 0
    r = np.asarray(margin_vox, dtype=float)
    if not r.any():
        return background
    half = np.ceil(r).astype(int)
    zz, yy, xx = np.ogrid[-half[0] : half[0] + 1, -half[1] : half[1] + 1, -half[2] : half[2] + 1]
    # the tolerance: 0.3 mm / 0.1 mm is 2.9999999999999996, whose third voxel must stay in
    ball = sum((c / max(ri, 1e-6)) ** 2 for c, ri in zip((zz, yy, xx), r)) <= 1.0 + 2e-6
    return ndi.binary_erosion(background, structure=ball, border_value=1)


@dataclass(frozen=True)
class Blend:
    """Anatomically-aware sampling inputs (batched like the sample)."""

    reference: torch.Tensor  # [B, 1, D, H, W] reference CT in model units
    keep: torch.Tensor  # bool [B, 1, D, H, W]: True = reference kept
    start_fraction: float = 0.0  # blend from this fraction of the trajectory on (0 = from the first step)


@torch.no_grad()
def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    layout: torch.Tensor,
    sampler: str = "ddim",
    steps: int = 20,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    blend: Blend | None = None,
    autocast_dtype: torch.dtype | None = None,
    clip_x0: bool = True,
    guidance: float = 1.0,
    uncond_layout: torch.Tensor | Sequence[torch.Tensor] | None = None,
    resample: Resample | None = None,
    progress: Callable[[int, int], None] | None = None,
    timestep_spacing: str = "trailing",
) -> torch.Tensor:
    """Generate images for ``layout`` [B, 2, D, H, W] -> x_0 [B, 1, D, H, W] in model units (about [-1, 1]).

    Random numbers (initial noise, ancestral noise, the reference's forward noise) come from ``generator`` on the
    CPU — one per batch element when a sequence is given, so each volume of a batch equals the volume sampled
    alone with its generator — and a seed gives the same volume on any device.

    ``guidance`` != 1 with ``uncond_layout`` [B, 2, D, H, W] (the layout with its condition dropped, e.g. "any
    texture") is classifier-free guidance: output = uncond + guidance * (cond - uncond), two network passes per step.
    A sequence of layouts guides against the mean of their outputs (e.g. the three texture classes); an entry that
    is ``layout`` itself reuses the conditional pass.
    ``resample`` (RePaint, with ``blend``): every ``jump_length`` steps the sample is forward-noised back
    ``jump_length`` steps and denoised again, ``jump_n_sample - 1`` extra times, so the generated region can
    harmonise with the kept one; single-step samplers only (ddpm, ddim). ``progress(i, steps)`` is called after
    step ``i`` of ``steps`` (it goes back with RePaint's jumps). ``timestep_spacing``: :func:`sampling_timesteps`.
    """
    against = [uncond_layout] if isinstance(uncond_layout, torch.Tensor) else list(uncond_layout or [])
    if guidance != 1.0 and not against:
        raise ValueError(f"sample: guidance {guidance} needs uncond_layout (the layout with its condition dropped)")
    guided = guidance != 1.0
    jump, repeats = (resample.jump_length, resample.jump_n_sample) if resample is not None else (0, 1)
    jumping = repeats > 1 and jump > 0
    if jumping and sampler == "dpm++":
        raise ValueError(
            "RePaint resampling needs a single-step sampler: DPM-Solver++ carries the history of its multistep "
            "solver, which a jump back invalidates; set the sampler to ddim or ddpm, or turn resampling off"
        )
    device = layout.device
    scheduler = make_sampler(diffusion, sampler, clip_x0)
    start_timesteps(scheduler, steps, timestep_spacing, device)
    shape = (layout.shape[0], 1, *layout.shape[2:])
    generators = list(generator) if isinstance(generator, Sequence) else [generator] * shape[0]
    if len(generators) != shape[0]:
        raise ValueError(f"sample: {len(generators)} generators for a batch of {shape[0]}")

    def randn() -> torch.Tensor:
        if isinstance(generator, Sequence):  # on each generator's device (the CPU's: the same on any device)
            one = (1, *shape[1:])
            return to_device(torch.cat([torch.randn(one, generator=g, device=g.device) for g in generators]), device)
        on = generator.device if generator else None
        return to_device(torch.randn(shape, generator=generator, device=on), device)

    x = (randn() if noise is None else noise.to(device)) * scheduler.init_noise_sigma
    step_generator = generators if isinstance(generator, Sequence) else generator
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]  # read back once, not once per step
    first_blend = min(round((blend.start_fraction if blend else 0.0) * len(timesteps)), len(timesteps) - 1)  # the
    # last step always pastes the reference
    if blend is not None:  # once, not at every step
        blend = Blend(to_device(blend.reference, device), to_device(blend.keep, device), blend.start_fraction)
    jumps: dict[int, int] = {}
    i = 0
    while i < len(timesteps):
        t = timesteps[i]
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            x_in = scheduler.scale_model_input(x, t)
            if guided:  # separate passes, not one of twice the batch: on the CPU a doubled batch costs ~2.5x
                cond = model(x_in, tt, layout).float()
                uncond = sum(cond if u is layout else model(x_in, tt, u).float() for u in against) / len(against)
                out = uncond + guidance * (cond - uncond)
            else:
                out = model(x_in, tt, layout).float()
        x = scheduler.step(out, t, x, generator=step_generator).prev_sample
        if blend is not None and i >= first_blend:
            ref = blend.reference
            if i + 1 < len(timesteps):  # the sample is now at the next timestep's noise level
                ref_noise = randn()
                prev_t = torch.full((shape[0],), timesteps[i + 1], device=device, dtype=torch.long)
                ref = diffusion.add_noise(ref, ref_noise, prev_t)
            x = torch.where(blend.keep, ref, x)
        if progress is not None:
            progress(i + 1, len(timesteps))
        # RePaint's jumps (Lugmayr et al. 2022, get_schedule_jump): at every jump-th level counted from the end,
        # where the level is the calls still to make - 1 (0: before the last call, which is never resampled)
        level, back = len(timesteps) - 2 - i, i + 1 - jump
        if jumping and level >= 0 and level % jump == 0 and back >= 0:
            if jumps.get(i, 0) < repeats - 1:
                jumps[i] = jumps.get(i, 0) + 1
                x = renoise(diffusion, x, timesteps[i + 1], timesteps[back], randn())
                i = back
                start_timesteps(scheduler, steps, timestep_spacing, device, at=back)
                continue
        i += 1
    if not (finite := torch.isfinite(x).flatten(1).all(dim=1)).all():  # NaN would be written as 0 HU, inf clipped
        bad = [int(b) for b in torch.nonzero(~finite).flatten()]
        under = f"under {str(autocast_dtype).removeprefix('torch.')} autocast " if autocast_dtype else ""
        raise SamplingError(
            f"volume(s) {bad} of the batch of {shape[0]} came out not finite (NaN or inf): the network's output "
            f"overflowed {under}or the checkpoint's weights are not finite; sample in fp32, or check the checkpoint"
        )
    return x


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory without waiting, so the sampler
    queues its next step while the GPU runs this one (a copy from pageable memory waits for the GPU's queue)."""
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@dataclass(frozen=True)
class Resample:
    """RePaint's resampling schedule: jump back ``jump_length`` steps, ``jump_n_sample - 1`` extra times."""

    jump_length: int = 0
    jump_n_sample: int = 1


def renoise(diffusion: GaussianDiffusion, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    """q(x_{t_to} | x_{t_from}) for t_to > t_from: x at noise level ``t_from`` forward-noised to ``t_to``."""
    a = diffusion.alphas_cumprod.to(x.device)
    ratio = a[t_to] / a[t_from]
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None
