"""One optimizer update, as the training loop makes it and the speed benchmark times it: AdamW (fused on a GPU),
unscaling, gradient clipping, the finite check, the step, and the EMA of the weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class EMA:
    """Exponential moving average of parameters (buffers copied): updated after every ``every``-th optimizer update,
    a plain copy of the weights before update ``start`` (Lung-DDPM's trainer: every 10th from step 2000), with the
    usual warm-up ``min(decay, (1 + k) / (10 + k))`` over its own updates k when ``warmup``."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool, every: int = 1, start: int = 0) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.every, self.start = decay, warmup, every, start

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int) -> None:
        """After optimizer update ``n_updates`` (0-based: the number of updates before it)."""
        if n_updates % self.every:
            return
        ema_p, new_p = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if n_updates < self.start:
            torch._foreach_copy_(ema_p, new_p)
        else:
            k = (n_updates - self.start) // self.every  # this EMA's own updates before this one
            decay = min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay
            torch._foreach_lerp_(ema_p, new_p, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; on a GPU its fused kernel (one launch for all parameters instead of a few per tensor group). The
    state dict has the same keys either way, so a checkpoint resumes on either device."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer ``state`` (moments, step counts) into ``optimizer``, keeping the settings it
    was built with (weight decay, betas, eps, fused, ...): ``load_state_dict`` alone puts the checkpoint's back, so
    a changed ``train.weight_decay`` or a CPU checkpoint resumed on a GPU (fused) would not apply. The learning rate
    stays the checkpoint's (the schedule sets it every step)."""
    groups = [
        {**saved, **{k: v for k, v in built.items() if k not in ("params", "lr")}}
        for saved, built in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})  # before the cast: fused moves step counts
    for group in optimizer.param_groups:  # the moments in their parameter's layout (train.channels_last may differ):
        for p in group["params"]:  # fused AdamW reads raw memory (CPU) or refuses mixed strides (CUDA)
            saved = optimizer.state.get(p, {})
            for key, value in saved.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    saved[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: EMA,
    n_updates: int,
    loss: torch.Tensor,
    grad_clip: float,
) -> tuple[bool, torch.Tensor]:
    """After the backward passes of one step: unscale, clip to ``grad_clip`` (0 = no clipping; the norm is still
    measured), and — where the step's mean ``loss`` (a 0-d tensor) and the gradient norm are finite — step, zero
    the gradients and update ``ema`` (``n_updates`` before this one). fp16's GradScaler skips steps with inf
    gradients by design (and lowers its scale), so there only the loss must be finite, and a step it skipped leaves
    the EMA as it was. Returns (stepped, gradient norm); a step that is not finite leaves the weights, the optimizer
    and the EMA untouched. One host synchronisation: the check (fp16: two more, the scale before and after)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if not bool(finite):
        return False, grad_norm
    scale = scaler.get_scale()  # 1.0 without fp16
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scaler.get_scale() >= scale:  # a skipped fp16 step backs the scale off; no step, no average of it
        ema.update(model, n_updates)
    return True, grad_norm
