"""The process group of a training run: torchrun's environment, one process without it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from .device import tune_backends


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
    """Read torchrun's environment; one process without it. GPU if available (one per local rank), with the
    backend settings of every run there (:func:`~lungddpm.diffusion.device.tune_backends`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < local_world:  # CPU DDP (train.gpus: 0) on a host with fewer GPUs than ranks: all on the CPU
        if local_rank == 0:
            logging.getLogger(__name__).warning("%d ranks for %d GPU(s): training on the CPU", local_world, gpus)
        gpus = 0
    device = torch.device(f"cuda:{local_rank}") if gpus else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tune_backends(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(world, rank, local_rank, device)


def all_mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The mean of a scalar ``value`` over the ranks."""
    if dist.world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= dist.world
    return value


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.world > 1:
        torch.distributed.barrier()


def seed_rank(seed: int, step: int, dist: Dist) -> None:
    """Give each rank past the first its own stream of the global RNGs (dropout draws from them) for the step after
    ``step``: seeded from (``seed``, ``step``, rank), at every step, so that a run resumed from a checkpoint (which
    holds rank 0's state only) draws what the uninterrupted run drew. Rank 0 keeps its state, so one process is
    unchanged, and the ranks do not repeat one another's dropout masks."""
    if dist.rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, step, dist.rank]).generate_state(1)[0]))
