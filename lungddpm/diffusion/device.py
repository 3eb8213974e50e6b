"""The device a run computes on, and the backend settings that every run on it shares — training, sampling and the
speed benchmark alike, so that the benchmark times what the workflow runs."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """The first GPU where there is one, else the CPU, with :func:`tune_backends` applied (a torchrun process takes
    its own, in ``distributed``, which applies it too)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tune_backends(device)
    return device


def tune_backends(device: torch.device) -> None:
    """On a GPU: let cuDNN time its convolution algorithms for each new shape and keep the fastest
    (``cudnn.benchmark``). The first batch of a shape pays the timing; a 3D UNet's shapes repeat every step. The
    chosen algorithms can differ between runs, so GPU outputs are reproducible to floating-point rounding, as GPU
    training already was (atomics in the weight gradients). A no-op on the CPU."""
    if device.type == "cuda" and not torch.backends.cudnn.benchmark:
        torch.backends.cudnn.benchmark = True
        log.info("cuDNN benchmark mode on: the first batch of each shape times the convolution algorithms")
