from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from scipy.stats import wasserstein_distance

from lungddpm.metrics.distribution import bootstrap_distance, bootstrap_excess, fid, kid, median_bandwidth, mmd, w1


def fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula in float64 with scipy's matrix square root."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


@pytest.mark.parametrize(("n", "dim"), [(40, 6), (12, 64), (7, 2048)])
def test_fid_matches_float64_scipy_reference(n: int, dim: int) -> None:
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim))
    b = rng.normal(0.3, 1.2, size=(n + 3, dim))
    if dim <= 64:
        assert fid(a, b) == pytest.approx(fid_reference(a, b), rel=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8 * dim)
    assert fid(a, b) > fid(a, a + 1e-3)


def test_fid_of_known_gaussians() -> None:
    # two isotropic sets: the distance grows with the squared mean shift
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 3))
    shifted = fid(a, a + np.array([2.0, 0.0, 0.0]))
    assert shifted == pytest.approx(4.0, rel=1e-9)


def test_mmd_zero_for_identical_sets_and_grows_with_shift() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 16))
    b = rng.normal(size=(30, 16))
    base = mmd(a, b)
    assert abs(mmd(a, a)) < 0.05
    values = [mmd(a, b + s) for s in (0.5, 1.0, 2.0)]
    assert base < values[0] < values[1] < values[2]
    assert median_bandwidth(a, a) > 0


def test_kid_unbiased_near_zero_and_grows_with_shift() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 32)), rng.normal(size=(50, 32))
    assert abs(kid(a, b, subset_size=25, n_subsets=20)) < 0.05
    assert kid(a, b + 1.0, subset_size=25, n_subsets=20) > 0.5
    assert kid(a[:3], b[:3] + 1.0) > 0  # small sets: all of them, once


def test_bootstrap_distance_interval_and_errors() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 4)), rng.normal(1.0, 1.0, size=(20, 4))
    value, lo, hi = bootstrap_distance(fid, a, b, n_boot=50)
    assert lo <= value <= hi and hi > lo
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid(a[:1], b)
    with pytest.raises(ValueError, match="same D"):
        mmd(a, b[:, :3])


def mean_gap(a: np.ndarray, b: np.ndarray) -> float:
    """|mean of a's first feature - mean of b's|: a distance whose value k copies of every row leave unchanged."""
    return abs(float(a[:, 0].mean() - b[:, 0].mean()))


def test_bootstrap_distance_resamples_whole_groups() -> None:
    """k copies of one row per layout (the k samples sharing a real background): the cluster bootstrap gives the
    interval of one row per layout, where resampling rows would make it ~sqrt(k) narrower."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(200, 3))  # b large: a dominates the width
    k = 4
    copies, layouts = np.repeat(a, k, axis=0), np.repeat(np.arange(len(a)), k)
    one = bootstrap_distance(mean_gap, a, b, 400, 0.9, seed=3)
    grouped = bootstrap_distance(mean_gap, copies, b, 400, 0.9, seed=3, groups_a=layouts)
    naive = bootstrap_distance(mean_gap, copies, b, 400, 0.9, seed=3)
    assert grouped == pytest.approx(one, rel=1e-9)
    assert naive[0] == pytest.approx(one[0], rel=1e-9)
    assert (naive[2] - naive[1]) < 0.7 * (one[2] - one[1])  # the row bootstrap: ~1/sqrt(k) too narrow
    distinct = bootstrap_distance(fid, a, b, 30, seed=1, groups_a=[f"case{i}" for i in range(len(a))])
    assert distinct == bootstrap_distance(fid, a, b, 30, seed=1)  # every label distinct: the plain bootstrap
    with pytest.raises(ValueError, match="3 labels for 12 rows"):
        bootstrap_distance(fid, a, b, 5, groups_a=[0, 1, 2])


def test_bootstrap_excess_is_paired_and_groups_each_set() -> None:
    """The excess distance(a, b) - distance(floor, b) with a paired interval: near 0 for a floor drawn like a,
    above 0 for a shifted a; by groups, k copies of each row give the interval of one row each."""
    rng = np.random.default_rng(7)
    b, floor = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    same, shifted = rng.normal(size=(30, 3)), rng.normal(1.5, 1.0, size=(30, 3))
    value, lo, hi = bootstrap_excess(mean_gap, same, floor, b, 300, 0.9, seed=1)
    assert value == pytest.approx(mean_gap(same, b) - mean_gap(floor, b)) and lo < 0 < hi
    value, lo, hi = bootstrap_excess(mean_gap, shifted, floor, b, 300, 0.9, seed=1)
    assert value > 1.0 and lo > 0.5
    k = 3
    grouped = bootstrap_excess(mean_gap, np.repeat(shifted, k, axis=0), floor, b, 300, 0.9, seed=1,
                               groups=(np.repeat(np.arange(30), k), None, None))  # fmt: skip
    assert grouped == pytest.approx((value, lo, hi), rel=1e-9)


def test_a_set_that_can_only_draw_itself_has_no_interval() -> None:
    """Two one-volume patients, resampled keeping 2 distinct rows (FID's covariance): every kept draw is the set
    reordered, so the interval had zero width at the value ([12.43, 12.43] for an excess), as if exact; NaN now,
    as for a set of one patient. Two patients of two volumes each, or three of one, can vary: an interval."""
    rng = np.random.default_rng(2)
    a, floor, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(0.4, 1.0, size=(2, 3))
    units = (["p1", "p2"], ["p3", "p4"], ["p5", "p6"])
    value, lo, hi = bootstrap_excess(fid, a, floor, b, 50, seed=0, groups=units)
    assert value == pytest.approx(fid(a, b) - fid(floor, b)) and np.isnan(lo) and np.isnan(hi)
    assert np.isnan(bootstrap_distance(fid, a, b, 50, seed=0, groups_a=units[0], groups_b=units[2])[1])
    four, three = rng.normal(size=(4, 3)), rng.normal(size=(3, 3))
    lo, hi = bootstrap_distance(fid, four, three, 50, seed=0, groups_a=["p1", "p1", "p2", "p2"],
                                groups_b=["p3", "p4", "p5"])[1:]  # fmt: skip
    assert lo < hi


def test_w1_equals_scipy_on_integer_and_float_samples() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):  # integer HU: the sort-free path
        a = rng.integers(-1024, 400, rng.integers(1, 500)).astype(np.int16)
        b = rng.integers(-900, 600, rng.integers(1, 500)).astype(np.float32)
        assert w1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-12, abs=1e-9)
    a, b = rng.normal(size=200), rng.normal(0.5, 2.0, size=80)  # fractions: scipy's path
    assert w1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-12)
    assert w1(np.array([3.0]), np.array([3.0])) == 0.0 and w1(np.array([0.0]), np.array([-40.0])) == 40.0


def test_no_resample_gives_no_interval_rather_than_an_index_error() -> None:
    """bootstrap_ci(values, 0) raised IndexError from np.quantile([]) (the schema keeps the workflow at >= 10)."""
    from lungddpm.metrics.distribution import percentile_interval
    from lungddpm.metrics.voxel import bootstrap_ci

    value, low, high = bootstrap_ci([1.0, 2.0, 3.0], 0)
    assert value == 2.0 and np.isnan(low) and np.isnan(high)
    assert percentile_interval(1.5, [1.0, 2.0], 0.5) == (1.5, 1.25, 1.75)
