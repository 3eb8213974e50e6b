"""Segmentation settings and training arms — light enough for Snakemake's parse (no nnU-Net, no torch).

An arm trains nnU-Net on (a ``real_fraction`` of) the real train split and/or synthetic cases. Two scales:

- ``lesion``: the cases are ROIs (DESIGN §5): the real nodule and nodule-free ROIs of the train split, plus ROIs
  with nodules inpainted by the lesion run; tested on every ROI of the test split.
- ``whole``: the cases are whole CTs on the model grid: the real train CTs, plus whole-volume ``augment`` CTs or
  the real train CTs with pasted lesion-run nodules (``synthetic_source``); tested on the test split's CTs.

The target is always the layout's nodule label. Neither the diffusion models, nor the synthetic runs, nor any arm
ever sees a test patient. Each arm repeats over ``seeds`` x ``folds``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..config import validate_config
from ..errors import ConfigError

NNUNET_MIN_CASES_PER_FOLD = 5  # nnU-Net's default split is 5-fold: integer folds need >= 5 training cases
SCALES = ("lesion", "whole")
SOURCES = ("volume", "lesion")  # whole-volume augment CTs | lesion-run nodules (ROIs or pasted CTs)


def _times(fraction: float, n: int) -> int:
    """``fraction`` x ``n`` rounded half up, exactly: the fraction as written (0.29 x 50 = 14.5 -> 15; in floats
    0.29 * 50 + 0.5 falls below 15)."""
    return math.floor(Fraction(str(fraction)) * n + Fraction(1, 2))


@dataclass(frozen=True)
class Arm:
    """One training recipe: ``real_fraction`` of the real train split (when ``real``) plus ``synthetic_fraction`` x
    the size of the whole real train split (its nodule ROIs at the lesion scale) of synthetic cases from
    ``synthetic_source``."""

    name: str
    real: bool
    synthetic_fraction: float
    real_fraction: float = 1.0
    synthetic_source: str = "volume"

    def n_synthetic(self, n_real: int) -> int:
        """Synthetic cases for ``n_real`` real train cases (nodule ROIs), rounded half up."""
        return _times(self.synthetic_fraction, n_real)

    def n_real(self, n_units: int) -> int:
        """Real units (cases; nodules or free ROIs) used out of ``n_units``: at least 1 when any is asked for."""
        return 0 if not self.real or n_units == 0 else max(1, _times(self.real_fraction, n_units))

    def params(self) -> dict[str, Any]:
        """The arm's settings as segment_prepare's params. A low-data arm (real, ``real_fraction`` < 1) also carries
        its synthetic draw's version: 2 since 2026-12-07, when it stopped drawing synthetic cases with a nodule outline
        of a train case it leaves out; so such an arm prepares again, and no other."""
        d = asdict(self)
        return {**d, "synthetic_draw": 2} if self.real and self.real_fraction < 1 else d


@dataclass(frozen=True)
class EvaluationConfig:
    connectivity: int
    min_overlap_voxels: int
    bootstrap: int
    ci_level: float
    paired_test: str
    seed: int
    cluster: str = "nodule"  # the lesion scale's independent unit: "nodule" (its jittered ROIs) or "patient"


@dataclass(frozen=True)
class SegmentationConfig:
    """Typed view of the validated ``segmentation`` section (see config/schema.yaml)."""

    enabled: bool
    scale: str
    arms: tuple[Arm, ...]
    sweep: tuple[Arm, ...]  # the synthetic_fraction sweep (its own target), named sweep_<f>x
    baseline: str
    seeds: tuple[int, ...]
    folds: tuple[str, ...]  # "all" or "0".."4"
    dataset_id: int
    configuration: str
    planner: str
    fingerprint_samples: int | None
    trainer: str
    num_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    initial_lr: float
    checkpoint_every: int
    final_validation: bool
    test_time_mirroring: bool
    tile_step_size: float
    device: str
    compile: bool
    cpu_precision: str  # auto | fp32 | bf16: training's autocast on a CPU
    da_processes: int | None
    processes: int
    threads: int
    gpus: int
    network: Mapping[str, int | None]  # features_base, features_max, batch_size over nnU-Net's plan (None = keep)
    evaluation: EvaluationConfig
    nodule_fraction: float  # preprocess.nodule_fraction: the nodule label of a pasted CT resampled onto its grid

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> SegmentationConfig:
        """``raw``: the whole validated config mapping. Raises :class:`ConfigError` on inconsistent arms."""
        s = dict(raw["segmentation"])
        scale = s["scale"]
        own = "lesion" if scale == "lesion" else "volume"

        def arm(a: Mapping[str, Any]) -> Arm:
            source = a.get("synthetic_source") or own
            if scale == "lesion" and source != "lesion":
                raise ConfigError(
                    f"segmentation.arms[{a['name']}]: synthetic_source {source!r} at segmentation.scale lesion; ROIs "
                    "come from the lesion run only — drop synthetic_source or set segmentation.scale: whole"
                )
            if scale == "whole" and source == "lesion" and not a["real"] and a["synthetic_fraction"] > 0:
                raise ConfigError(
                    f"segmentation.arms[{a['name']}]: real: false with synthetic_source lesion at segmentation.scale "
                    "whole; a lesion-run CT is a real train CT (its real nodules labelled) with nodules pasted in, so "
                    "the arm would not be synthetic-only — set synthetic_source: volume, or real: true"
                )
            return Arm(a["name"], bool(a["real"]), float(a["synthetic_fraction"]), float(a.get("real_fraction", 1.0)),
                       source)  # fmt: skip

        arms = tuple(arm(a) for a in s.pop("arms"))
        sw = s.pop("sweep")
        if len({f"{f:g}" for f in sw["fractions"]}) < len(set(sw["fractions"])):  # the arms' names: 6 digits
            raise ConfigError(f"segmentation.sweep.fractions: {sw['fractions']} name two arms alike at 6 significant "
                              "digits (sweep_<fraction>x); give fractions that differ within 6 digits")  # fmt: skip
        s["sweep"] = tuple(
            arm({"name": f"sweep_{f:g}x", "real": True, "synthetic_fraction": f, "real_fraction": sw["real_fraction"]})
            for f in sorted(set(sw["fractions"]))
        )
        if s["enabled"] and scale == "lesion" and not raw["lesion"]["enabled"]:  # off: nothing of it runs
            raise ConfigError(
                "segmentation.scale is lesion but lesion.enabled is false: the ROIs and the lesion run are off; set "
                "lesion.enabled: true or segmentation.scale: whole"
            )
        names = [a.name for a in arms + s["sweep"]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"segmentation.arms: arm name(s) {dupes} appear more than once; give each arm its own name"
            )
        for a in arms:
            if not a.real and a.synthetic_fraction == 0:
                raise ConfigError(
                    f"segmentation.arms[{a.name}]: real is false and synthetic_fraction is 0, so it has no training "
                    "data; set real: true or a synthetic_fraction > 0"
                )
        choices = [a.name for a in arms]  # not the sweep's: it compares with its own smallest fraction
        if s["baseline"] not in choices:
            raise ConfigError(f"segmentation.baseline: {s['baseline']!r} is not one of segmentation.arms; choose one "
                              f"of {choices}")  # fmt: skip
        s["seeds"] = tuple(int(v) for v in s["seeds"])
        s["folds"] = tuple(str(v) for v in s["folds"])
        for key in ("seeds", "folds"):
            if len(set(s[key])) != len(s[key]):
                raise ConfigError(f"segmentation.{key}: {list(s[key])} repeats a value; list each once")
        s["evaluation"] = EvaluationConfig(**s["evaluation"])
        s["nodule_fraction"] = float(raw["preprocess"]["nodule_fraction"])
        return cls(arms=arms, **s)

    def job_threads(self, step: str, cores: int) -> int:
        """A ``prepare`` or ``train`` job's threads on ``cores``: ``processes`` or ``threads`` (0 = all cores)."""
        want = self.processes if step == "prepare" else self.threads or cores
        return max(1, min(want, cores))

    def workers(self, threads: int) -> int:
        """nnU-Net's worker processes (fingerprint, preprocessing): ``processes`` within the job's ``threads``."""
        return max(1, min(self.processes, threads))

    def arm(self, name: str) -> Arm:
        for a in self.arms + self.sweep:
            if a.name == name:
                return a
        raise ConfigError(
            f"segmentation arm {name!r} is not configured; arms are {[a.name for a in self.arms + self.sweep]}"
        )

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def sweep_names(self) -> list[str]:
        return [a.name for a in self.sweep]

    def needs(self, source: str, arms: Sequence[Arm] | None = None) -> bool:
        """Whether any of ``arms`` (default: the arms and the sweep) trains on synthetic cases of ``source``."""
        return any(a.synthetic_fraction > 0 and a.synthetic_source == source for a in (arms or self.arms + self.sweep))


