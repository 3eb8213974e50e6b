"""Lesion-level fidelity: synthetic nodules against real nodules of the same texture class, beside a real floor.

Per nodule: its HU values, the fraction of its voxels at or above ``solid_hu`` (the solid-volume fraction), a
margin profile — mean HU against the signed distance to the nodule's boundary (negative inside), in bins of
``profile_step_mm`` out to ``profile_mm`` either side — and its *core*, the voxels at least ``core_mm`` inside the
boundary (depth measured as the profile's distance). Per set of nodules: the pooled HU mean and SD, the pooled core
HU mean and SD (a pooled histogram can hide a bright core behind a dark rim), the pooled solid fraction, the mean
profile and its sharpness (HU drop per mm across the boundary, the central difference of the mean profile at +-1
step). Distances between two sets: the Wasserstein-1 distance of the pooled HU histograms, the differences of those
statistics and the mean absolute difference of the profiles; W1 with a percentile bootstrap interval, and for the
synthetic row the excess over the floor, W1(synthetic, B) - W1(A, B), with a paired interval (A, B and the synthetic
set resampled together): an interval above 0 says that the synthetic nodules are further from real ones than real
ones are from each other, beyond the sampling of patients. The same for the cores (a bright, variable core weighs
little in the whole nodule's histogram of a small nodule): the W1 of their pooled HU histograms and its excess.

The floor: the real nodules of a class split into two seeded halves A and B of disjoint patients; the synthetic
nodules are compared with the same half B. Every bootstrap draws whole patients (:attr:`Nodule.unit`), nodules kept
whole: one patient's nodules share scanner, kernel and noise, a patient's two series (``<patient>_s<n>``) hold the
same physical nodules, and the k synthetic nodules of a site share its CT.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import series_patient
from ..diffusion.encoding import TEXTURE_CLASSES
from ..errors import LayoutError
from ..io import read_volume, write_csv
from ..preprocessing.layout import NODULE, VOXEL_RTOL
from .distribution import bootstrap_distance, cluster_draw, draws_only_itself, group_members, unit_halves, w1
from .sets import MetricsError
from .voxel import margin_profile, signed_distance

log = logging.getLogger(__name__)

ALL = "all"
COLUMNS = (
    "texture_class", "comparison", "n_a", "n_b", "w1_hu", "w1_ci_low", "w1_ci_high", "w1_excess_hu",
    "w1_excess_ci_low", "w1_excess_ci_high", "mean_hu_a", "mean_hu_b", "sd_hu_a", "sd_hu_b", "solid_fraction_a",
    "solid_fraction_b", "sharpness_a", "sharpness_b", "profile_l1_hu", "core_hu_a", "core_hu_b", "core_sd_a",
    "core_sd_b", "core_w1_hu", "core_w1_excess_hu", "core_w1_excess_ci_low", "core_w1_excess_ci_high", "patients_a",
    "patients_b",
)  # fmt: skip
EXCESS = tuple(f"{k}_excess_{x}" for k in ("w1", "core_w1") for x in ("hu", "ci_low", "ci_high"))


@dataclass(frozen=True)
class FidelitySettings:
    """``lesion.fidelity`` of the config."""

    solid_hu: float
    profile_mm: float
    profile_step_mm: float
    gallery: int
    seed: int
    core_mm: float
    bootstrap: int = 1000  # resamples of the W1 interval (0: none)
    ci: float = 0.95


@dataclass(frozen=True)
class Nodule:
    """One nodule: ``hu`` [N] inside it, ``core`` [M <= N] its core's, ``profile`` [B] (HU per distance bin),
    ``crop`` [H, W] (axial slice); ``case`` (real: its CT; synthetic: the CT of its site) and that case's
    ``patient`` ("" when unknown)."""

    name: str
    texture_class: str
    hu: np.ndarray
    core: np.ndarray
    solid_fraction: float
    profile: np.ndarray
    crop: np.ndarray
    case: str = ""
    patient: str = ""

    @property
    def unit(self) -> str:
        """The independent unit of the split and the bootstraps: the patient, else the case, else the nodule."""
        return self.patient or self.case or self.name


def patient_of_case(case: str, patients: Mapping[str, str] | None = None) -> str:
    """The patient of ``case``: ``patients[case]`` (the workflow's), else the case id less a ``_s<n>`` series suffix."""
    return (patients or {}).get(case) or series_patient(case)


def profile_bins(s: FidelitySettings) -> np.ndarray:
    """Bin centres (mm) of the margin profile, ``(k + 1/2) x step`` in whole steps out to ``profile_mm`` (not
    beyond: 7 mm in 2 mm steps reaches 6 mm; at least one step) either side: the boundary lies between the two
    central bins."""
    n = max(1, math.floor(s.profile_mm / s.profile_step_mm + 1e-9))
    return (np.arange(-n, n) + 0.5) * s.profile_step_mm


def measure(name: str, cls: str, ct: np.ndarray, mask: np.ndarray, spacing_mm: float, s: FidelitySettings,
            case: str = "", patient: str = "") -> Nodule:  # fmt: skip
    """One nodule's statistics; ``mask`` [Z, Y, X] bool must be non-empty."""
    hu = ct[mask].astype(np.float64)
    signed = signed_distance(mask, spacing_mm)  # one pair of distance transforms for the core and the profile
    # the tolerance: a spacing read from a file is float32 (0.7 -> 0.69999999), which must not drop a whole layer
    core = ct[mask & (signed <= -s.core_mm * (1 - VOXEL_RTOL))].astype(np.float64)
    z = round(np.argwhere(mask)[:, 0].mean())
    return Nodule(name, cls, hu, core, float(np.mean(hu >= s.solid_hu)), margin_profile(ct, mask, spacing_mm,
                  profile_bins(s), signed), ct[z].astype(np.float32), case, patient)  # fmt: skip


def mean_profile(nodules: Sequence[Nodule]) -> np.ndarray:
    """The mean of the nodules' profiles per bin, ignoring NaN (NaN where no nodule reaches the bin)."""
    stack = np.stack([n.profile for n in nodules])
    counts = np.sum(~np.isnan(stack), axis=0)
    return np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)


