"""Deterministic fault injection for the fault tests: ``kill -9`` of this process at a named point.

``LUNGDDPM_KILL_AT=<point>:<n>`` makes the process SIGKILL itself the moment it reaches ``point`` for the
``n``-th time (or, for ``checkpoint``, right after writing the checkpoint of step ``n``). Points:

- ``checkpoint`` — training, right after the resumable checkpoint ``step_<n>.pt`` was written;
- ``rename`` — any atomic write (:func:`lungddpm.atomic.atomic_path`), after the temporary file is complete and
  before it is renamed onto its target: the ``n``-th atomic write of the process;
- ``swap`` — a folder replaced whole (:func:`lungddpm.atomic.atomic_folder`, ``replace``), after the earlier folder
  was moved aside and before the new one is renamed in.

Unset (the normal case) it costs one dictionary lookup. Never a timer: the kill happens at the same point on
every run, which is what makes the resume and no-partial-output tests exact.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV = "LUNGDDPM_KILL_AT"
POINTS = ("checkpoint", "rename", "swap")
_seen: Counter[str] = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, n = spec.partition(":")
    if point not in POINTS or not n.isdigit():
        raise ConfigError(f"{ENV}={spec!r}: expected <point>:<n> with point one of {POINTS}, e.g. checkpoint:3")
    return point, int(n)


def kill_point(point: str, n: int | None = None) -> None:
    """SIGKILL this process if ``LUNGDDPM_KILL_AT`` names ``point`` and its count (``n``, or the number of times
    this process reached ``point``)."""
    target = _target()
    if target is None or target[0] != point:
        return
    _seen[point] += 1
    if (n if n is not None else _seen[point]) == target[1]:
        log.warning("%s=%s:%d reached: killing this process (pid %d) with SIGKILL", ENV, point, target[1], os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
