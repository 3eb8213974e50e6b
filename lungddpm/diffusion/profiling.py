"""What a step costs: peak memory per measurement (CUDA's counters, or the process's peak RSS on the CPU), the
largest batch that fits a GPU, and where the time goes: ``torch.profiler`` over warmed-up calls, as a table of the
operators that took the most time on the device (the GPU's kernels, or the CPU's operators on a CPU)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ..errors import LungDDPMError

ROW_LIMIT = 25  # operators per table
NAME_WIDTH = 70  # characters of an operator's name kept (compiled kernels have long names)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU, the process's peak RSS on the CPU (MB), since :func:`reset_peak_memory`
    (Linux: ``VmHWM``; elsewhere the max RSS of the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak for :func:`peak_memory_mb`: CUDA's counters (after the work queued), or on the CPU the
    process's peak RSS, set to the current RSS (Linux: ``/proc/self/clear_refs``), so that a row is not another's.
    Returns what the next peak will be (a row's ``peak_memory_kind``): without ``clear_refs``, the process's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return "cuda max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "process peak RSS"
    except OSError:
        return "process max RSS since its start"


def device_name(device: torch.device, threads: int) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{threads} threads"


def largest_batch(try_batch: Callable[[int], Callable[[], None]], limit: int = 256) -> int:
    """The largest batch up to ``limit`` whose training step runs without running out of GPU memory: doubling from 1
    to the first that does not fit, then bisecting between the last that fits and it."""

    def fits(b: int) -> bool:
        try:
            step = try_batch(b)
            step()
            step()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    best, fail = 0, limit + 1
    b = 1
    while b <= limit:
        if not fits(b):
            fail = b
            break
        best, b = b, 2 * b
    if not best:
        raise LungDDPMError("speed: not even batch 1 fits in GPU memory")
    while fail - best > 1:
        mid = (best + fail) // 2
        best, fail = (mid, fail) if fits(mid) else (best, mid)
    return best


def profile_tables(calls: Mapping[str, Callable[[], Any]], device: torch.device, row_limit: int = ROW_LIMIT) -> str:
    """One table per named call, each profiled over one call (warm it up first: compiling and cuDNN's timing are
    not what is asked): the ``row_limit`` operators with the most self time on ``device``, with the share of the
    total, as plain text under a ``=== name ===`` heading (compiled graphs' rows start with ``##``)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = []
    for name, call in calls.items():
        with profile(activities=activities) as prof:
            call()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=NAME_WIDTH)
        out.append(f"=== {name} ({device.type}, sorted by {key}) ===\n\n{table}\n")
    return "\n".join(out)
