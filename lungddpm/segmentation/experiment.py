"""The downstream experiment from a shell (``lungddpm segment``): the steps rules/segment.smk runs, in order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from ..errors import SegmentationError
from ..preprocessing.cases import case_patients, case_split, list_cases, run_cases
from ..synthesis.plan import items_of_run
from . import arms as A
from .datasets import arm_cases, eval_inputs, eval_set, train_inputs
from .evaluate import compare_arms, score_arm
from .nnunet import prepare_arm, train_arm

STEPS = ("prepare", "train", "score", "compare")


def run_experiment(
    cfg: Config,
    results: Path,
    state: Path,
    steps: Sequence[str] = STEPS,
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    folds: Sequence[int | str] | None = None,
    threads: int | None = None,
) -> None:
    """Run ``steps`` of the segmentation experiment for ``arms`` x ``seeds`` x ``folds`` (default: the config's)
    on the workflow's outputs under ``results``, with nnU-Net's state under ``state``; the same named inputs and
    outputs as the rules. ``threads`` (default: each step's as its rule's, :meth:`SegmentationConfig.job_threads`
    on this machine's cores) is used by every step."""
    seg = A.segmentation_config(cfg.raw)
    prepare_threads, train_threads = (threads or seg.job_threads(s, os.cpu_count() or 1) for s in ("prepare", "train"))
    seeds = list(seeds) if seeds is not None else seg.seeds
    folds = list(folds) if folds else seg.folds
    if "score" in steps and (sorted(map(str, seeds)) != sorted(map(str, seg.seeds))
                             or sorted(map(str, folds)) != sorted(map(str, seg.folds))):  # fmt: skip
        what = "score" if len(steps) == 1 else " / ".join(steps)
        raise SegmentationError(
            f"segment {what}: an arm's scores.csv covers every seed {list(seg.seeds)} and fold {list(seg.folds)} of "
            f"the config (the workflow's table), not seeds {seeds} and folds {folds} alone; score without --seed / "
            "--fold (prepare or train a subset: segment train --fold 1), or set segmentation.seeds / .folds"
        )
    split = case_split(cfg, list_cases(cfg))
    train, test = ([c for c in sorted(split) if split[c] == s] for s in ("train", "test"))
    scale = seg.scale
    sc, lc = cfg.raw["sample"], cfg.raw["lesion"]["sample"]
    # what the workflow checks when it parses: an empty test split, or arms the runs cannot fill, before any work
    augment = items_of_run(cfg.raw, "augment", run_cases(split, "augment"))
    A.check_arms(seg, len(train), len(augment), len(test), len(items_of_run(cfg.raw, "lesion", train)))
    shards = {"volume": ("augment", sc["shards"]), "lesion": ("lesion", lc["shards"])}
    synthetic = {k: [results / "synthetic" / r / f"shard_{i}.json" for i in range(n)] for k, (r, n) in shards.items()}
    names = [seg.arm(a).name for a in arms] if arms else seg.arm_names
    patients = case_patients(cfg, test)
    tests = []
    if {"train", "score"} & set(steps):
        tests = eval_set(scale, eval_inputs(scale, test, results), patients, seg.evaluation.cluster)
    for arm in names:
        for seed in seeds:
            if "prepare" in steps:
                a = seg.arm(arm)
                cases = arm_cases(scale, a, seed, train_inputs(scale, a, train, results, synthetic), test)
                prepare_arm(a, seed, cases, test, A.state_dir(state, scale, arm, seed),
                            A.prepared_manifest(results, scale, arm, seed), seg, prepare_threads,
                            case_patients(cfg, sorted({c.source_case for c in cases})))  # fmt: skip
            for fold in folds if "train" in steps else ():
                train_arm(A.prepared_manifest(results, scale, arm, seed), fold, tests,
                          A.predictions_dir(results, scale, arm, seed, fold),
                          A.run_manifest(results, scale, arm, seed, fold), seg, train_threads)  # fmt: skip
        if "score" in steps:
            runs = [A.run_manifest(results, scale, arm, s, f) for s in seeds for f in folds]
            score_arm(arm, runs, tests, A.scores_table(results, scale, arm), seg.evaluation)
    if "compare" in steps:
        scores = {arm: A.scores_table(results, scale, arm) for arm in seg.arm_names}
        out = results / "segmentation" / scale
        compare_arms(scores, seg.baseline, out / "comparison.csv", out / "comparison.png", seg.evaluation)
