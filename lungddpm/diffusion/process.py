"""The diffusion process — schedule, forward noising, training target and loss — with no network inside.

The schedule is a ``diffusers`` scheduler (cosine = ``squaredcos_cap_v2``, identical to Lung-DDPM's buffers), so
training and every sampler share one definition of ᾱ_t. The network is an argument (improved-diffusion's split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config_checks import LINEAR_MIN_TIMESTEPS

Model = Callable[..., torch.Tensor]

SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 250
    schedule: str = "cosine"
    prediction: str = "epsilon"
    loss: str = "l1"
    snr_gamma: float | None = None  # Min-SNR-γ loss weighting (None: every timestep weighs 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_scheduler(cfg: DiffusionConfig) -> Any:
    """The training scheduler (``diffusers.DDPMScheduler``); samplers are built from its config."""
    from diffusers import DDPMScheduler

    kwargs: dict[str, Any] = {}
    if cfg.schedule == "linear":  # DDPM's 1e-4..0.02 at T=1000, rescaled to T
        kwargs = {"beta_start": 1e-4 * 1000 / cfg.timesteps, "beta_end": 0.02 * 1000 / cfg.timesteps}
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_schedule=SCHEDULES[cfg.schedule],
        prediction_type=PREDICTIONS[cfg.prediction],
        clip_sample=False,
        **kwargs,
    )


class GaussianDiffusion:
    """Forward process and training loss for a layout-conditioned denoiser ``model(x_t, t, layout)``."""

    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()) -> None:
        if cfg.schedule not in SCHEDULES or cfg.prediction not in PREDICTIONS or cfg.loss not in ("l1", "l2"):
            raise ValueError(f"unsupported diffusion config {cfg}")
        if cfg.schedule == "linear" and cfg.timesteps < LINEAR_MIN_TIMESTEPS:  # ᾱ would reach 0
            raise ValueError(
                f"diffusion.schedule linear needs timesteps > {LINEAR_MIN_TIMESTEPS - 1}, not {cfg.timesteps}; "
                "or use cosine"
            )
        if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
            raise ValueError(f"diffusion.snr_gamma must be > 0 or null, not {cfg.snr_gamma}")
        self.cfg = cfg
        self.scheduler = make_scheduler(cfg)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float32)  # [T]

    @property
    def num_timesteps(self) -> int:
        return self.cfg.timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x0, noise [B, C, D, H, W], t [B] -> x_t."""
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: ε, or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0."""
        if self.cfg.prediction == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t.to(x0.device))

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x̂_0 from the network output at x_t."""
        a = self.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.ndim - 1)))
        if self.cfg.prediction == "epsilon":
            return (x_t - (1 - a).sqrt() * output) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * output

    def timestep_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weight [B] of timesteps ``t`` [B] (Hang et al. 2023), SNR = ᾱ / (1 - ᾱ): min(SNR, γ) / SNR
        for ε and min(SNR, γ) / (SNR + 1) for v, under L2, so that a sample's loss is its x̂_0 error weighted by
        min(SNR, γ) and the easy low-noise steps stop dominating the gradient; the square root of that under L1
        (an L1 error scales with the square root of an L2 one). Ones when ``snr_gamma`` is None."""
        if self.cfg.snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        a = self.alphas_cumprod.to(t.device)[t]
        snr = a / (1 - a)
        w = snr.clamp(max=self.cfg.snr_gamma) / (snr if self.cfg.prediction == "epsilon" else snr + 1)
        return w.sqrt() if self.cfg.loss == "l1" else w

    def loss(
        self,
        model: Model,
        x0: torch.Tensor,
        layout: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss [B] (mean over voxels) of ``model`` at timesteps ``t`` with the given ``noise``, times
        :meth:`timestep_weight`; ``weight`` [B, 1, D, H, W] makes it the weighted mean (the lesion-focused loss),
        0 for a sample whose weights are all 0 (a training crop that misses a context model's generated region)."""
        x_t = self.add_noise(x0, noise, t)
        # the error in fp32: under autocast a bf16 target would land on the output's grid, zeroing or flipping
        # L1's gradient sign wherever the two round alike
        out = model(x_t, t, layout).float()
        target = self.target(x0, noise, t).float()
        err = (
            F.l1_loss(out, target, reduction="none")
            if self.cfg.loss == "l1"
            else F.mse_loss(out, target, reduction="none")
        )
        per_t = self.timestep_weight(t.to(x0.device))
        if weight is None:
            return err.flatten(1).mean(1) * per_t
        w = weight.float().expand_as(err).flatten(1)
        total = w.sum(1)
        total = torch.where(total > 0, total, torch.ones_like(total))  # all-zero weights: 0 / 1, not 0 / 0
        return (err.flatten(1) * w).sum(1) / total * per_t
