"""The studio's checks of what a user asks: a seed, and ROI settings against the lesion model's training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LungDDPMError

SEED_MAX = 2**62 - 1  # numpy and torch take any seed up to here
ROI_SCALE = ("spacing_mm", "size", "nodule_fraction")  # the lesion.roi keys that shape what the model sees


class StudioError(LungDDPMError):
    """A request the studio refuses; the message says why and what to do instead."""


def check_seed(seed: Any) -> int:
    """``seed`` as an int in 0..:data:`SEED_MAX`; :class:`StudioError` for anything else (an empty field: None)."""
    try:
        value = int(seed)
        ok = value == seed and 0 <= value <= SEED_MAX
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise StudioError(f"seed {seed!r}: the seed must be an integer 0..2**62-1")
    return value


def check_roi_scale(roi: dict[str, Any], trained: dict[str, Any], checkpoint: Path) -> None:
    """Refuse ``lesion.roi`` settings that cut ROIs at another scale than the lesion model's training ROIs had
    (``trained``: the checkpoint's ``lesion.roi``)."""
    diff = [f"lesion.roi.{k} is {roi.get(k)} here, {trained.get(k)} in training" for k in ROI_SCALE
            if roi.get(k) != trained.get(k)]  # fmt: skip
    if diff:
        raise StudioError(
            f"{checkpoint}: {'; '.join(diff)}: the studio would cut ROIs at a scale the lesion model was not trained "
            "on; start the studio with the config the workflow ran with (--configfile), or retrain the model with "
            f"these settings (`snakemake --cores all results/models/lesion/{checkpoint.parent.name}/checkpoint.pt`)"
        )
