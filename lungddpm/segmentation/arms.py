"""Segmentation settings and training arms — light enough for Snakemake's parse (no nnU-Net, no torch).

An arm trains nnU-Net on the real train split and/or synthetic ``augment`` cases (train layouts edited with new
nodules; the target is the layout's nodule label). Every arm is tested on the real test split, which neither the
diffusion model, nor ``augment``, nor any arm's training ever sees. Each arm repeats over ``seeds`` x ``folds``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import validate_config
from ..errors import ConfigError, LungDDPMError
from ..io import read_json

log = logging.getLogger(__name__)

NNUNET_MIN_CASES_PER_FOLD = 5  # nnU-Net's default split is 5-fold: integer folds need >= 5 training cases


@dataclass(frozen=True)
class Arm:
    """One training recipe: the real train split (``real``) plus ``synthetic_fraction`` x its size of synthetic
    ``augment`` cases."""

    name: str
    real: bool
    synthetic_fraction: float

    def n_synthetic(self, n_real: int) -> int:
        """Synthetic cases for ``n_real`` real train cases (rounded half up)."""
        return int(np.floor(self.synthetic_fraction * n_real + 0.5))


@dataclass(frozen=True)
class EvaluationConfig:
    connectivity: int
    min_overlap_voxels: int
    bootstrap: int
    ci_level: float
    paired_test: str
    seed: int


@dataclass(frozen=True)
class SegmentationConfig:
    """Typed view of the validated ``segmentation`` section (see config/schema.yaml)."""

    enabled: bool
    arms: tuple[Arm, ...]
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
    da_processes: int | None
    processes: int
    threads: int
    gpus: int
    evaluation: EvaluationConfig

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> SegmentationConfig:
        """``raw``: the whole validated config mapping. Raises :class:`ConfigError` on inconsistent arms."""
        s = dict(raw["segmentation"])
        arms = tuple(Arm(a["name"], bool(a["real"]), float(a["synthetic_fraction"])) for a in s.pop("arms"))
        names = [a.name for a in arms]
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
        if s["baseline"] not in names:
            raise ConfigError(f"segmentation.baseline: {s['baseline']!r} is not an arm; choose one of {names}")
        s["seeds"] = tuple(int(v) for v in s["seeds"])
        s["folds"] = tuple(str(v) for v in s["folds"])
        for key in ("seeds", "folds"):
            if len(set(s[key])) != len(s[key]):
                raise ConfigError(f"segmentation.{key}: {list(s[key])} repeats a value; list each once")
        s["evaluation"] = EvaluationConfig(**s["evaluation"])
        return cls(arms=arms, **s)

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"segmentation arm {name!r} is not configured; arms are {[a.name for a in self.arms]}")

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def needs_synthetic(self) -> bool:
        return any(a.synthetic_fraction > 0 for a in self.arms)


def segmentation_config(config: Mapping[str, Any]) -> SegmentationConfig:
    """Validate a whole config mapping (a copy; defaults filled) and return its ``segmentation`` view."""
    return SegmentationConfig.from_config(validate_config(copy.deepcopy(dict(config))))


def check_arms(cfg: SegmentationConfig, n_real_train: int, n_augment: int, n_test: int) -> None:
    """Fail before any job when the test split is empty, an arm needs more synthetic cases than ``augment``
    makes or has no training case, or an integer fold is asked for with fewer than 5 training cases."""
    if n_test == 0:
        raise ConfigError(
            "segmentation: the split has no test case to segment; raise split.test, add cases, or set "
            "segmentation.enabled: false"
        )
    int_folds = [f for f in cfg.folds if f != "all"]
    for arm in cfg.arms:
        n_syn = arm.n_synthetic(n_real_train)
        if n_syn > n_augment:
            raise ConfigError(
                f"segmentation.arms[{arm.name}]: synthetic_fraction {arm.synthetic_fraction} needs {n_syn} synthetic "
                f"cases ({n_real_train} real train cases) but the augment run makes {n_augment}; raise "
                "sample.samples_per_layout or lower the fraction"
            )
        n = (n_real_train if arm.real else 0) + n_syn
        if n == 0:
            raise ConfigError(
                f"segmentation.arms[{arm.name}]: no training case (the split has {n_real_train} real train cases); "
                "add cases or raise split.train"
            )
        if int_folds and n < NNUNET_MIN_CASES_PER_FOLD:
            raise ConfigError(
                f"segmentation.folds: {int_folds} use nnU-Net's 5-fold split, which needs >= "
                f"{NNUNET_MIN_CASES_PER_FOLD} training cases, but arm {arm.name} has {n}; use folds: [all]"
            )


@dataclass(frozen=True)
class TrainingCase:
    """One nnU-Net training case: a CT (int16 HU) and the semantic layout whose label 2 is the target."""

    identifier: str
    image: Path
    layout: Path
    kind: str  # "real" | "synthetic"
    source_case: str


def augment_items(manifests: Sequence[Path]) -> list[dict[str, Any]]:
    """Items of the ``augment`` run from its shard manifests, sorted by item name."""
    items: list[dict[str, Any]] = []
    for m in manifests:
        data = read_json(m)
        if data.get("run") != "augment":
            raise LungDDPMError(f"{m}: a shard manifest of run {data.get('run')!r}; the arms train on 'augment' only")
        items += data["items"]
    return sorted(items, key=lambda it: it["item"])


def select_synthetic(items: Sequence[Mapping[str, Any]], n: int, seed: int) -> list[Mapping[str, Any]]:
    """``n`` of ``items`` drawn with ``seed``; for one seed a smaller draw is a prefix of a larger one (so the 0.5x
    arm's cases are inside the 1.0x arm's)."""
    if n > len(items):
        raise ConfigError(f"{n} synthetic cases requested but the augment run has {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


def training_cases(
    arm: Arm,
    seed: int,
    real: Mapping[str, tuple[Path, Path]],
    synthetic: Sequence[Mapping[str, Any]],
    test_cases: Sequence[str],
) -> list[TrainingCase]:
    """The training set of ``arm`` for ``seed``.

    real: train case -> (ct, layout); synthetic: augment manifest items (``item``, ``case_id``, ``image``,
    ``layout``); test_cases: the real test split, refused if any training case derives from it.
    """
    cases: list[TrainingCase] = []
    if arm.real:
        cases += [TrainingCase(f"real_{c}", Path(ct), Path(lay), "real", c) for c, (ct, lay) in sorted(real.items())]
    for it in select_synthetic(synthetic, arm.n_synthetic(len(real)), seed):
        cases.append(
            TrainingCase(f"syn_{it['item']}", Path(it["image"]), Path(it["layout"]), "synthetic", it["case_id"])
        )
    leaked = sorted({c.source_case for c in cases} & set(test_cases))
    if leaked:
        raise LungDDPMError(
            f"arm {arm.name}: training cases derive from test cases {leaked}; the augment run must sample train "
            "layouts only — rerun the split and sample stages"
        )
    log.info(
        "arm %s seed %d: %d real + %d synthetic training cases",
        arm.name,
        seed,
        sum(c.kind == "real" for c in cases),
        sum(c.kind == "synthetic" for c in cases),
    )
    return cases


# Paths (the same patterns as rules/segment.smk, for `lungddpm segment` outside Snakemake)
def state_dir(state: Path, arm: str, seed: int) -> Path:
    """nnU-Net's folders of one arm and seed: ``state/segmentation/<arm>/seed<seed>``."""
    return Path(state) / "segmentation" / arm / f"seed{seed}"


def prepared_manifest(results: Path, arm: str, seed: int) -> Path:
    return Path(results) / "segmentation" / arm / f"seed{seed}" / "prepared.json"


def run_manifest(results: Path, arm: str, seed: int, fold: str) -> Path:
    return Path(results) / "segmentation" / arm / f"seed{seed}" / f"fold_{fold}" / "run.json"


def prediction(results: Path, arm: str, seed: int, fold: str, case: str) -> Path:
    return Path(results) / "segmentation" / arm / f"seed{seed}" / f"fold_{fold}" / "predictions" / f"{case}.nii.gz"


def scores_table(results: Path, arm: str) -> Path:
    return Path(results) / "segmentation" / arm / "scores.csv"