def _mean_abs(d: np.ndarray) -> float:
    """Mean absolute value over the finite entries (NaN when none)."""
    d = d[np.isfinite(d)]
    return float(np.mean(np.abs(d))) if d.size else float("nan")


def set_stats(nodules: Sequence[Nodule], step_mm: float) -> dict[str, Any]:
    """Pooled mean / SD of HU and of the cores' HU (NaN when no nodule has a core), pooled solid fraction, the mean
    profile and its sharpness (HU per mm)."""
    hu = np.concatenate([n.hu for n in nodules])
    core = np.concatenate([n.core for n in nodules])
    profile = mean_profile(nodules)
    c = len(profile) // 2
    return {
        "n": len(nodules),
        "mean_hu": float(hu.mean()),
        "sd_hu": float(hu.std()),
        "core_hu": float(core.mean()) if core.size else float("nan"),
        "core_sd": float(core.std()) if core.size else float("nan"),
        "solid_fraction": float(sum(n.solid_fraction * n.hu.size for n in nodules) / hu.size),
        "profile": profile,
        "sharpness": float(profile[c - 1] - profile[c]) / step_mm,
    }


def pooled_values(nodules: Sequence[Nodule], idx: np.ndarray, field: str = "hu") -> np.ndarray:
    """The values ``field`` (``hu`` or ``core``) of the nodules ``idx`` (a resample's indices), pooled."""
    return np.concatenate([getattr(nodules[j], field) for j in idx])


def w1_or_nan(a: np.ndarray, b: np.ndarray) -> float:
    """W1 of two pooled value arrays; NaN when either is empty (a set whose nodules have no core)."""
    return w1(a, b) if a.size and b.size else float("nan")