def segmentation_config(config: Mapping[str, Any]) -> SegmentationConfig:
    """Validate a whole config mapping (a copy; defaults filled) and return its ``segmentation`` view."""
    return SegmentationConfig.from_config(validate_config(copy.deepcopy(dict(config))))


def check_arms(
    cfg: SegmentationConfig,
    n_real_train: int,
    n_augment: int,
    n_test: int,
    n_lesion: int = 0,
    arms: Sequence[Arm] | None = None,
) -> None:
    """Fail before any job when the test split is empty, a whole-scale arm (of ``arms``, default ``cfg.arms``: the
    sweep's are checked as its target is planned) needs more synthetic cases than ``augment`` (or the lesion run's
    ``n_lesion`` items) makes or has no training case, or an integer fold is asked for with fewer than 5 training
    cases. (Lesion-scale counts depend on the ROIs found, so :func:`..nnunet.prepare_arm` checks them.)"""
    if n_test == 0:
        raise ConfigError(
            "segmentation: the split has no test case to segment; raise split.test, add cases, or set "
            "segmentation.enabled: false"
        )
    for arm in cfg.arms if arms is None else arms:
        key = f"segmentation.arms[{arm.name}]" if arm in cfg.arms else f"segmentation.sweep.fractions ({arm.name})"
        n_syn = arm.n_synthetic(n_real_train)
        if cfg.scale == "whole" and arm.synthetic_source == "lesion" and n_syn > n_lesion:
            raise ConfigError(
                f"{key}: synthetic_fraction {arm.synthetic_fraction} needs {n_syn} pasted CTs "
                f"({n_real_train} real train cases) but the lesion run makes {n_lesion}; raise "
                "lesion.insert.samples_per_case or lower the fraction"
            )
        if cfg.scale == "whole" and arm.synthetic_source == "volume" and n_syn > n_augment:
            raise ConfigError(
                f"{key}: synthetic_fraction {arm.synthetic_fraction} needs {n_syn} synthetic "
                f"cases ({n_real_train} real train cases) but the augment run makes {n_augment}; raise "
                "sample.samples_per_layout or lower the fraction"
            )
        n = arm.n_real(n_real_train) + n_syn  # lesion scale: synthetic ROIs count from nodule ROIs, checked later
        if n == 0 and not (cfg.scale == "lesion" and arm.synthetic_fraction > 0):
            raise ConfigError(
                f"{key}: no training case (the split has {n_real_train} real train cases); "
                "add cases or raise split.train"
            )
        if cfg.scale == "whole":
            check_fold_cases(cfg, arm.name, n)


