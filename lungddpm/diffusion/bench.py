"""Training benchmark: seconds per step (forward + backward + AdamW), no-grad forward, samples/s, peak memory."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from ..config import Config
from .process import DiffusionConfig, GaussianDiffusion
from .train import _autocast, resolve_precision
from .unet import UNet3D, count_parameters, unet_config_from_dict


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(precision, device)
    torch.manual_seed(0)
    model = UNet3D(unet_config_from_dict(cfg.model, image_size=image_size or max(cfg.preprocess.size))).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compiled else model
    diffusion = GaussianDiffusion(DiffusionConfig(**cfg.diffusion))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x0 = (torch.rand(batch, 1, size, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    layout = (torch.rand(batch, 2, size, size, size, device=device).round() * 2 - 1).contiguous(memory_format=fmt)
    noise = torch.randn_like(x0)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = diffusion.loss(net, x0, layout, t, noise).mean()
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            net(x0, t, layout)

    t_compile = time.perf_counter()
    train_step()
    forward()
    sync()
    warmup_s = time.perf_counter() - t_compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = {}
    for name, fn in (("train_step_s", train_step), ("forward_s", forward)):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        timings[name] = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{threads} threads",
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
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "warmup_s": round(warmup_s, 1),
    }
