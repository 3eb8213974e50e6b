"""Downstream nnU-Net segmentation: scoring on hand-made masks, arms, nnU-Net's own dataset check, and the
CI-size workflow's predictions, scores and comparison."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CI_CONFIG, REPO, snakemake
from scipy import stats

from lungddpm import versions
from lungddpm.config import load_config
from lungddpm.diffusion.checkpoint import CheckpointError
from lungddpm.diffusion.precision import cpu_has_native_bf16
from lungddpm.errors import ConfigError, LungDDPMError
from lungddpm.io import Geometry, read_json, read_volume, write_csv, write_json, write_volume
from lungddpm.metrics.voxel import dice
from lungddpm.segmentation import nnunet
from lungddpm.segmentation.arms import Arm, EvaluationConfig, SegmentationConfig, check_arms, segmentation_config
from lungddpm.segmentation.datasets import EvalCase, TrainingCase, eval_set, nested_draw, whole_cases
from lungddpm.segmentation.evaluate import compare_arms, detection, score_arm, voxel_scores
from lungddpm.segmentation.nnunet import dataset_name, export_raw_dataset, prepare_arm, train_arm
from lungddpm.segmentation.nnunet_stages import cpu_autocast_trainer, in_process_pools, without_cpu_autocast

EV = EvaluationConfig(
    connectivity=3, min_overlap_voxels=1, bootstrap=200, ci_level=0.95, paired_test="wilcoxon", seed=0
)
GEOMETRY = Geometry(spacing=(2.5, 1.0, 1.5), origin=(10.0, -20.0, 30.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))


def box(shape: tuple[int, int, int], *slices: slice) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[slices] = True
    return m


# ------------------------------------------------------------------------------------------- scoring
def test_dice_known_answers_and_empty_cases() -> None:
    empty = np.zeros((4, 4, 4), bool)
    a = box((4, 4, 4), slice(0, 1), slice(0, 2), slice(0, 2))  # 4 voxels
    b = box((4, 4, 4), slice(0, 1), slice(0, 2), slice(1, 3))  # 4 voxels, 2 shared
    assert dice(empty, empty) == 1.0  # nothing to find, nothing predicted
    assert dice(a, empty) == 0.0 and dice(empty, a) == 0.0
    assert dice(a, a) == 1.0 and dice(a, b) == pytest.approx(0.5)
    s = voxel_scores(b, a)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 2)
    assert s["sensitivity"] == pytest.approx(0.5) and s["specificity"] == pytest.approx(58 / 60)
    s = voxel_scores(empty, empty)
    assert s["dice"] == 1.0 and math.isnan(s["sensitivity"]) and s["specificity"] == 1.0


def test_a_roi_without_a_true_nodule_has_no_dice_whatever_its_kind() -> None:
    """An empty truth scores no Dice (1 or 0 by whether one voxel is predicted): a scan's and a free ROI's were NaN,
    a nodule ROI's (its nodule lost upstream) read 0 for one stray voxel and 1 for none."""
    from lungddpm.segmentation.evaluate import score_case

    empty, stray = np.zeros((6, 6, 6), np.int32), np.zeros((6, 6, 6), bool)
    stray[0, 0, 0] = True
    for kind in ("scan", "free", "nodule"):
        for pred in (stray, np.zeros_like(stray)):
            s = score_case(pred, empty, EV, kind)
            assert math.isnan(s["dice"]) and math.isnan(s["sensitivity"]), (kind, s)
            assert math.isnan(s["false_positives"]) == (kind == "nodule")  # a nodule ROI counts none
    assert score_case(stray, empty, EV, "free")["false_positives"] == 1


