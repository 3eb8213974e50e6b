"""Scoring of nodule segmentations on the real test split, and the comparison of arms.

Per test case and model (seed x fold): voxel Dice, sensitivity and specificity of the nodule mask, and nodule-level
detection — a true nodule (an instance of ``nodules.nii.gz``, or a connected nodule component of an ROI's layout)
is found when one predicted connected component overlaps it by ``min_overlap_voxels`` (all of it, if smaller); a
predicted component that touches no nodule is a false positive. At the lesion scale a test case is an ROI:
nodule ROIs give Dice, sensitivity and the detection of their own nodule (a neighbour seen in the ROI counts in the
voxels only), nodule-free ROIs the false-positive components (``fp_per_free_roi``).
Per arm: each case's scores are averaged over the arm's models, then the mean over cases gets a percentile
bootstrap interval; each arm is compared with the baseline arm per test case (paired difference with a bootstrap
interval and a Wilcoxon signed-rank or paired t-test). Cases of one cluster — the jittered ROIs of one nodule, or
with ``evaluation.cluster: patient`` every ROI of a patient; at the whole scale the CTs of one patient — are
resampled together and tested as one pair (their mean difference); a mean is still over the cases. Nodule detection
sensitivity weighs each case by its true nodules (nodules found over nodules, not a mean of per-scan rates); a case
without a true nodule gives no Dice, sensitivity or detection, only its false positives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

from ..atomic import atomic_path
from ..errors import LungDDPMError
from ..io import read_csv, read_header, read_json, read_volume, write_csv
from ..metrics.distribution import group_members
from ..metrics.voxel import bootstrap_ci, dice
from ..preprocessing.layout import NODULE
from ..preprocessing.rois import own_nodule
from .arms import EvaluationConfig
from .datasets import EvalCase

log = logging.getLogger(__name__)

METRICS = ("dice", "sensitivity", "specificity", "detection_sensitivity", "false_positives")
SCORE_COLUMNS = ("arm", "seed", "fold", "case_id", "kind", "cluster", *METRICS, "n_nodules", "n_found", "n_components",
                 "truth_voxels", "pred_voxels", "tp", "fp", "fn")  # fmt: skip
COMPARISON_COLUMNS = ("arm", "metric", "n_cases", "n_clusters", "n_models", "mean", "ci_low", "ci_high", "models_sd",
                      "baseline", "diff", "diff_ci_low", "diff_ci_high", "p_value", "test")  # fmt: skip
FP_METRIC = {"scan": "fp_per_scan", "free": "fp_per_free_roi"}  # the mean of false_positives over those cases
ROUNDING = 1e-9  # a mean difference this small is float rounding of an exact 0 (the metrics are fractions, counts)
PLOTTED = (("dice", "Dice"), ("sensitivity", "voxel sensitivity"), ("detection_sensitivity", "nodule detection"))


def voxel_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, sensitivity (NaN without true voxels), specificity (NaN without negatives) and the voxel counts."""
    p, t = pred.astype(bool), truth.astype(bool)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    tn = p.size - tp - fp - fn
    return {
        "dice": dice(p, t),
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "truth_voxels": tp + fn,
        "pred_voxels": tp + fp,
    }


def detection(pred: np.ndarray, nodules: np.ndarray, connectivity: int = 3, min_overlap: int = 1) -> dict[str, float]:
    """Nodule-level detection of the instance map ``nodules`` (0 = none, 1..n) by the mask ``pred`` [Z, Y, X].

    A nodule is found when a single predicted component (``connectivity`` 1-3, as scipy's) overlaps it by
    ``min_overlap`` voxels (or all of it, where it is smaller); a component touching no nodule is a false positive
    (one on a nodule by fewer voxels finds nothing, but is no false positive: a fragment of a found nodule counted
    as one where ``min_overlap`` was raised).
    Returns n_nodules, n_found, n_components, false_positives and detection_sensitivity (NaN without nodules).
    """
    if pred.shape != nodules.shape:
        raise ValueError(f"prediction {pred.shape} and nodule map {nodules.shape} differ in shape")
    components, n_comp = ndimage.label(pred.astype(bool), structure=ndimage.generate_binary_structure(3, connectivity))
    ids = [int(i) for i in np.unique(nodules) if i != 0]
    found = 0
    for i in ids:
        inside = components[nodules == i]
        hits = np.bincount(inside, minlength=n_comp + 1)[1:]
        found += int((hits >= min(min_overlap, inside.size)).any())  # a nodule smaller: all of it
    on_nodules = np.unique(components[(nodules > 0) & (components > 0)])
    return {
        "n_nodules": len(ids),
        "n_found": found,
        "n_components": int(n_comp),
        "false_positives": int(n_comp - on_nodules.size),
        "detection_sensitivity": found / len(ids) if ids else math.nan,
    }