def check_fold_cases(cfg: SegmentationConfig, arm: str, n_cases: int) -> None:
    """Integer ``segmentation.folds`` need nnU-Net's 5-fold split, hence >= 5 training cases (else ConfigError)."""
    int_folds = [f for f in cfg.folds if f != "all"]
    if int_folds and n_cases < NNUNET_MIN_CASES_PER_FOLD:
        raise ConfigError(
            f"segmentation.folds: {int_folds} use nnU-Net's 5-fold split, which needs >= "
            f"{NNUNET_MIN_CASES_PER_FOLD} training cases, but arm {arm} has {n_cases}; use folds: [all]"
        )


# Paths (the same patterns as rules/segment.smk, for `lungddpm segment` outside Snakemake)
def state_dir(state: Path, scale: str, arm: str, seed: int) -> Path:
    """nnU-Net's folders of one arm and seed: ``state/segmentation/<scale>/<arm>/seed<seed>``."""
    return Path(state) / "segmentation" / scale / arm / f"seed{seed}"


def arm_dir(results: Path, scale: str, arm: str) -> Path:
    """``results/segmentation/<scale>/<arm>``."""
    return Path(results) / "segmentation" / scale / arm


def prepared_manifest(results: Path, scale: str, arm: str, seed: int) -> Path:
    return arm_dir(results, scale, arm) / f"seed{seed}" / "prepared.json"


def run_manifest(results: Path, scale: str, arm: str, seed: int, fold: str) -> Path:
    return arm_dir(results, scale, arm) / f"seed{seed}" / f"fold_{fold}" / "run.json"


def predictions_dir(results: Path, scale: str, arm: str, seed: int, fold: str) -> Path:
    return arm_dir(results, scale, arm) / f"seed{seed}" / f"fold_{fold}" / "predictions"


def scores_table(results: Path, scale: str, arm: str) -> Path:
    return arm_dir(results, scale, arm) / "scores.csv"
