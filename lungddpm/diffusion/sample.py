"""Samplers on ``diffusers`` schedulers: DDPM ancestral (the paper's), DDIM and DPM-Solver++ (multistep).

Every sampler is built from the training scheduler's config, so they share its ᾱ_t; the loop is the same for
all: ``set_timesteps`` -> for each t: model output -> ``step``.
"""

from __future__ import annotations

from typing import Any

import torch

from .process import GaussianDiffusion, Model

SAMPLERS = ("ddpm", "ddim", "dpm++")


def make_sampler(diffusion: GaussianDiffusion, name: str) -> Any:
    """A fresh diffusers scheduler of kind ``name`` sharing the diffusion's schedule and prediction type."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = diffusion.scheduler.config
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            lower_order_final=True,
            final_sigmas_type="zero",
            timestep_spacing="trailing",  # "linspace" hits λ = -inf at T=250 with the cosine schedule
        )
    raise ValueError(f"sampler {name!r} unknown; choose one of {SAMPLERS}")


@torch.no_grad()
def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    layout: torch.Tensor,
    sampler: str = "ddim",
    steps: int = 20,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate images for ``layout`` [B, 2, D, H, W] -> x_0 [B, 1, D, H, W] in model units (about [-1, 1])."""
    scheduler = make_sampler(diffusion, sampler)
    scheduler.set_timesteps(steps, device=layout.device)
    shape = (layout.shape[0], 1, *layout.shape[2:])
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu").to(layout.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((shape[0],), int(t), device=layout.device, dtype=torch.long)
        out = model(scheduler.scale_model_input(x, t), tt, layout).float()
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