def test_detection_found_missed_and_false_positives() -> None:
    shape = (8, 8, 8)
    nodules = np.zeros(shape, np.uint8)
    nodules[1:3, 1:3, 1:3] = 1
    nodules[5:7, 5:7, 5:7] = 2  # missed
    pred = box(shape, slice(2, 4), slice(2, 4), slice(2, 4))  # overlaps nodule 1 by one voxel
    pred[0, 7, 7] = True  # a false positive far from both
    d = detection(pred, nodules)
    assert (d["n_nodules"], d["n_found"], d["n_components"], d["false_positives"]) == (2, 1, 2, 1)
    assert d["detection_sensitivity"] == pytest.approx(0.5)
    strict = detection(pred, nodules, min_overlap=2)  # a one-voxel touch no longer finds nodule 1
    assert (strict["n_found"], strict["false_positives"]) == (0, 1)  # nor is it a false positive (it was)
    # a nodule found by one component (8 voxels), a 2-voxel fragment touching it by one: never a false positive
    big = np.zeros(shape, np.uint8)
    big[1:6, 1:6, 1:6] = 1
    fragment = box(shape, slice(2, 4), slice(2, 4), slice(2, 4))
    fragment[5, 5, 5] = fragment[5, 5, 6] = True  # (5, 5, 5) on the nodule, (5, 5, 6) beside it
    for k in (1, 5):  # at 5 the fragment counted as a false positive
        d = detection(fragment, big, min_overlap=k)
        assert (d["n_found"], d["n_components"], d["false_positives"]) == (1, 2, 0), k
    # a nodule smaller than min_overlap is found by a component covering all of it (a perfect prediction of a
    # one-voxel nodule was a miss and a false positive)
    tiny = np.zeros(shape, np.uint8)
    tiny[4, 4, 4] = 1
    exact = detection(tiny > 0, tiny, min_overlap=2)
    assert (exact["n_found"], exact["false_positives"]) == (1, 0)
    # two diagonal neighbours: one component with corners (3), two with faces only (1)
    diagonal = np.zeros(shape, bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    no_nodules = np.zeros(shape, np.uint8)
    assert detection(diagonal, no_nodules, connectivity=3)["false_positives"] == 1
    assert detection(diagonal, no_nodules, connectivity=1)["false_positives"] == 2
    assert math.isnan(detection(diagonal, no_nodules)["detection_sensitivity"])
    # one component over two nodules finds both and is no false positive
    both = box(shape, slice(1, 7), slice(1, 7), slice(1, 7))
    assert detection(both, nodules)["n_found"] == 2 and detection(both, nodules)["false_positives"] == 0


def _write_run(tmp: Path, arm: str, seed: int, preds: dict[str, np.ndarray]) -> Path:
    paths = {}
    for case, p in preds.items():
        paths[case] = tmp / arm / f"seed{seed}" / f"{case}.nii.gz"
        write_volume(paths[case], p.astype(np.uint8), GEOMETRY)
    run = tmp / arm / f"seed{seed}" / "run.json"
    write_json(run, {"arm": arm, "seed": seed, "fold": "all", "predictions": {k: str(v) for k, v in paths.items()}})
    return run


def test_score_and_compare_arms_known_answers(tmp_path: Path) -> None:
    shape = (6, 6, 6)
    truth = {}
    for i, case in enumerate(["c1", "c2", "c3"]):
        n = np.zeros(shape, np.uint8)
        n[i : i + 2, 1:3, 1:3] = 1
        truth[case] = n
        write_volume(tmp_path / "gt" / f"{case}.nii.gz", n, GEOMETRY)
    gt_paths = [EvalCase(c, tmp_path / f"{c}.nii.gz", tmp_path / "gt" / f"{c}.nii.gz", "scan", c) for c in truth]
    perfect = _write_run(tmp_path, "real", 0, {c: n > 0 for c, n in truth.items()})
    empty = {c: np.zeros(shape, bool) for c in truth}
    half = {c: (n > 0) if c == "c1" else np.zeros(shape, bool) for c, n in truth.items()}
    runs = [_write_run(tmp_path, "syn", 0, empty), _write_run(tmp_path, "syn", 1, half)]
    rows = score_arm("real", [perfect], gt_paths, tmp_path / "real.csv", EV)
    assert [r["dice"] for r in rows] == [1.0, 1.0, 1.0] and all(r["n_found"] == 1 for r in rows)
    rows = score_arm("syn", runs, gt_paths, tmp_path / "syn.csv", EV)
    assert len(rows) == 6 and sum(r["dice"] for r in rows) == 1.0
    with pytest.raises(LungDDPMError, match="a run of arm 'real'"):
        score_arm("syn", [perfect], gt_paths, tmp_path / "x.csv", EV)

    table, figure = tmp_path / "comparison.csv", tmp_path / "comparison.png"
    out = compare_arms({"real": tmp_path / "real.csv", "syn": tmp_path / "syn.csv"}, "real", table, figure, EV)
    by = {(r["arm"], r["metric"]): r for r in out}
    assert by["real", "dice"]["mean"] == 1.0 and by["real", "dice"]["n_models"] == 1
    # syn: c1 averages its two models (0 and 1) -> 0.5; c2, c3 -> 0
    assert by["syn", "dice"]["mean"] == pytest.approx(0.5 / 3) and by["syn", "dice"]["n_models"] == 2
    assert by["syn", "dice"]["diff"] == pytest.approx(0.5 / 3 - 1)
    assert by["syn", "dice"]["ci_low"] <= by["syn", "dice"]["mean"] <= by["syn", "dice"]["ci_high"]
    assert by["syn", "dice"]["p_value"] == pytest.approx(0.25)  # exact Wilcoxon, 3 negative pairs
    assert by["syn", "detection_sensitivity"]["mean"] == pytest.approx(0.5 / 3)
    assert by["syn", "dice"]["models_sd"] == pytest.approx(np.std([0.0, 1 / 3], ddof=1))
    with open(table) as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == 10 and written[0]["metric"] == "dice" and written[0]["diff"] == ""
    assert {r["metric"] for r in written} == {
        "dice",
        "sensitivity",
        "specificity",
        "detection_sensitivity",
        "fp_per_scan",
    }
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_whole_scans_pool_detection_cluster_by_patient_and_drop_empty_truth(tmp_path: Path) -> None:
    """Scans a (patient P1, 1 nodule, found), b (P1's second series, no nodule) and c (P2, 8 nodules, none found);
    arm syn predicts what real does plus one false-positive voxel in b."""
    shape = (8, 8, 8)
    truth = {"a": np.zeros(shape, np.uint8), "b": np.zeros(shape, np.uint8), "c": np.zeros(shape, np.uint8)}
    truth["a"][1:3, 1:3, 1:3] = 1
    for n, (z, y) in enumerate([(z, y) for z in (0, 3, 6) for y in (0, 3, 6)][:8], start=1):
        truth["c"][z, y, 0] = n
    cts, maps = {}, {}
    for case, n in truth.items():
        cts[case], maps[case] = tmp_path / case / "ct.nii.gz", tmp_path / case / "nodules.nii.gz"
        write_volume(maps[case], n, GEOMETRY)
    tests = eval_set("whole", {"ct": list(cts.values()), "nodules": list(maps.values())}, {"a": "P1", "b": "P1"})
    assert [(t.identifier, t.cluster) for t in tests] == [("a", "P1"), ("b", "P1"), ("c", "c")]
    real = {c: truth["a"] > 0 if c == "a" else np.zeros(shape, bool) for c in truth}
    syn = {**real, "b": box(shape, slice(7, 8), slice(7, 8), slice(7, 8))}
    rows = score_arm("real", [_write_run(tmp_path, "real", 0, real)], tests, tmp_path / "real.csv", EV)
    assert math.isnan(rows[1]["dice"]) and rows[1]["false_positives"] == 0  # no truth: no Dice of 1 for nothing
    rows = score_arm("syn", [_write_run(tmp_path, "syn", 0, syn)], tests, tmp_path / "syn.csv", EV)
    assert math.isnan(rows[1]["dice"]) and rows[1]["false_positives"] == 1  # not also a Dice of 0
    scores = {"real": tmp_path / "real.csv", "syn": tmp_path / "syn.csv"}
    by = {(r["arm"], r["metric"]): r for r in compare_arms(scores, "real", tmp_path / "c.csv", None, EV)}
    assert by["real", "dice"]["mean"] == pytest.approx(0.5) and by["syn", "dice"]["diff"] == 0.0
    assert (by["real", "dice"]["n_cases"], by["real", "dice"]["n_clusters"]) == (2, 2)
    assert by["real", "detection_sensitivity"]["mean"] == pytest.approx(1 / 9)  # nodules found / nodules, not 1/2
    assert (by["syn", "fp_per_scan"]["diff"], by["syn", "fp_per_scan"]["n_clusters"]) == (pytest.approx(1 / 3), 2)


def test_scores_are_written_exactly_so_equal_detections_pair_to_zero(tmp_path: Path) -> None:
    """Scans of 3 nodules, 3 models per arm: real finds 2, 2, 2 and syn 1, 3, 2 of scan s0's nodules (the same
    mean, 2/3), 1 and 2 of the others'. At 6 significant digits k/3 read back as 0.333333 / 0.666667 and s0's
    difference was 2e-7, ranked by the Wilcoxon test as a real pair."""
    shape = (4, 8, 8)
    truth = np.zeros(shape, np.uint8)
    for n in range(3):
        truth[1:3, 1:3, 1 + 3 * n : 3 + 3 * n] = n + 1
    cases = [f"s{i}" for i in range(4)]
    tests = []
    for case in cases:
        write_volume(tmp_path / "gt" / f"{case}.nii.gz", truth, GEOMETRY)
        tests.append(EvalCase(case, tmp_path / f"{case}.nii.gz", tmp_path / "gt" / f"{case}.nii.gz", "scan", case))
    found = {"real": [[2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]], "syn": [[1, 3, 2], [2, 2, 2], [2, 2, 2], [3, 2, 3]]}
    for arm, per_case in found.items():
        runs = [_write_run(tmp_path, arm, m, {c: (truth > 0) & (truth <= k[m]) for c, k in zip(cases, per_case)})
                for m in range(3)]  # fmt: skip
        score_arm(arm, runs, tests, tmp_path / f"{arm}.csv", EV)
    written = [r for r in csv.DictReader(open(tmp_path / "syn.csv")) if r["case_id"] == "s0"]
    assert [float(r["detection_sensitivity"]) for r in written] == [1 / 3, 1.0, 2 / 3]  # read back exactly
    scores = {"real": tmp_path / "real.csv", "syn": tmp_path / "syn.csv"}
    by = {(r["arm"], r["metric"]): r for r in compare_arms(scores, "real", tmp_path / "c.csv", None, EV)}
    # per-case differences 0, 1/3, 1/3, 5/9 (weighted equally: 3 nodules each): s0's 0 is dropped by the test
    assert by["syn", "detection_sensitivity"]["diff"] == pytest.approx((0 + 1 / 3 + 1 / 3 + 5 / 9) / 4)
    assert by["syn", "detection_sensitivity"]["p_value"] == pytest.approx(stats.wilcoxon([1 / 3, 1 / 3, 5 / 9]).pvalue)


def test_compare_refuses_arms_scored_on_other_test_cases(tmp_path: Path) -> None:
    """An arm's mean over its own cases beside a difference over the shared ones would mislead: refused, named."""
    for arm, cases in (("real", ["c1", "c2", "c3", "c4"]), ("syn", ["c1", "c2", "c5"])):
        rows = [{"arm": arm, "seed": 0, "fold": "all", "case_id": c, "kind": "scan", "cluster": c, "dice": 0.5,
                 "sensitivity": 0.5, "specificity": 1.0, "detection_sensitivity": 1.0, "false_positives": 0,
                 "n_nodules": 1} for c in cases]  # fmt: skip
        write_csv(tmp_path / f"{arm}.csv", rows)
    scores = {"real": tmp_path / "real.csv", "syn": tmp_path / "syn.csv"}
    with pytest.raises(LungDDPMError, match=r"syn.csv: arm 'syn' scores 3 test case\(s\), baseline 'real' 4: "
                       r"missing \['c3', 'c4'\], extra \['c5'\]; rerun segment_score for arm 'syn'"):  # fmt: skip
        compare_arms(scores, "real", tmp_path / "c.csv", None, EV)
    # the same cases clustered otherwise (another evaluation.cluster): refused, whichever arm comes last (before,
    # the last arm's clusters were every arm's, so the baseline's interval and the p-value depended on the order)
    rows = list(csv.DictReader(open(tmp_path / "real.csv")))
    write_csv(tmp_path / "syn.csv", [{**r, "arm": "syn", "cluster": "P1"} for r in rows])
    for order in (["real", "syn"], ["syn", "real"]):
        with pytest.raises(LungDDPMError, match=r"syn.csv: arm 'syn' gives case c1 cluster 'P1' and 1 nodule\(s\), "
                           r".*real.csv \('c1', 1.0\) .*; rerun segment_score for every arm"):  # fmt: skip
            compare_arms({a: scores[a] for a in order}, "real", tmp_path / "c.csv", None, EV)
    # a table of older code without clusters: each ROI was its own unit, silently
    write_csv(tmp_path / "old.csv", [{k: v for k, v in r.items() if k != "cluster"} for r in rows])
    with pytest.raises(LungDDPMError, match=r"old.csv: no column cluster \(a table of older code\?\); rerun"):
        compare_arms({"real": tmp_path / "old.csv"}, "real", tmp_path / "c.csv", None, EV)


def test_paired_ttest_of_equal_differences_is_undefined() -> None:
    from lungddpm.segmentation.evaluate import paired_test

    assert math.isnan(paired_test(np.array([0.1, 0.1, 0.1]), "ttest"))  # no variance: not p = 0
    assert paired_test(np.array([0.1, 0.1]), "wilcoxon") == pytest.approx(0.5)
    assert paired_test(np.zeros(3), "ttest") == 1.0
    # float rounding of an exact 0 (k/3 found of 3 models, spread otherwise over a cluster's ROIs) is a 0: it was
    # ranked by the Wilcoxon test (p 0.75 for 1.0) and t-tested (p 0.67 for 1.0)
    noise = (1 / 3 + 1 / 3 + 1 / 3) / 3 - (0 + 1 / 3 + 2 / 3) / 3 + 1.85e-17
    assert paired_test(np.array([noise, 1 / 3, -1 / 9]), "wilcoxon") == paired_test(np.array([0, 1 / 3, -1 / 9]),
                                                                                     "wilcoxon") == 1.0  # fmt: skip
    assert paired_test(np.array([1.85e-17, -1.85e-17, 6.2e-18]), "ttest") == 1.0


def test_a_mean_over_no_case_is_marked_not_drawn_as_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No nodule-free ROI in the test set: fp_per_free_roi is n/a in the table; the figure drew bars of height 0
    ("no false positives"), now none, with "n/a" written inside the panel where they would stand."""
    import matplotlib.pyplot as plt

    from lungddpm.segmentation.evaluate import plot_comparison

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # the figure drawn, kept to read back
    for fp_means in ((math.nan, math.nan), (0.5, math.nan)):
        rows = [{"arm": arm, "metric": m, "mean": fp if m == "fp_per_free_roi" else 0.5, "ci_low": math.nan,
                 "ci_high": math.nan, "n_cases": 3} for arm, fp in zip(("real", "syn"), fp_means)
                for m in ("dice", "sensitivity", "detection_sensitivity", "fp_per_free_roi")]  # fmt: skip
        plot_comparison(rows, tmp_path / "c.png", 0.95)
        ax, ax_fp = figures[-1].axes
        heights = [p.get_height() for p in ax_fp.patches]
        assert heights[0] == fp_means[0] or (math.isnan(fp_means[0]) and math.isnan(heights[0]))
        assert math.isnan(heights[1]) and [p.get_height() for p in ax.patches] == [0.5] * 6
        marks = [t for t in ax_fp.texts if t.get_text() == "n/a"]
        assert len(marks) == sum(map(math.isnan, fp_means))
        lo, hi = ax_fp.get_xlim()
        assert all(lo < t.get_position()[0] < hi for t in marks) and ax_fp.get_ylim()[0] == 0


# ---------------------------------------------------------------------------------------------- arms
def _seg(**over: object) -> SegmentationConfig:
    raw = load_config(REPO / "config/config.yaml").raw
    raw["segmentation"].update({"scale": "whole", "arms": [{"name": "real", "real": True, "synthetic_fraction": 0},
                                {"name": "real+synthetic", "real": True, "synthetic_fraction": 1.0}]})  # fmt: skip
    raw["segmentation"].update(over)
    return SegmentationConfig.from_config(raw)


def test_nnunet_augmentation_workers_fit_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """da_processes null: nnU-Net's own number (12 off its sites), at most the job's threads (its default is capped
    by the node's CPUs only: 12 workers on a Slurm job of 8 CPUs); a number given is passed as is."""
    import nnunetv2.utilities.default_n_proc_DA as default_da

    monkeypatch.setattr(default_da, "get_allowed_n_proc_DA", lambda: 12)
    roots = {"nnUNet_raw": Path("raw")}
    assert nnunet.nnunet_env(roots, _seg(da_processes=None), 8)["nnUNet_n_proc_DA"] == "8"
    assert nnunet.nnunet_env(roots, _seg(da_processes=None), 32)["nnUNet_n_proc_DA"] == "12"
    assert nnunet.nnunet_env(roots, _seg(da_processes=0), 8)["nnUNet_n_proc_DA"] == "0"
    # nnU-Net's worker pools stay within the job's cores (segment_prepare's threads are capped at --cores)
    assert nnunet.nnunet_env(roots, _seg(processes=4), 2)["nnUNet_def_n_proc"] == "2"
    assert nnunet.nnunet_env(roots, _seg(processes=4), 8)["nnUNet_def_n_proc"] == "4"
    assert nnunet.nnunet_env(roots, _seg(da_processes=16), 8)["nnUNet_n_proc_DA"] == "16"


def test_job_threads_are_the_rules_and_the_clis_default() -> None:
    """segment_prepare takes ``processes``, segment_train ``threads`` (0 = every core), both within the cores;
    `lungddpm segment` uses the same numbers unless --threads is given."""
    assert _seg(processes=4).job_threads("prepare", 2) == 2
    assert _seg(processes=1).job_threads("prepare", 8) == 1
    assert _seg(threads=0).job_threads("train", 6) == 6
    assert _seg(threads=1).job_threads("train", 6) == 1
    assert _seg(threads=16).job_threads("train", 6) == 6


def test_one_process_runs_nnunets_pools_in_this_process() -> None:
    """processes 1: nnU-Net's ``get_context("spawn").Pool`` runs its tasks in a thread of the child (no spawned
    worker re-importing torch and nnunetv2); any other context, any other pool size and the code after are untouched."""
    import multiprocessing
    import multiprocessing.context as contexts
    import multiprocessing.pool

    real = multiprocessing.get_context
    with in_process_pools(1):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert isinstance(pool, multiprocessing.pool.ThreadPool)
            assert pool.starmap(os.getpid, [(), ()]) == [os.getpid()] * 2
            assert all(w.is_alive() for w in pool._pool)  # what nnU-Net polls while it waits
        assert multiprocessing.get_context("spawn").Process is contexts.SpawnProcess  # only Pool is replaced
        assert isinstance(multiprocessing.get_context("forkserver"), contexts.ForkServerContext)
    assert multiprocessing.get_context is real
    with in_process_pools(2):
        assert multiprocessing.get_context is real
        assert isinstance(multiprocessing.get_context("spawn"), contexts.SpawnContext)
    with pytest.raises(RuntimeError), in_process_pools(1):
        raise RuntimeError("a failed stage")
    assert multiprocessing.get_context is real


def test_sweep_fractions_alike_at_six_digits_are_named_as_such() -> None:
    """Two fractions that name one arm (sweep_<fraction:g>x) said "segmentation.arms: arm name(s) ['sweep_1x'] appear
    more than once; give each arm its own name", of arms the user never named."""
    with pytest.raises(ConfigError, match=r"segmentation.sweep.fractions: \[1.0, 1.0000001\] name two arms alike"):
        _seg(sweep={"fractions": [1.0, 1.0000001], "real_fraction": 0.5})
    assert [a.name for a in _seg(sweep={"fractions": [1 / 3, 0.5], "real_fraction": 0.5}).sweep] == [
        "sweep_0.333333x",
        "sweep_0.5x",
    ]


def test_arms_config_errors_name_the_key() -> None:
    assert _seg().arm_names == ["real", "real+synthetic"] and _seg().folds == ("all",)
    with pytest.raises(ConfigError, match="appear more than once"):
        _seg(arms=[{"name": "a", "real": True, "synthetic_fraction": 0}] * 2)
    with pytest.raises(ConfigError, match="segmentation.baseline"):
        _seg(baseline="nope")
    with pytest.raises(ConfigError, match=r"segmentation.baseline: 'sweep_0x' is not one of segmentation.arms; "
                       r"choose one of \['real', 'real\+synthetic'\]"):  # fmt: skip
        _seg(baseline="sweep_0x")  # a sweep arm: compare never reads its scores
    with pytest.raises(ConfigError, match="no training data"):
        _seg(arms=[{"name": "real", "real": False, "synthetic_fraction": 0}])
    with pytest.raises(ConfigError, match="segmentation.arms"):  # the schema refuses path-like names
        segmentation_config({"segmentation": {"arms": [{"name": "../x", "real": True, "synthetic_fraction": 0}]}})
    cfg = _seg(folds=[0, 1])
    with pytest.raises(ConfigError, match=r"needs >= 5 training cases.*use folds: \[all\]"):
        check_arms(cfg, 3, 3, 1)
    lesion = _seg(scale="lesion", folds=[0], arms=[{"name": "real", "real": True, "synthetic_fraction": 0}])
    check_arms(lesion, 3, 3, 1)  # lesion counts are ROIs, known when the arm is prepared, which refuses 4 of them:
    cases = [TrainingCase(f"r{i}", Path("x"), Path("y"), "real", "c") for i in range(4)]
    with pytest.raises(ConfigError, match=r"arm real has 4; use folds: \[all\]"):
        prepare_arm(lesion.arm("real"), 0, cases, ["t"], Path("/nonexistent/state"), Path("/nonexistent/p.json"),
                    lesion, 1)  # fmt: skip
    with pytest.raises(ConfigError, match="raise sample.samples_per_layout"):
        check_arms(_seg(), 8, 7, 2)
    pasted = _seg(arms=[{"name": "real", "real": True, "synthetic_fraction": 1, "synthetic_source": "lesion"}])
    with pytest.raises(ConfigError, match="needs 8 pasted CTs .* the lesion run makes 7"):
        check_arms(pasted, 8, 8, 2, 7)
    with pytest.raises(ConfigError, match="no test case"):
        check_arms(_seg(), 8, 8, 0)
    check_arms(_seg(), 8, 8, 2)
    # a synthetic-only lesion arm counts its ROIs from the nodule ROIs (0.2 x 10 = 2), not the 2 train cases
    # (0.2 x 2 = 0): it was refused with "no training case" at parse time, though prepare would build it
    only = _seg(scale="lesion", arms=[{"name": "syn", "real": False, "synthetic_fraction": 0.2}], baseline="syn")
    check_arms(only, 2, 0, 1)
    with pytest.raises(ConfigError, match=r"arms\[syn\]: no training case"):
        check_arms(_seg(arms=[{"name": "syn", "real": False, "synthetic_fraction": 0.2}], baseline="syn"), 2, 8, 1)


def test_synthetic_draws_are_nested_seeded_and_never_from_test_cases() -> None:
    items = [
        {"item": f"c{i}_0", "case_id": f"c{i}", "image": f"c{i}.nii.gz", "layout": f"c{i}_l.nii.gz"} for i in range(10)
    ]
    half, full = nested_draw(10, 5, 3), nested_draw(10, 10, 3)
    assert set(half) <= set(full) and len(full) == 10
    assert nested_draw(10, 5, 3) == half and nested_draw(10, 5, 4) != half
    assert Arm("x", True, 0.5).n_synthetic(5) == 3 and Arm("x", True, 1.0).n_synthetic(8) == 8
    real = {f"c{i}": (Path(f"c{i}.nii.gz"), Path(f"l{i}.nii.gz")) for i in range(4)}
    cases = whole_cases(Arm("rs", True, 1.0), 0, real, items, test_cases=["t1"])
    assert [c.kind for c in cases].count("real") == 4 and [c.kind for c in cases].count("synthetic") == 4
    assert all(c.identifier.startswith(("real_", "syn_")) for c in cases)
    half_arm = [c.identifier for c in whole_cases(Arm("h", True, 0.5), 0, real, items, ["t1"]) if c.kind != "real"]
    assert set(half_arm) <= {c.identifier for c in cases} and len(half_arm) == 2  # nested in the 1.0 arm
    with pytest.raises(LungDDPMError, match=r"derive from test cases \['c1'\]"):
        whole_cases(Arm("rs", True, 1.0), 0, real, items, test_cases=["c1"])
    with pytest.raises(ConfigError, match="needs 5 synthetic cases but the volume run made 4"):
        whole_cases(Arm("rs", True, 1.25), 0, real, items[:4], test_cases=["t1"])


# ------------------------------------------------------------------------------------------- nnU-Net
def test_raw_dataset_export_passes_nnunet_integrity_check(tmp_path: Path) -> None:
    cases = []
    for i in range(2):
        ct = np.full((8, 10, 12), -800.0 if i else -800, np.float32 if i else np.int16)
        layout = np.ones((8, 10, 12), np.uint8)
        layout[2:4, 3:5, 4 + i : 6 + i] = 2
        ct[layout == 2] = 30.7 if i else 30  # a float CT is rounded, not truncated
        write_volume(tmp_path / f"ct{i}.nii.gz", ct, GEOMETRY)
        write_volume(tmp_path / f"lay{i}.nii.gz", layout, GEOMETRY)
        cases.append(
            TrainingCase(f"real_c{i}", tmp_path / f"ct{i}.nii.gz", tmp_path / f"lay{i}.nii.gz", "real", f"c{i}")
        )
    folder = export_raw_dataset(cases, tmp_path / "raw", 501, 0.5)
    assert folder.name == dataset_name(501) == "Dataset501_LungNodule"
    meta = read_json(folder / "dataset.json")
    assert (
        meta["numTraining"] == 2
        and meta["labels"] == {"background": 0, "nodule": 1}
        and meta["file_ending"] == ".nii.gz"
    )
    label, geometry = read_volume(folder / "labelsTr/real_c1.nii.gz")
    image, _ = read_volume(folder / "imagesTr/real_c1_0000.nii.gz")
    assert geometry == GEOMETRY and label.sum() == 8 and set(np.unique(label)) == {0, 1} and image.dtype == np.int16
    assert set(np.unique(image[label == 1])) == {31} and set(np.unique(image[label == 0])) == {-800}
    # one child process (nnunetv2 is never imported here), its pool in-process as segment_prepare's with one
    # process: the export passes; a label 2 in one file fails
    bad = tmp_path / "bad_label.nii.gz"
    write_volume(bad, (label * 2).astype(np.uint8), GEOMETRY)
    code = (
        "import shutil, sys\n"
        "from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity as v\n"
        "from lungddpm.segmentation.nnunet_stages import in_process_pools\n"
        "if __name__ == '__main__':\n"
        "  with in_process_pools(1):\n"
        f"    v({str(folder)!r}, 1)\n"
        f"    shutil.copyfile({str(bad)!r}, {str(folder / 'labelsTr/real_c1.nii.gz')!r})\n"
        "    try:\n"
        f"        v({str(folder)!r}, 1)\n"
        "    except RuntimeError as exc:\n"
        "        print('REFUSED', exc)\n"
    )
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = proc.stdout.split("verify_dataset_integrity Done", 1)
    assert "Error" not in first and "Unexpected labels found" in second and "REFUSED" in second


# ------------------------------------------------------------------------------------------ workflow
def _ci_segmentation(workdir: Path) -> SegmentationConfig:
    extra = yaml.safe_load((workdir / "ci.yaml").read_text())
    return SegmentationConfig.from_config(load_config(workdir / "config/config.yaml", extra).raw)


def _split(workdir: Path) -> tuple[list[str], list[str]]:
    with open(workdir / "results/splits.csv") as fh:
        split = {r["case_id"]: r["subset"] for r in csv.DictReader(fh)}
    return sorted(c for c, s in split.items() if s == "train"), sorted(c for c, s in split.items() if s == "test")


def _rois(workdir: Path, cases: list[str]) -> list[dict[str, str]]:
    rows = []
    for c in cases:
        with open(workdir / f"results/rois/{c}/rois.csv") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def test_cpu_autocast_trainer_computes_in_bf16_and_hands_fp32_to_the_loss() -> None:
    """The trainer variant behind segmentation.cpu_precision: the network's convolutions run in bf16, its outputs
    (one tensor, or deep supervision's list) reach the loss in fp32, gradients and weights stay fp32, and neither
    the class name (nnU-Net's folders) nor the state dict (its checkpoints) changes; without_cpu_autocast restores
    fp32 for prediction."""
    import torch

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            y = self.conv(x)
            return [y, y[:, :, ::2, ::2, ::2]]

    class Base:
        def initialize(self) -> None:
            self.network = Heads()

    trainer = cpu_autocast_trainer(Base, torch.bfloat16)()
    trainer.initialize()
    seen: list[torch.dtype] = []
    trainer.network.conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(1, 1, 4, 4, 4)
    out = trainer.network(x)
    assert seen == [torch.bfloat16] and [o.dtype for o in out] == [torch.float32] * 2 and out[1].shape[-1] == 2
    sum(o.sum() for o in out).backward()
    assert trainer.network.conv.weight.grad.dtype == torch.float32
    assert type(trainer).__name__ == "Base" and list(trainer.network.state_dict()) == ["conv.weight", "conv.bias"]
    without_cpu_autocast(trainer.network)
    assert trainer.network(x)[0].dtype == torch.float32 and seen[-1] == torch.float32


def test_workflow_lesion_scale_trains_on_rois_and_scores_every_test_roi(demo_workflow: Path) -> None:
    import nibabel as nib

    train, test = _split(demo_workflow)
    train_rois, test_rois = _rois(demo_workflow, train), _rois(demo_workflow, test)
    n_nodule_rois = sum(r["kind"] == "nodule" for r in train_rois)
    seg = demo_workflow / "results/segmentation/lesion"
    for arm, n_syn in (("real", 0), ("real+synthetic", math.floor(0.5 * n_nodule_rois + 0.5))):
        prep = read_json(seg / arm / "seed0/prepared.json")
        assert (prep["n_real"], prep["n_synthetic"]) == (len(train_rois), n_syn) and prep["scale"] == "lesion"
        assert {c["source_case"] for c in prep["cases"]} <= set(train) and prep["test_cases"] == test
        assert prep["features_per_stage"][0] == CI_CONFIG["segmentation"]["network"]["features_base"]
        syn = [c for c in prep["cases"] if c["kind"] == "synthetic"]
        assert all(c["image"].endswith("_after.nii.gz") and "synthetic/lesion" in c["image"] for c in syn)
        run = read_json(seg / arm / "seed0/fold_all/run.json")
        assert run["iterations"] == CI_CONFIG["segmentation"]["iterations_per_epoch"] and run["scale"] == "lesion"
        assert run["cpu_precision"] == "auto" and run["cpu_autocast"] == ("bfloat16" if cpu_has_native_bf16() else None)
        assert sorted(run["predictions"]) == sorted(r["roi"] for r in test_rois)
        dice = {}
        for r in test_rois:  # each prediction on its ROI's exact grid
            pred = nib.load(seg / arm / f"seed0/fold_all/predictions/{r['roi']}.nii.gz")
            roi = nib.load(demo_workflow / f"results/rois/{r['case_id']}/{r['ct']}")
            assert pred.shape == roi.shape and np.allclose(pred.affine, roi.affine)
            if r["kind"] == "nodule":  # Dice over every nodule voxel of the ROI, recomputed from the files
                p = np.asanyarray(pred.dataobj) > 0
                t = np.asanyarray(nib.load(demo_workflow / f"results/rois/{r['case_id']}/{r['layout']}").dataobj) == 2
                dice[r["roi"]] = 2 * (p & t).sum() / (p.sum() + t.sum())
        with open(seg / arm / "scores.csv") as fh:
            rows = {r["case_id"]: r for r in csv.DictReader(fh)}
        assert dice and all(float(rows[c]["dice"]) == pytest.approx(d, abs=1e-6) for c, d in dice.items())
        mean = float(next(r for r in csv.DictReader(open(seg / "comparison.csv")) if r["arm"] == arm
                          and r["metric"] == "dice")["mean"])  # fmt: skip
        assert mean == pytest.approx(np.mean(list(dice.values())), abs=1e-5)  # one model: the mean over ROIs
        assert {c: r["kind"] for c, r in rows.items()} == {r["roi"]: r["kind"] for r in test_rois}
        for r in rows.values():
            if r["kind"] == "nodule":
                assert 0 <= float(r["dice"]) <= 1 and float(r["n_nodules"]) >= 1 and r["false_positives"] == ""  # NaN
            else:
                assert r["dice"] == "" and float(r["false_positives"]) >= 0 and r["n_nodules"] == "0"
    with open(seg / "comparison.csv") as fh:
        table = {(r["arm"], r["metric"]): r for r in csv.DictReader(fh)}
    n_test_nodules = sum(r["kind"] == "nodule" for r in test_rois)
    assert table["real", "dice"]["n_cases"] == str(n_test_nodules)
    assert table["real", "fp_per_free_roi"]["n_cases"] == str(len(test_rois) - n_test_nodules)
    diff = table["real+synthetic", "dice"]
    assert diff["baseline"] == "real" and diff["diff"] != "" and diff["test"] == "wilcoxon"
    assert float(diff["diff_ci_low"]) <= float(diff["diff"]) <= float(diff["diff_ci_high"])
    assert (seg / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    summary = (demo_workflow / "results/report/summary.md").read_text()
    assert summary.index("## Downstream nodule segmentation") < summary.index("## Lesion fidelity")
    assert summary.index("## Lesion fidelity") < summary.index("## Image quality") < summary.index("## Samples")
    assert "Scale: **ROIs**" in summary and "procedural thorax phantoms" in summary
    assert "| core HU a / b |" in summary  # the fidelity table's core column


def test_workflow_whole_scale_with_volume_and_pasted_arms(demo_workflow: Path) -> None:
    """The whole scale on the same data: the real CTs plus whole-volume CTs (the baseline here), or plus the lesion
    run's pasted CTs. Two arms, not three: a real-only arm is the lesion scale's baseline, already run."""
    arms = ("[{name: volume, real: true, synthetic_fraction: 1.0, synthetic_source: volume},"
            " {name: pasted, real: true, synthetic_fraction: 1.0, synthetic_source: lesion}]")  # fmt: skip
    lesion = demo_workflow / "results/segmentation/lesion/comparison.csv"  # the lesion scale's, run before
    lesion_before = (lesion.read_bytes(), lesion.stat().st_mtime_ns)
    snakemake(demo_workflow, "--config", f"segmentation={{scale: whole, baseline: volume, arms: {arms}}}", "--",
              "results/segmentation/whole/comparison.csv")  # fmt: skip
    train, test = _split(demo_workflow)
    seg = demo_workflow / "results/segmentation/whole"
    pasted = read_json(seg / "pasted/seed0/prepared.json")
    assert pasted["scale"] == "whole" and pasted["n_synthetic"] == len(train) and pasted["patch_size"] == [32] * 3
    assert all(c["image"].endswith("_ct.nii.gz") for c in pasted["cases"] if c["kind"] == "synthetic")
    raw = Path(pasted["state_dir"]) if Path(pasted["state_dir"]).is_absolute() else demo_workflow / pasted["state_dir"]
    image, geometry = read_volume(next((raw / "nnUNet_raw/Dataset501_LungNodule/imagesTr").glob("syn_*")))
    ct, ct_geometry = read_volume(demo_workflow / f"results/preprocessed/{train[0]}/ct.nii.gz")
    assert image.shape == ct.shape and geometry.spacing == ct_geometry.spacing  # resampled onto the model grid
    volume = read_json(seg / "volume/seed0/prepared.json")
    assert all("synthetic/augment" in c["image"] for c in volume["cases"] if c["kind"] == "synthetic")
    assert sum(c["kind"] == "real" for c in volume["cases"]) == len(train) == volume["n_synthetic"]
    with open(seg / "volume/scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == test and {r["kind"] for r in rows} == {"scan"}
    with open(seg / "comparison.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {r["arm"] for r in table} == {"volume", "pasted"} and {r["baseline"] for r in table} == {"volume"}
    assert "fp_per_scan" in {r["metric"] for r in table} and len(table) == 10
    # the lesion scale's results are untouched, beside these
    assert (lesion.read_bytes(), lesion.stat().st_mtime_ns) == lesion_before


def test_segment_train_reuses_a_finished_model(
    demo_workflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same data and settings: nnU-Net's checkpoint in state/ is reused, and it predicts what the workflow did."""
    monkeypatch.chdir(demo_workflow)
    seg = Path("results/segmentation/lesion/real/seed0")
    _, test = _split(demo_workflow)
    tests = eval_set("lesion", {"tables": [Path(f"results/rois/{c}/rois.csv") for c in test]})
    run = train_arm(seg / "prepared.json", "all", tests, tmp_path / "pred", tmp_path / "run.json",
                    _ci_segmentation(demo_workflow), 1)  # fmt: skip
    assert run["trained"] is False and read_json(seg / "fold_all/run.json")["trained"] is True
    for t in tests:
        ours = read_volume(tmp_path / f"pred/{t.identifier}.nii.gz")[0]
        assert np.array_equal(ours, read_volume(seg / f"fold_all/predictions/{t.identifier}.nii.gz")[0])
    # the exported voxels are part of what is reused: other HU outside the nodules (the plan alone did not change)
    # give another stamp, so nnU-Net's checkpoints of the old data are not taken for the new
    prep = read_json(seg / "prepared.json")
    assert len(prep["data_sha256"]) == 64
    stamps, before = [], []

    def stamp_of(stage: str, job: dict, env: dict, work: Path) -> dict:
        stamps.append(job["stamp"])
        before.append(job["stamp_before"])
        raise RuntimeError("stamp read")

    # the same cases by absolute paths (`lungddpm segment --results /abs/results`): the same stamp, as the voxels'
    # digest stands for the paths; the older stamp, of the paths, differs
    absolute = [{**c, "image": str(Path(c["image"]).resolve())} for c in prep["cases"]]
    assert absolute != prep["cases"]
    monkeypatch.setattr(nnunet, "launch", stamp_of)
    digest, given = prep["data_sha256"], prep["cases"]
    for data, version, cases in ((digest, 1, given), ("0" * 64, 1, given), (digest, 2, given), (digest, 1, absolute)):
        monkeypatch.setitem(versions.OUTPUT_VERSIONS, "segment_train", version)  # 2: a code change bumped it
        write_json(tmp_path / "prepared.json", {**prep, "data_sha256": data, "cases": cases})
        with pytest.raises(RuntimeError, match="stamp read"):
            train_arm(tmp_path / "prepared.json", "all", tests, tmp_path / "p2", tmp_path / "r2.json",
                      _ci_segmentation(demo_workflow), 1)  # fmt: skip
    assert len(set(stamps[:3])) == 3 and stamps[3] == stamps[0]  # the version-1 stamp is the workflow run's
    assert before[3] != before[0] and len(set(before + stamps)) == 7


def test_a_prediction_off_its_cts_grid_and_an_unknown_planner_are_named(tmp_path: Path) -> None:
    """A prediction half a millimetre off its CT says where each lies (it printed two equal shapes and spacings and
    blamed a transpose in the manifest, which holds none); an unknown planner is named before any fingerprinting
    (nnU-Net's lookup gave None, then a TypeError deep in its planning)."""
    from lungddpm.segmentation.nnunet_stages import _planner_class

    grid = Geometry((1.25, 1.25, 1.25), (0.0, 0.0, 0.0))
    write_volume(tmp_path / "ct.nii.gz", np.zeros((4, 5, 6), np.int16), grid)
    write_volume(tmp_path / "pred.nii.gz", np.zeros((4, 5, 6), np.uint8), Geometry(grid.spacing, (0.5, 0.0, 0.0)))
    with pytest.raises(nnunet.NnUNetError, match=r"pred.nii.gz: \(4, 5, 6\) at .* origin \(0.5, 0.0, 0.0\).*: not "
                       r"the grid of its CT .*ct.nii.gz, \(4, 5, 6\) at .* origin \(0.0, 0.0, 0.0\)"):  # fmt: skip
        nnunet._copy_prediction(tmp_path / "pred.nii.gz", tmp_path / "ct.nii.gz", tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()
    assert _planner_class("nnUNetPlannerResEncM").__name__ == "nnUNetPlannerResEncM"
    with pytest.raises(ValueError, match=r"segmentation.planner: 'NoSuchPlanner' is no nnU-Net experiment planner"):
        _planner_class("NoSuchPlanner")


def test_a_model_trained_at_another_precision_or_device_is_not_reused(
    demo_workflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpu_precision / device auto: what the host made of them is stamped with the settings, so a model trained in
    bf16 is neither reported as an fp32 host's nor resumed there in fp32 (the stamp held 'auto' alone)."""
    import batchgenerators.utilities.file_and_folder_operations as bg
    import torch

    from lungddpm.diffusion import precision
    from lungddpm.segmentation import nnunet_stages

    state = (
        demo_workflow / read_json(demo_workflow / "results/segmentation/lesion/real/seed0/prepared.json")["state_dir"]
    )
    job = read_json(state / "fold_all/train_job.json")
    results = tmp_path / "nnUNet_results"
    shutil.copytree(state / "fold_all/nnUNet_results", results)
    trained = read_json(results / "lungddpm_stamp.json")
    assert trained[0] == job["stamp"] and trained[1] == "cpu"
    monkeypatch.setenv("nnUNet_preprocessed", str(state / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(results))

    def stop(*args: object) -> None:  # past the stamp check: nnU-Net's plans are read next
        raise RuntimeError("past the stamp")

    monkeypatch.setattr(bg, "load_json", stop)
    checkpoints = lambda: sorted(p.name for p in results.rglob("checkpoint_*.pth"))  # noqa: E731
    before = checkpoints()
    assert before
    # the older stamp, of the image paths, is taken for this one, and rewritten
    write_json(results / "lungddpm_stamp.json", [job["stamp_before"], *trained[1:]])
    other = {"torch.bfloat16": None, "None": torch.bfloat16}[trained[2]]
    for dtype, kept in ((getattr(torch, trained[2].removeprefix("torch."), None), True), (other, False)):
        monkeypatch.setattr(precision, "resolve_precision", lambda *a, dtype=dtype: dtype)
        with pytest.raises(RuntimeError, match="past the stamp"):
            nnunet_stages._train(job, torch.device("cpu"))
        assert (checkpoints() == before) is kept
        assert read_json(results / "lungddpm_stamp.json") == [job["stamp"], "cpu", str(dtype)]


class RunsCode:
    """Unpickled, it creates ``path``: a stand-in for a tampered checkpoint's payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (self.path.touch, ())


def test_nnunet_checkpoints_are_written_atomically_and_a_damaged_one_is_discarded(
    demo_workflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nnU-Net's own torch.save onto checkpoint_final.pth, cut by a kill, left a file that every rerun took for a
    finished model and failed to load. Its saves now go through a temporary file, and a cut or bit-flipped
    checkpoint found by a rerun is discarded with a warning, an intact one kept."""
    import batchgenerators.utilities.file_and_folder_operations as bg
    import torch

    from lungddpm.segmentation import nnunet_stages

    state = (
        demo_workflow / read_json(demo_workflow / "results/segmentation/lesion/real/seed0/prepared.json")["state_dir"]
    )
    job = read_json(state / "fold_all/train_job.json")
    results = tmp_path / "nnUNet_results"
    shutil.copytree(state / "fold_all/nnUNet_results", results)
    monkeypatch.setenv("nnUNet_preprocessed", str(state / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(results))
    final = next(results.rglob("checkpoint_final.pth"))
    intact = final.read_bytes()
    # nnU-Net's trainer (the real one) saving over the final checkpoint, stopped half way through the write
    pre = state / "nnUNet_preprocessed" / dataset_name(int(job["dataset_id"]))
    cls = nnunet_stages.atomic_checkpoint_trainer(nnunet_stages._trainer_class(job["trainer"]))
    plans = {**bg.load_json(str(pre / f"{job['plans_identifier']}.json")), "continue_training": False}
    trainer = cls(plans=plans, configuration=job["configuration"], fold="all",
                  dataset_json=bg.load_json(str(pre / "dataset.json")), device=torch.device("cpu"))  # fmt: skip
    trainer.initialize()
    real_save = torch.save

    def cut_short(obj: object, f: str) -> None:
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(final))
    assert final.read_bytes() == intact and sorted(p.name for p in final.parent.iterdir() if ".tmp" in p.name) == []
    monkeypatch.setattr(torch, "save", real_save)
    trainer.save_checkpoint(str(final.with_name("checkpoint_latest.pth")))  # completes: a loadable checkpoint
    assert torch.load(final.with_name("checkpoint_latest.pth"), weights_only=False)["current_epoch"] == 1
    # read back weights-only (nnU-Net's own torch.load unpickles anything): the same weights and epoch
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    with torch.no_grad():
        next(trainer.network.parameters()).add_(1.0)
    trainer.current_epoch = 0
    trainer.load_checkpoint(str(final.with_name("checkpoint_latest.pth")))
    assert trainer.current_epoch == 1 and all(
        torch.equal(v, weights[k]) for k, v in trainer.network.state_dict().items()
    )
    # a checkpoint that would run code when unpickled (here: touch a file) is refused and runs nothing
    marker, evil = tmp_path / "ran", tmp_path / "checkpoint_evil.pth"
    real_save({"network_weights": weights, "current_epoch": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused .* arbitrary Python objects"):
        trainer.load_checkpoint(str(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # what nnU-Net's load_checkpoint does with it
    assert marker.exists()

    # a rerun finding a damaged checkpoint (as written before, or a bad copy) discards it and keeps an intact one
    def stop(*args: object) -> None:  # past the checkpoint checks: nnU-Net's plans are read next
        raise RuntimeError("past the checks")

    monkeypatch.setattr(bg, "load_json", stop)
    latest = final.with_name("checkpoint_latest.pth")
    half = len(intact) // 2  # in the weights' bytes
    flipped = intact[:half] + bytes([intact[half] ^ 1]) + intact[half + 1 :]
    for damaged, said in ((intact[:half], "it is cut short"), (flipped, "fails its CRC-32 check")):
        final.write_bytes(damaged)
        kept = latest.read_bytes()
        with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="past the checks"):
            nnunet_stages._train(job, torch.device("cpu"))
        assert not final.exists() and latest.read_bytes() == kept
        warning = next(r.getMessage() for r in caplog.records if "checkpoint_final.pth" in r.getMessage())
        assert said in warning and "discarded (this fold resumes from an intact checkpoint or trains anew)" in warning
        caplog.clear()


def test_cli_segment_compare_reproduces_the_workflow_table(demo_workflow: Path, tmp_path: Path) -> None:
    """`lungddpm segment compare` calls the same function as the rule: same scores in, same table out."""
    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.raw))
    results = tmp_path / "results"
    for arm in ("real", "real+synthetic"):
        (results / "segmentation/lesion" / arm).mkdir(parents=True)
        shutil.copy2(demo_workflow / f"results/segmentation/lesion/{arm}/scores.csv",
                     results / f"segmentation/lesion/{arm}/scores.csv")  # fmt: skip
    cmd = [sys.executable, "-m", "lungddpm.cli", "--configfile", str(tmp_path / "config.yaml"), "segment", "compare"]
    proc = subprocess.run([*cmd, "--results", str(results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours = (results / "segmentation/lesion/comparison.csv").read_text()
    assert ours == (demo_workflow / "results/segmentation/lesion/comparison.csv").read_text()
    proc = subprocess.run([*cmd, "--arm", "nope"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "segmentation arm 'nope' is not configured" in proc.stderr


def test_workflow_sweep_target_plots_dice_against_the_synthetic_fraction(demo_workflow: Path) -> None:
    """`snakemake segment_sweep` (its own target): one arm per fraction at sweep.real_fraction, one table, one plot."""
    snakemake(demo_workflow, "--config", "segmentation={sweep: {fractions: [0, 0.25], real_fraction: 0.5}}", "--",
              "segment_sweep")  # fmt: skip
    train, _ = _split(demo_workflow)
    seg = demo_workflow / "results/segmentation/lesion"
    rois = _rois(demo_workflow, train)
    prep = read_json(seg / "sweep_0.25x/seed0/prepared.json")
    assert prep["real_fraction"] == 0.5 and 0 < prep["n_real"] < len(rois)
    assert prep["n_synthetic"] == math.floor(0.25 * sum(r["kind"] == "nodule" for r in rois) + 0.5)
    base = read_json(seg / "sweep_0x/seed0/prepared.json")
    ids = {c["identifier"] for c in prep["cases"]}
    assert {c["identifier"] for c in base["cases"]} <= ids  # nested draws
    # every synthetic ROI was inpainted into a nodule-free ROI this half of the real data holds
    items = (read_json(f) for f in (demo_workflow / "results/synthetic/lesion").glob("LIDC-IDRI-*.json"))
    site = {f"syn_{p['item']}_s{j}": s["site"] for p in items for j, s in enumerate(p["sites"])}
    synthetic = [i for i in ids if i.startswith("syn_")]
    assert len(synthetic) == prep["n_synthetic"] and all(f"real_{site[i]}" in ids for i in synthetic)
    with open(seg / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    dice = {float(r["synthetic_fraction"]): r for r in rows if r["metric"] == "dice"}
    assert sorted(dice) == [0.0, 0.25] and dice[0.25]["baseline"] == "sweep_0x" and dice[0.25]["p_value"] != ""
    assert (seg / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_the_segment_command_checks_the_arms_before_any_work(tmp_path: Path) -> None:
    """`lungddpm segment` skipped the workflow's parse-time check: with no test case it prepared and trained every
    arm, and failed at compare with "no scores; rerun segment_score"."""
    from lungddpm.segmentation.experiment import run_experiment

    cfg = load_config(REPO / "config/config.yaml", {"split": {"train": 0.9, "val": 0.1, "test": 0.0}})
    with pytest.raises(ConfigError, match=r"segmentation: the split has no test case to segment; raise split.test"):
        run_experiment(cfg, tmp_path / "results", tmp_path / "state", steps=("prepare", "compare"))
    assert not (tmp_path / "results").exists() and not (tmp_path / "state").exists()