def score_case(pred: np.ndarray, nodules: np.ndarray, ev: EvaluationConfig, kind: str = "scan") -> dict[str, float]:
    """Every per-case score of a predicted mask against the instance map of the true nodules. A ``kind`` "nodule"
    ROI has no false-positive count (NaN) and detects its own nodule, instance 1 (:func:`truth_instances`; Dice and
    sensitivity are over every nodule voxel); a "free" ROI, and a scan without a true nodule, only that one (the rest
    NaN: an empty truth gives Dice 1 or 0 by whether one voxel is predicted, a false positive counted twice)."""
    own = np.where(nodules == 1, 1, 0) if kind == "nodule" else nodules  # a nodule ROI detects its own nodule
    scores = {**voxel_scores(pred, nodules > 0), **detection(pred, own, ev.connectivity, ev.min_overlap_voxels)}
    if kind == "free" or not scores["truth_voxels"]:  # no true nodule: only the false positives count (no Dice)
        scores.update(dice=math.nan, sensitivity=math.nan, detection_sensitivity=math.nan)
    if kind == "nodule":  # (its empty truth was scored Dice 1 or 0 until 2026-12-08)
        scores["false_positives"] = math.nan
    return scores


def truth_instances(case: EvalCase) -> np.ndarray:
    """The instance map of a test case's true nodules: ``nodules.nii.gz`` as written, or the 26-connected
    components of an ROI layout's nodule label (``evaluation.connectivity`` is the predictions' alone); in a nodule
    ROI its own nodule (:func:`~lungddpm.preprocessing.rois.own_nodule`) is 1 and a neighbour in the ROI 2, 3, ..."""
    volume, geometry = read_volume(case.truth)
    if case.kind == "scan":
        return volume
    labels = ndimage.label(volume == NODULE, structure=ndimage.generate_binary_structure(3, 3))[0].astype(np.int32)
    if case.kind != "nodule" or labels.max() <= 1:
        return labels
    own = own_nodule(labels > 0, geometry, dict(case.own))
    others = ndimage.label((labels > 0) & ~own, structure=ndimage.generate_binary_structure(3, 3))[0]
    return np.where(own, 1, np.where(others > 0, others + 1, 0)).astype(np.int32)


def score_arm(arm: str, runs: Sequence[Path], tests: Sequence[EvalCase], out: Path, ev: EvaluationConfig) -> list[dict]:
    """Score every model (``run.json`` of segment_train) of ``arm`` on every test case; write ``scores.csv``.

    tests: the test set (:mod:`.datasets`). One row per model x case, columns SCORE_COLUMNS.
    """
    rows: list[dict[str, Any]] = []
    truth, files = {t.identifier: truth_instances(t) for t in tests}, {t.identifier: t.truth for t in tests}
    kinds = {t.identifier: t.kind for t in tests}
    clusters = {t.identifier: t.cluster or t.identifier for t in tests}
    for run_path in runs:
        run = read_json(run_path)
        if run["arm"] != arm:
            raise LungDDPMError(f"{run_path}: a run of arm {run['arm']!r}, expected {arm!r}; rerun segment_train")
        if sorted(run["predictions"]) != sorted(truth):
            raise LungDDPMError(
                f"{run_path}: predicts {sorted(run['predictions'])} but the test split is {sorted(truth)}; rerun "
                "segment_train"
            )
        for case, pred_path in sorted(run["predictions"].items()):
            (pred, grid), (shape, truth_grid) = read_volume(pred_path), read_header(files[case])
            if pred.shape != truth[case].shape or not grid.same_grid(truth_grid):  # a test ROI remade since: moved
                raise LungDDPMError(f"{pred_path}: grid {pred.shape} at {grid.origin}, but its truth {files[case]} "
                                    f"is {shape} at {truth_grid.origin}; rerun segment_train")  # fmt: skip
            scores = score_case(pred > 0, truth[case], ev, kinds[case])
            rows.append({"arm": arm, "seed": run["seed"], "fold": run["fold"], "case_id": case, "kind": kinds[case],
                         "cluster": clusters[case], **scores})  # fmt: skip
    write_csv(out, rows, SCORE_COLUMNS, digits=17)  # exact: the comparison averages and differences them
    for metric in ("dice", "sensitivity", "detection_sensitivity", "false_positives"):
        kept = [r for r in rows if not math.isnan(r[metric])]
        w = [r["n_nodules"] if metric == "detection_sensitivity" else 1 for r in kept]  # nodules found / nodules
        mean = np.average([r[metric] for r in kept], weights=w) if kept and sum(w) else math.nan
        log.info("arm %s: mean %s %.4f over %d case x model(s)", arm, metric, mean, len(kept))
    return rows


