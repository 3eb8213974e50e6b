from __future__ import annotations

import numpy as np
import pytest

from lungddpm.metrics.voxel import bootstrap_ci, hu_histogram_distance, region_mse


def test_region_metrics_known_answers() -> None:
    real = np.zeros((4, 4, 4))
    syn = real.copy()
    mask = np.zeros_like(real, dtype=bool)
    mask[:2] = True
    syn[:2] += 10.0
    syn[2:] += 1000.0  # outside the region: ignored
    assert region_mse(real, syn, mask) == pytest.approx(100.0)
    assert hu_histogram_distance(real, syn, mask) == pytest.approx(10.0)  # a shift moves every voxel by 10 HU
    assert hu_histogram_distance(real, np.flip(real), mask) == 0.0
    with pytest.raises(ValueError, match="empty mask"):
        region_mse(real, syn, np.zeros_like(mask))


def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(0).normal(5.0, 1.0, 200)
    m, lo, hi = bootstrap_ci(values)
    assert lo < m < hi and lo > 4.6 and hi < 5.4
    assert bootstrap_ci([3.0, 3.0]) == (3.0, 3.0, 3.0)
