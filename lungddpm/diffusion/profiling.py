"""Where a step's time goes: ``torch.profiler`` over warmed-up calls, as a table of the operators that took the most
time on the device (the GPU's kernels, or the CPU's operators on a CPU)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROW_LIMIT = 25  # operators per table
NAME_WIDTH = 70  # characters of an operator's name kept (compiled kernels have long names)


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