def read_scores(path: Path) -> list[dict[str, Any]]:
    """``scores.csv`` -> rows with numbers parsed (empty cells -> NaN)."""
    if not Path(path).is_file():
        raise LungDDPMError(
            f"{path}: no scores table; score the arm first (lungddpm segment score: rule segment_score)"
        )
    rows = read_csv(path)
    if not rows:
        raise LungDDPMError(f"{path}: no scores; rerun segment_score")
    missing = [k for k in ("kind", "cluster", *METRICS, "n_nodules") if k not in rows[0]]
    if missing:
        raise LungDDPMError(f"{path}: no column {', '.join(missing)} (a table of older code?); rerun segment_score")
    for r in rows:
        for k in METRICS:
            r[k] = float(r[k]) if r[k] != "" else math.nan
    return rows


def per_case(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """Case -> the metric averaged over the arm's models (NaN-aware; NaN when no model defines it)."""
    by_case: dict[str, list[float]] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], []).append(float(r[metric]))
    return {c: float(np.nanmean(v)) if not np.all(np.isnan(v)) else math.nan for c, v in sorted(by_case.items())}


def _models_sd(rows: Sequence[Mapping[str, Any]], metric: str, weight: Mapping[str, float] | None = None) -> float:
    """Standard deviation, over the arm's models, of each model's mean over cases (weighted by ``weight``, case ->
    its nodules, as the arm's mean is; NaN with one model)."""
    by_model: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        w = 1.0 if weight is None else weight[r["case_id"]]
        by_model.setdefault((str(r["seed"]), str(r["fold"])), []).append((float(r[metric]), w))
    means = []
    for pairs in by_model.values():
        v, w = np.array(pairs).T
        ok = ~np.isnan(v) & (w > 0)
        if ok.any():
            means.append(float(np.average(v[ok], weights=w[ok])))
    return float(np.std(means, ddof=1)) if len(means) > 1 else math.nan