def finite_interval(v: np.ndarray, ci: float) -> tuple[float, float]:
    """The percentile interval (level ``ci``) of the finite resamples ``v``; (NaN, NaN) when none is."""
    v = v[np.isfinite(v)]
    return tuple(float(x) for x in np.quantile(v, [(1 - ci) / 2, (1 + ci) / 2])) if v.size else (np.nan, np.nan)  # type: ignore[return-value]


def excess_intervals(
    a: Sequence[Nodule],
    syn: Sequence[Nodule],
    b: Sequence[Nodule],
    resamples: int,
    ci: float,
    rng: np.random.Generator,
) -> dict[str, tuple[float, float]]:
    """Paired percentile bootstrap intervals of W1(syn, b) - W1(a, b), of the pooled HU (``"w1"``) and of the
    pooled core HU (``"core_w1"``), from the same draws: each resample draws the units (patients) of all three sets
    with replacement, whole, and measures both distances to the same resampled ``b``. A core resample with an empty
    set is left out; (NaN, NaN) for 0 resamples, a set of one patient, or when no core resample is left."""
    units = [group_members([n.unit for n in x]) for x in (a, syn, b)]
    resamples = 0 if draws_only_itself(units) else max(resamples, 0)  # a set of one patient: no interval
    d = np.full((2, resamples), np.nan)
    for i in range(resamples):
        ia, isyn, ib = (cluster_draw(u, rng) for u in units)
        for k, field in enumerate(("hu", "core")):
            ref = pooled_values(b, ib, field)
            d[k, i] = w1_or_nan(pooled_values(syn, isyn, field), ref) - w1_or_nan(pooled_values(a, ia, field), ref)
    return {key: finite_interval(d[k], ci) for k, key in enumerate(("w1", "core_w1"))}


def compare_sets(
    a: Sequence[Nodule],
    b: Sequence[Nodule],
    step_mm: float,
    resamples: int = 0,
    ci: float = 0.95,
    seed: int | Sequence[int] = 0,
) -> dict[str, Any]:
    """One table row of set ``a`` against set ``b`` (both non-empty). W1's percentile bootstrap interval (level
    ``ci``) draws ``resamples`` times (seeded) the units (patients) of ``a`` and ``b`` with replacement, whole; NaN
    for 0 resamples or a side of one patient. Resamples lie above 0 even for a set against itself, so the floor
    row's interval also shows how far apart the sampling of patients alone puts two sets."""
    sa, sb = set_stats(a, step_mm), set_stats(b, step_mm)

    def pooled_w1(ia: np.ndarray, ib: np.ndarray) -> float:  # of two resamples of nodule indices
        return w1(pooled_values(a, ia), pooled_values(b, ib))

    all_a, all_b, units = np.arange(len(a)), np.arange(len(b)), [len({n.unit for n in x}) for x in (a, b)]
    if resamples > 0:  # a side of one patient: no interval (bootstrap_distance's NaN)
        dist, low, high = bootstrap_distance(pooled_w1, all_a, all_b, resamples, ci, seed, min_distinct=1,
                                             groups_a=[n.unit for n in a], groups_b=[n.unit for n in b])  # fmt: skip
    else:
        dist, low, high = pooled_w1(all_a, all_b), float("nan"), float("nan")
    return {
        **dict(n_a=sa["n"], n_b=sb["n"], patients_a=units[0], patients_b=units[1]),
        "w1_hu": dist,
        "w1_ci_low": low,
        "w1_ci_high": high,
        **{f"{k}_a": sa[k] for k in ("mean_hu", "sd_hu", "solid_fraction")},
        **{f"{k}_b": sb[k] for k in ("mean_hu", "sd_hu", "solid_fraction")},
        "sharpness_a": sa["sharpness"],
        "sharpness_b": sb["sharpness"],
        "profile_l1_hu": _mean_abs(sa["profile"] - sb["profile"]),
        **{f"{k}_{side}": st[k] for k in ("core_hu", "core_sd") for side, st in (("a", sa), ("b", sb))},
        "core_w1_hu": w1_or_nan(pooled_values(a, all_a, "core"), pooled_values(b, all_b, "core")),
    }


