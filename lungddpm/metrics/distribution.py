"""Distribution distances: between two sets of feature vectors, FID, Gaussian-kernel MMD and KID (``a: [Na, D]``
and ``b: [Nb, D]`` float arrays, computed in float64); between two samples of values, Wasserstein-1 (``w1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import numpy as np


def w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between the empirical distributions of two non-empty samples ``a: [Na]``, ``b: [Nb]``,
    as ``scipy.stats.wasserstein_distance``. Integer values (HU) take a sort-free exact path: the CDFs are steps
    at integers, so W1 is the sum over 1-wide bins of |F_a - F_b| (the demo's lesion fidelity: 18 s -> 3 s)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi - lo > 1e6 or not (np.array_equal(a, np.round(a)) and np.array_equal(b, np.round(b))):
        from scipy.stats import wasserstein_distance

        return float(wasserstein_distance(a, b))
    n = int(hi - lo) + 1
    fa = np.cumsum(np.bincount((a - lo).astype(np.int64), minlength=n)) / a.size
    fb = np.cumsum(np.bincount((b - lo).astype(np.int64), minlength=n)) / b.size
    return float(np.abs(fa - fb)[:-1].sum())


def _check(a: np.ndarray, b: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < minimum:
        raise ValueError(f"need at least {minimum} samples per set, got {len(a)} and {len(b)}")
    return a, b


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``a`` and ``b`` (unbiased covariances).

    Exact and fast for N << D: with centred data A, B, tr sqrt(Σa Σb) is the nuclear norm of A Bᵀ divided by
    sqrt((Na - 1)(Nb - 1)), so only an [Na, Nb] SVD is needed instead of a [D, D] matrix square root.
    """
    a, b = _check(a, b, 2)
    ca, cb = a - a.mean(0), b - b.mean(0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / scale
    tr_a = np.einsum("ij,ij->", ca, ca) / (len(a) - 1)
    tr_b = np.einsum("ij,ij->", cb, cb) / (len(b) - 1)
    mean = a.mean(0) - b.mean(0)
    return float(max(mean @ mean + tr_a + tr_b - 2 * cross, 0.0))


def _pairwise_sq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.maximum(d, 0.0)


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = len(kxx), len(kyy)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def median_bandwidth(a: np.ndarray, b: np.ndarray) -> float:
    """Median of the pairwise Euclidean distances of the pooled set (the median heuristic)."""
    z = np.concatenate([a, b])
    d = np.sqrt(_pairwise_sq(z, z))[np.triu_indices(len(z), 1)]
    med = float(np.median(d))
    return med if med > 0 else 1.0


def mmd(a: np.ndarray, b: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the Gaussian kernel exp(-|x - y|² / (2 σ²)); σ = median pairwise distance of
    the pooled set unless given (as HA-GAN's evaluation). ≈ 0 for sets from one distribution (may be < 0)."""
    a, b = _check(a, b, 2)
    sigma = median_bandwidth(a, b) if bandwidth is None else bandwidth

    def k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.exp(-_pairwise_sq(x, y) / (2 * sigma**2))

    return _mmd2_unbiased(k(a, a), k(b, b), k(a, b))


def kid(a: np.ndarray, b: np.ndarray, subset_size: int = 100, n_subsets: int = 100, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased squared MMD with the cubic polynomial kernel (xᵀy / D + 1)³, averaged
    over ``n_subsets`` random subsets of ``min(subset_size, Na, Nb)`` samples of each set (all of them once when
    both sets hold exactly that many; sets of unequal size are subsampled to the smaller, as torchmetrics' KID does,
    so a larger reference adds Monte Carlo noise of the draw). Unbiased in N, hence the headline at small N."""
    a, b = _check(a, b, 2)
    dim = a.shape[1]
    m = min(subset_size, len(a), len(b))

    def k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / dim + 1) ** 3

    if m == len(a) == len(b):
        return _mmd2_unbiased(k(a, a), k(b, b), k(a, b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        vals.append(_mmd2_unbiased(k(x, x), k(y, y), k(x, y)))
    return float(np.mean(vals))


DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"fid": fid, "mmd": mmd, "kid": kid}


def group_members(groups: Sequence[object]) -> list[np.ndarray]:
    """The row indices of each distinct label of ``groups`` (one label per row), in order of first appearance."""
    labels = list(dict.fromkeys(groups))
    return [np.flatnonzero([g == label for g in groups]) for label in labels]


def unit_halves(units: Sequence[object], seed: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Row indices of two disjoint halves (A, B) of rows labelled by ``units`` (e.g. the patient of each nodule): the
    units in a seeded order, A the shortest run of them from the start whose rows come closest to half, B the rest;
    a unit's rows all in one half (one row per unit: the seeded halves of the rows). Under two units: ([], all)."""
    members = group_members(units)
    if len(members) < 2:
        return [], list(range(len(units)))
    order = np.random.default_rng(seed).permutation(len(members))
    held = np.cumsum([len(members[u]) for u in order])[:-1]  # rows in A when it takes the first 1, 2, ... units
    cut = int(np.argmin(np.abs(held - len(units) / 2))) + 1
    half_a, half_b = ([int(i) for u in part for i in members[u]] for part in (order[:cut], order[cut:]))
    return half_a, half_b


def cluster_draw(members: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Row indices of one cluster-bootstrap resample: as many groups as there are, drawn with replacement, whole."""
    return np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])


def bootstrap_excess(
    distance: Callable[[np.ndarray, np.ndarray], float],
    a: np.ndarray,
    floor: np.ndarray,
    b: np.ndarray,
    n_boot: int,
    level: float = 0.95,
    seed: int | Sequence[int] = 0,
    groups: Sequence[Sequence[object] | None] = (None, None, None),
    min_distinct: int = 2,
) -> tuple[float, float, float]:
    """(value, low, high): ``distance(a, b) - distance(floor, b)`` and a paired percentile bootstrap interval: each
    resample draws ``a``, ``floor`` and ``b`` with replacement (by whole groups where ``groups`` (of a, floor, b)
    give labels; a grouped set of one group: no interval, NaN) and measures both distances to the same resampled
    ``b``. Resampling duplicates rows, which biases kernel distances upward at small N, so a distance's own interval
    can lie above its value; the bias is common to both terms of the difference, whose interval is what tells a
    synthetic set from the real-vs-real floor."""
    value = distance(a, b) - distance(floor, b)
    members = [_members(g, len(x), name) for g, x, name in zip(groups, (a, floor, b), ("a", "floor", "b"))]
    if draws_only_itself(members, min_distinct):
        return value, float("nan"), float("nan")
    draws = resamples(np.random.default_rng(seed), (len(a), len(floor), len(b)), members, min_distinct)
    boots = [distance(a[ia], b[ib]) - distance(floor[ifl], b[ib]) for ia, ifl, ib in islice(draws, n_boot)]
    return percentile_interval(value, boots, level)


def _members(groups: Sequence[object] | None, rows: int, what: str) -> list[np.ndarray] | None:
    if groups is None:
        return None
    if len(groups) != rows:
        raise ValueError(f"{what} has {len(groups)} labels for {rows} rows")
    return group_members(groups)


def draws_only_itself(members: Sequence[list[np.ndarray] | None], min_distinct: int = 1) -> bool:
    """A set resampled by groups that draws itself every time: one group (one patient), or groups too few and small
    for a resample without one of them to keep ``min_distinct`` distinct rows (two one-volume patients at 2: every
    kept resample is the set reordered). Its zero-width share of the interval would look exact, so the interval is
    undefined (NaN) instead."""
    return any(m is not None and (len(m) < 2 or sum(map(len, m)) - min(map(len, m)) < min_distinct) for m in members)


def resamples(
    rng: np.random.Generator, sizes: Sequence[int], members: Sequence[list[np.ndarray] | None], min_distinct: int
) -> Iterator[tuple[np.ndarray, ...]]:
    """Endless bootstrap resamples of several sets at once, one index array per set (of ``sizes[i]`` rows): drawn
    with replacement, by whole groups where ``members[i]`` is given; a resample leaving fewer than ``min_distinct``
    distinct rows in any set is drawn again (1: every resample is kept)."""
    while True:
        draw = tuple(rng.integers(0, n, n) if m is None else cluster_draw(m, rng) for n, m in zip(sizes, members))
        if min(len(set(i)) for i in draw) >= min_distinct:
            yield draw


def percentile_interval(value: float, boots: Sequence[float], level: float) -> tuple[float, float, float]:
    """(value, low, high): the central ``level`` percentile interval of the bootstrap statistics ``boots`` (none:
    no interval, NaN)."""
    if len(boots) == 0:
        return value, float("nan"), float("nan")
    alpha = (1 - level) / 2
    return value, float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


def bootstrap_distance(
    distance: Callable[[np.ndarray, np.ndarray], float],
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int,
    level: float = 0.95,
    seed: int | Sequence[int] = 0,
    min_distinct: int = 2,
    groups_a: Sequence[object] | None = None,
    groups_b: Sequence[object] | None = None,
) -> tuple[float, float, float]:
    """(value, low, high): ``distance(a, b)`` and a percentile bootstrap interval from resampling each set with
    replacement (resamples that leave fewer than ``min_distinct`` distinct rows in a set are drawn again: a feature
    covariance needs 2; 1 for a distance defined on any one row, which a set of one row needs). With ``groups_a``
    (one label per row of ``a``), ``a`` is resampled by whole groups (a cluster bootstrap: the k samples of one
    layout, or the series of one patient, are one draw), and ``b`` likewise with ``groups_b`` (a set of one group
    has no interval: NaN); with every label distinct it is the plain bootstrap, draw for draw."""
    value = distance(a, b)
    members = [_members(groups_a, len(a), "groups_a"), _members(groups_b, len(b), "groups_b")]
    if draws_only_itself(members, min_distinct):
        return value, float("nan"), float("nan")
    draws = resamples(np.random.default_rng(seed), (len(a), len(b)), members, min_distinct)
    return percentile_interval(value, [distance(a[ia], b[ib]) for ia, ib in islice(draws, n_boot)], level)
