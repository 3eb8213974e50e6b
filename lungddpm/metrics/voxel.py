"""Paired voxel metrics on HU volumes, restricted to a region (e.g. the lungs), and bootstrap intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import wasserstein_distance


def region_mse(real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared HU difference inside ``mask`` (all [Z, Y, X])."""
    if not mask.any():
        raise ValueError("region_mse: empty mask")
    d = real[mask].astype(np.float64) - synthetic[mask].astype(np.float64)
    return float(np.mean(d * d))


def hu_histogram_distance(real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> float:
    """Wasserstein-1 distance (HU) between the HU distributions inside ``mask``: 0 for identical histograms,
    the mean shift for a shifted one."""
    if not mask.any():
        raise ValueError("hu_histogram_distance: empty mask")
    return float(wasserstein_distance(real[mask].astype(np.float64), synthetic[mask].astype(np.float64)))


def bootstrap_ci(
    values: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float, float]:
    """(statistic, low, high) percentile bootstrap interval of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = np.array([statistic(v[rng.integers(0, v.size, v.size)]) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    return float(statistic(v)), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))