def patient_halves(nodules: Sequence[Nodule], seed: int | Sequence[int]) -> tuple[list[Nodule], list[Nodule]]:
    """Two disjoint halves (A, B) of ``nodules`` by unit (:attr:`Nodule.unit`, the patient):
    :func:`~lungddpm.metrics.distribution.unit_halves`. Under two units: ([], all)."""
    half_a, half_b = unit_halves([n.unit for n in nodules], seed)
    return [nodules[i] for i in half_a], [nodules[i] for i in half_b]


def real_nodules(
    tables: Sequence[Path], s: FidelitySettings, patients: Mapping[str, str] | None = None
) -> list[Nodule]:
    """The real nodules of ``rois.csv`` tables: each nodule's first ROI, its voxels of its own texture class (the
    ROI's own nodule), with its case and patient (:func:`patient_of_case`)."""
    from ..preprocessing.rois import real_nodule_rois

    return [measure(r["roi"], r["texture_class"], ct, m, g.spacing[0], s, r["case_id"],
                    patient_of_case(r["case_id"], patients)) for r, ct, g, m in real_nodule_rois(tables)]  # fmt: skip


def synthetic_nodules(
    items: Sequence[Mapping[str, Any]], s: FidelitySettings, patients: Mapping[str, str] | None = None
) -> list[Nodule]:
    """The lesion run's inserted nodules (``datasets.lesion_outputs(..., "roi")``): the inpainted ROI inside its
    layout's nodule label, classed by the texture requested (``any`` when unconditional), with its site's case
    (``case_id``) and that case's patient (:func:`patient_of_case`)."""
    out = []
    for it in items:
        ct, geometry = read_volume(it["image"])
        layout, _ = read_volume(it["layout"])
        mask = layout == NODULE
        if not mask.any():
            raise LayoutError(f"{it['layout']}: no nodule label in a lesion-run ROI; rerun synthesize_lesion")
        case = str(it.get("case_id") or "")
        out.append(measure(it["id"], it.get("texture") or "any", ct, mask, geometry.spacing[0], s, case,
                           patient_of_case(case, patients)))  # fmt: skip
    return out


def fidelity(real: Sequence[Nodule], synthetic: Sequence[Nodule], s: FidelitySettings) -> list[dict[str, Any]]:
    """Rows (COLUMNS) per texture class and for all nodules: ``real A vs real B`` (the floor) and ``synthetic vs
    real B``, each with its W1 interval (``s.bootstrap`` resamples), the synthetic row also with its excesses over
    the floor, of W1 and of the cores' W1 (NaN where the class has no floor, or its floor no core); then the same
    two rows with the real halves size-matched to the synthetic nodules (:func:`matched_rows`). A class without
    the nodules for a row has none, a class whose real nodules are one patient's (:attr:`Nodule.unit`) no floor; a
    class with synthetic nodules and no real one a synthetic row of their own statistics (n_b 0)."""
    from .lesion_matched import matched_rows  # it builds on this module's rows

    rows = []
    for k, cls in enumerate([*TEXTURE_CLASSES, ALL]):
        r = [n for n in real if cls in (ALL, n.texture_class)]
        syn = [n for n in synthetic if cls in (ALL, n.texture_class)]
        half_a, half_b = patient_halves(r, [s.seed, k])
        log.log(logging.INFO if half_a or not r else logging.WARNING, "%s: real half A %d nodules of %d patients, "
                "half B %d of %d%s", cls, len(half_a), len({n.unit for n in half_a}), len(half_b),
                len({n.unit for n in half_b}), "" if half_a or not r else ": one patient, no floor")  # fmt: skip
        for j, (name, a) in enumerate((("real A vs real B", half_a), ("synthetic vs real B", syn))):
            if a and half_b:
                seed = [s.seed, k, j]  # each row its own draws: rows do not shift each other
                rows.append({"texture_class": cls, "comparison": name,
                             **compare_sets(a, half_b, s.profile_step_mm, s.bootstrap, s.ci, seed),
                             **dict.fromkeys(EXCESS, float("nan"))})  # fmt: skip
        if syn and not half_b:  # nothing real to compare them with: said, and their own statistics shown
            log.warning("%s: %d synthetic nodules but no real one of this class: no comparison (the %s rows hold "
                        "them)", cls, len(syn), ALL)  # fmt: skip
            rows.append(_unmatched_row(cls, syn, s.profile_step_mm))
        if syn and half_a and half_b:
            floor, synth = rows[-2], rows[-1]
            ci = excess_intervals(half_a, syn, half_b, s.bootstrap, s.ci, np.random.default_rng([s.seed, k, 2]))
            for key, (low, high) in ci.items():
                synth.update({f"{key}_excess_hu": synth[f"{key}_hu"] - floor[f"{key}_hu"],
                              f"{key}_excess_ci_low": low, f"{key}_excess_ci_high": high})  # fmt: skip
            rows += [{"texture_class": cls, **r} for r in matched_rows(half_a, syn, half_b, s, [s.seed, k, 3])]
    logged = ("texture_class", "comparison", "w1_hu", "w1_ci_low", "w1_ci_high", *EXCESS[:3], "mean_hu_a",
              "mean_hu_b", "solid_fraction_a", "solid_fraction_b", "core_w1_hu", *EXCESS[3:], "n_a", "n_b")  # fmt: skip
    for row in rows:
        log.info("%s %s: W1 %.1f HU (%.1f-%.1f; over the floor %.1f, %.1f-%.1f), mean %.0f vs %.0f HU, solid %.2f "
                 "vs %.2f, core W1 %.1f HU (over the floor %.1f, %.1f-%.1f) (n %d vs %d)",
                 *map(row.get, logged))  # fmt: skip
    return rows


