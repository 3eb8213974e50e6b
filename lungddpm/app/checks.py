"""The studio's checks of what a user asks: a seed (ROI settings against the lesion model's training:
:func:`lungddpm.synthesis.lesion.load_lesion_model`)."""

from __future__ import annotations

from typing import Any

from ..errors import LungDDPMError

SEED_MAX = 2**62 - 1  # numpy and torch take any seed up to here


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
