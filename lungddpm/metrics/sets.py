"""The sets of the image-quality metrics: volumes, synthetic/real pairs and the split of the real volumes into the
real-vs-real floor and the reference (light: imported when the workflow is parsed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LungDDPMError


class MetricsError(LungDDPMError):
    """The inputs of the image-quality metrics are inconsistent."""


@dataclass(frozen=True)
class Volume:
    """An HU volume with its layout (labels 0 background, 1 lung, 2 nodule; None when unknown) and its patient (the
    bootstraps' independent unit; "" when unknown: the volume is its own)."""

    name: str
    image: Path
    labels: Path | None
    patient: str = ""

    @property
    def unit(self) -> str:
        """The independent unit of the bootstraps: the patient, else the volume."""
        return self.patient or self.name


@dataclass(frozen=True)
class Pair:
    """A synthetic volume and the real volume it was generated for (same layout, same grid)."""

    synthetic: Volume
    real: Volume


def real_halves(
    real: Sequence[Volume],
    first: Sequence[str],
    group: dict[str, str] | None = None,
    seed: int = 0,
    floor_fraction: float = 0.5,
) -> tuple[list[Volume], list[Volume]]:
    """Split real volumes into two disjoint sets by group (patient): (floor, reference).

    The groups of ``first`` (the real cases the synthetic volumes were sampled for) go to the floor, the others are
    shuffled (seeded) and fill it up to ``floor_fraction`` of the groups; the rest is the reference. So the
    synthetic set is never compared with its own source CTs, whose background it copies.
    """
    group = group or {}
    by_group: dict[str, list[Volume]] = {}
    for v in real:
        by_group.setdefault(group.get(v.name, v.name), []).append(v)
    names = sorted(by_group)
    firsts = [g for g in names if any(v.name in set(first) for v in by_group[g])]
    rest = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    rest = [g for g in rest if g not in firsts]
    n_floor = max(len(firsts), int(len(names) * floor_fraction))
    floor_groups = set(firsts + rest[: max(0, n_floor - len(firsts))])
    floor = [v for g in names if g in floor_groups for v in by_group[g]]
    reference = [v for g in names if g not in floor_groups for v in by_group[g]]
    n_ref = len({group.get(v.name, v.name) for v in reference})
    if n_ref < 2 or len(floor) < 2:
        raise MetricsError(
            f"{len(names)} real patients, {len(firsts)} of them sources of synthetic volumes (always in the floor): "
            f"the floor has {len(floor)} volume(s) of {len(floor_groups)} patient(s), the reference {len(reference)} "
            f"of {n_ref}; the floor needs >= 2 volumes and the reference >= 2 patients. metrics.floor_fraction "
            f"(now {floor_fraction}) sets the floor's share of the patients: change it, or add real cases (demo: "
            "data.demo.n_scans >= 4)"
        )
    return floor, reference


def check_synthetic_set(n_test: int, per_layout: int, metrics_per_layout: int | None = None) -> None:
    """The eval run must give the distribution metrics >= 2 synthetic volumes (``n_test`` test layouts x
    ``per_layout`` samples, of which they take ``metrics_per_layout``: ``metrics.samples_per_layout``); checked when
    the workflow is parsed, not after training and sampling."""
    if n_test == 0:
        raise MetricsError(
            "the test split is empty: the synthetic volumes are sampled for its layouts; give split.test > 0 (a "
            "subset gets a patient once there is one patient per subset with a non-zero fraction)"
        )
    if n_test * per_layout < 2:
        raise MetricsError(
            f"{n_test} test case(s) x {per_layout} sample(s) per layout: the distribution metrics need >= 2 synthetic "
            "volumes; raise sample.eval_samples_per_layout (or split.test)"
        )
    if metrics_per_layout is not None and n_test * min(per_layout, metrics_per_layout) < 2:
        raise MetricsError(
            f"{n_test} test case(s) x metrics.samples_per_layout {metrics_per_layout}: the distribution metrics need "
            ">= 2 synthetic volumes; raise split.test (or metrics.samples_per_layout, which biases them upward)"
        )