def _unmatched_row(cls: str, syn: Sequence[Nodule], step_mm: float) -> dict[str, Any]:
    """A ``synthetic vs real B`` row of a class with no real nodule: the synthetic side's statistics, n_b 0, the
    rest NaN."""
    st = set_stats(syn, step_mm)
    row = {k: float("nan") for k in COLUMNS[2:]}
    row.update({f"{k}_a": st[k] for k in ("mean_hu", "sd_hu", "solid_fraction", "sharpness", "core_hu", "core_sd")})
    return {**row, "texture_class": cls, "comparison": "synthetic vs real B", "n_a": len(syn), "n_b": 0,
            "patients_a": len({n.unit for n in syn}), "patients_b": 0}  # fmt: skip


def fidelity_settings(lesion: Mapping[str, Any]) -> FidelitySettings:
    """``lesion.fidelity`` of a validated config's lesion section (profile_step_mm null = the ROI spacing)."""
    f = dict(lesion["fidelity"])
    f["profile_step_mm"] = f["profile_step_mm"] or float(lesion["roi"]["spacing_mm"])
    return FidelitySettings(**f)


def lesion_fidelity(
    tables: Sequence[Path],
    items: Sequence[Mapping[str, Any]],
    s: FidelitySettings,
    table: Path,
    profiles: Path,
    montage: Path,
    patients: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The fidelity table (``table``, COLUMNS) of the lesion run's nodules (``items``) against the real nodules of
    ``tables``, with the margin profiles (``profiles``) and the gallery (``montage``), both PNG; ``patients``: case
    id -> patient id (the split's; else :func:`patient_of_case`'s guess from the case id)."""
    real, synthetic = real_nodules(tables, s, patients), synthetic_nodules(items, s, patients)
    if not synthetic or len(units := {n.unit for n in real}) < 2:
        raise MetricsError(f"lesion fidelity needs synthetic nodules and real ones of two patients (disjoint halves): "
                         f"{len(synthetic)} synthetic, {len(real)} real of {len(units)} patient(s); check the ROI "
                         "tables and lesion run, or add CTs with nodules (data.demo.n_scans, data.cases)")  # fmt: skip
    from .lesion_figures import gallery, plot_profiles

    rows = fidelity(real, synthetic, s)
    write_csv(table, rows, COLUMNS)
    plot_profiles(real, synthetic, s, Path(profiles))
    gallery(real, synthetic, s, Path(montage))
    return rows