def _weighted_ci(
    values: np.ndarray, weights: np.ndarray | None, ev: EvaluationConfig, seed: int, groups: Sequence[str]
) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` weighted by ``weights`` (None: plain) with the cluster bootstrap of ``groups``:
    detection sensitivity weighs each case by its nodules, so that its mean is nodules found over nodules."""
    if weights is None:
        return bootstrap_ci(values, ev.bootstrap, ev.ci_level, seed, groups=groups)

    def weighted(idx: np.ndarray) -> float:
        i = idx.astype(int)
        return float(np.average(values[i], weights=weights[i])) if weights[i].sum() > 0 else math.nan

    return bootstrap_ci(np.arange(values.size, dtype=float), ev.bootstrap, ev.ci_level, seed, weighted, groups)


def exact_zeros(values: Any) -> np.ndarray:
    """``values`` with each below :data:`ROUNDING` in size set to 0 (float rounding of an exact zero difference, e.g.
    1/3 - 1/3 of k/3 found by 3 models: 1.85e-17); NaN kept."""
    values = np.asarray(values, dtype=float)
    return np.where(np.abs(values) < ROUNDING, 0.0, values)


def paired_test(diffs: np.ndarray, test: str) -> float:
    """Two-sided p-value that the paired differences are centred on 0 (NaN with fewer than 2 pairs, and for the t-test
    when every difference is the same non-zero value)."""
    if diffs.size < 2:
        return math.nan
    diffs = exact_zeros(diffs)
    if not np.any(diffs != 0):
        return 1.0
    if test == "wilcoxon":
        return float(stats.wilcoxon(diffs).pvalue)
    if np.allclose(diffs, diffs[0], rtol=1e-12, atol=0):  # equal non-zero differences: no variance to test against
        return math.nan
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def compare_arms(
    scores: Mapping[str, Path], baseline: str, table: Path, figure: Path | None, ev: EvaluationConfig
) -> list[dict[str, Any]]:
    """scores: arm -> its ``scores.csv`` (in the configured order). Writes ``table`` (one row per arm x metric,
    columns COMPARISON_COLUMNS) and ``figure`` (bars with confidence intervals; None = none); returns the rows."""
    if baseline not in scores:
        raise LungDDPMError(f"baseline arm {baseline!r} has no scores; arms: {sorted(scores)}")
    data = {arm: read_scores(p) for arm, p in scores.items()}
    base_ids = {r["case_id"] for r in data[baseline]}
    for arm, rows in data.items():  # a mean over other cases than the paired difference's would mislead
        if (ids := {r["case_id"] for r in rows}) != base_ids:
            raise LungDDPMError(
                f"{scores[arm]}: arm {arm!r} scores {len(ids)} test case(s), baseline {baseline!r} {len(base_ids)}: "
                f"missing {sorted(base_ids - ids)[:5]}, extra {sorted(ids - base_ids)[:5]}; rerun segment_score for "
                f"arm {arm!r} (and {baseline!r}) on the same test split"
            )
    truth = {r["case_id"]: (r["cluster"], float(r["n_nodules"])) for r in data[baseline]}  # the same in every arm
    for arm, rows in data.items():  # (not the last arm's clusters for every arm, unchecked)
        if odd := [r for r in rows if (r["cluster"], float(r["n_nodules"])) != truth[r["case_id"]]]:
            raise LungDDPMError(
                f"{scores[arm]}: arm {arm!r} gives case {odd[0]['case_id']} cluster {odd[0]['cluster']!r} and "
                f"{odd[0]['n_nodules']} nodule(s), {scores[baseline]} {truth[odd[0]['case_id']]} (other evaluation."
                "cluster settings or test truth); rerun segment_score for every arm"
            )
    cluster, nodules = {c: t[0] for c, t in truth.items()}, {c: t[1] for c, t in truth.items()}
    lesion = any(r.get("kind") in ("nodule", "free") for r in data[baseline])  # ROIs, even with no free ROI
    fp_name = FP_METRIC["free" if lesion else "scan"]
    base_cases = {m: per_case(data[baseline], m) for m in METRICS}
    out: list[dict[str, Any]] = []
    for arm, rows in data.items():
        n_models = len({(r["seed"], r["fold"]) for r in rows})
        for i, metric in enumerate(METRICS):
            cases = {c: v for c, v in per_case(rows, metric).items() if not math.isnan(v)}
            vals, groups = np.array(list(cases.values())), [cluster[c] for c in cases]
            weight = nodules if metric == "detection_sensitivity" else None
            w = None if weight is None else np.array([weight[c] for c in cases])
            mean, lo, hi = _weighted_ci(vals, w, ev, ev.seed + i, groups) if vals.size else (math.nan,) * 3
            row: dict[str, Any] = {
                "arm": arm,
                "metric": fp_name if metric == "false_positives" else metric,
                "n_cases": int(vals.size),
                "n_clusters": len(set(groups)),
                "n_models": n_models,
                "mean": mean,
                "ci_low": lo,
                "ci_high": hi,
                "models_sd": _models_sd(rows, metric, weight),
                "baseline": baseline,
                "diff": math.nan,
                "diff_ci_low": math.nan,
                "diff_ci_high": math.nan,
                "p_value": math.nan,
                "test": "",
            }
            if arm != baseline:
                common = sorted(c for c in cases if not math.isnan(base_cases[metric].get(c, math.nan)))
                d = np.array([cases[c] - base_cases[metric][c] for c in common])
                if d.size:
                    g = [cluster[c] for c in common]
                    wd = None if weight is None else np.array([weight[c] for c in common])
                    diff = exact_zeros(_weighted_ci(d, wd, ev, ev.seed + i, g)).tolist()
                    row["diff"], row["diff_ci_low"], row["diff_ci_high"] = diff
                    # the test pairs independent units: the (weighted) mean difference per cluster (nodule, patient)
                    ones = np.ones(d.size) if wd is None else wd
                    per_cluster = [float(np.average(d[m], weights=ones[m])) for m in group_members(g) if ones[m].sum()]
                    row["p_value"] = paired_test(np.array(per_cluster), ev.paired_test)
                    row["test"] = ev.paired_test
            out.append(row)
    write_csv(table, out, COMPARISON_COLUMNS)
    if figure is not None:
        plot_comparison(out, figure, ev.ci_level)
    for r in out:
        if r["metric"] in ("dice", "sensitivity", "detection_sensitivity"):
            log.info(
                "%s %s: %.4f [%.4f, %.4f] (n=%d)",
                r["arm"],
                r["metric"],
                r["mean"],
                r["ci_low"],
                r["ci_high"],
                r["n_cases"],
            )
    return out


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: Path, ci_level: float) -> None:
    """Grouped bars (one colour per arm) of Dice, voxel sensitivity and nodule detection sensitivity, and a panel of
    false positives per scan, each with its bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    get = {(r["arm"], r["metric"]): r for r in rows}
    fp = next(m for m in FP_METRIC.values() if any(r["metric"] == m for r in rows))
    fig, (ax, ax_fp) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(arms)
    colours = plt.get_cmap("tab10").colors
    for k, arm in enumerate(arms):
        for axis, metrics in ((ax, [m for m, _ in PLOTTED]), (ax_fp, [fp])):
            xs = np.arange(len(metrics)) + (k - (len(arms) - 1) / 2) * width
            means = np.array([get[arm, m]["mean"] for m in metrics], dtype=float)
            lo = np.array([get[arm, m]["ci_low"] for m in metrics], dtype=float)
            hi = np.array([get[arm, m]["ci_high"] for m in metrics], dtype=float)
            err = np.nan_to_num(np.vstack([means - lo, hi - means]), nan=0.0).clip(min=0)
            axis.bar(xs, means, width, yerr=err, capsize=3, color=colours[k % len(colours)], label=arm)  # NaN: none
            for x in xs[np.isnan(means)]:  # a mean with no case to take it over (no free ROI): said, not drawn as 0
                axis.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    n = max((r["n_cases"] for r in rows if r["metric"] == "dice"), default=0)
    lesion = fp == "fp_per_free_roi"
    ax.set_xticks(np.arange(len(PLOTTED)), [label for _, label in PLOTTED])
    ax.set_xlim(-0.5, len(PLOTTED) - 0.5)  # NaN bars give no data limits: every group (and its n/a) in view
    ax_fp.set_xlim(-0.5, 0.5)
    ax_fp.set_ylim(bottom=0)
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6))  # the legend above 1: it hid an interval's top end
    ax.set_ylabel(f"mean over {n} test {'nodule ROI' if lesion else 'case'}(s), {ci_level:.0%} bootstrap CI")
    ax.legend(title="arm", fontsize=8, loc="upper center", ncol=min(len(arms), 3))
    ax_fp.set_xticks([0], ["false positives / free ROI" if lesion else "false positives / scan"])
    ax.set_title(f"nnU-Net v2 nodule segmentation, real test split ({'ROIs' if lesion else 'whole CTs'})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def sweep(
    scores: Mapping[float, Path], table: Path, figure: Path, ev: EvaluationConfig, real_fraction: float
) -> list[dict[str, Any]]:
    """The ``synthetic_fraction`` sweep: scores: fraction -> that arm's ``scores.csv``. Writes ``table`` (the
    comparison table of the sweep's arms against the smallest fraction, plus a ``synthetic_fraction`` column) and
    ``figure`` (Dice, voxel sensitivity and detection against the fraction, with their intervals)."""
    fractions = sorted(scores)
    fraction_of = {f"sweep_{f:g}x": f for f in fractions}  # the fraction itself, not read back from the arm's name
    rows = compare_arms({n: scores[f] for n, f in fraction_of.items()}, f"sweep_{fractions[0]:g}x", table, None, ev)
    for r in rows:
        r["synthetic_fraction"] = fraction_of[r["arm"]]
    write_csv(table, rows, ("synthetic_fraction", *COMPARISON_COLUMNS))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (metric, label) in enumerate(PLOTTED):
        sel = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["synthetic_fraction"])
        xs = np.array([r["synthetic_fraction"] for r in sel]) + (k - 1) * 0.02 * max(fractions[-1], 1)
        mean = np.array([r["mean"] for r in sel], dtype=float)
        err = np.nan_to_num(np.vstack([mean - [r["ci_low"] for r in sel], [r["ci_high"] for r in sel] - mean]))
        ax.errorbar(xs, mean, yerr=err.clip(min=0), marker="o", capsize=3, label=label)
    n = max((r["n_cases"] for r in rows if r["metric"] == "dice"), default=0)
    ax.set_xlabel("synthetic_fraction (synthetic nodule cases / real train nodule cases)")
    ax.set_ylabel(f"mean over {n} test case(s), {ev.ci_level:.0%} bootstrap CI")
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6))  # the legend above 1: it hid an interval's top end
    ax.set_title(f"nnU-Net v2 with synthetic data, {real_fraction:.0%} of the real train data")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return rows
