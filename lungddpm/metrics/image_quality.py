"""Image quality of a synthetic set against real CTs, beside the real-vs-real noise floor.

Distribution metrics (KID, FID, Gaussian MMD on 3D features) compare the synthetic volumes with a *reference*
set of real volumes, and a disjoint *floor* set of real volumes with the same reference, at the same sample
counts (FID and KID depend on N), each with a bootstrap interval. Each is computed on the whole volume and on the
lung region alone, because anatomically-aware sampling copies the real background and inflates whole-volume
similarity. Paired voxel metrics (MSE, MAE, PSNR, SSIM; whole volume and inside the lungs), the HU histogram
distance inside the lungs and nodule HU/size agreement compare each synthetic volume with its real counterpart.
The k synthetic samples of one layout share its real CT and background, and the series of one patient its anatomy,
so every interval resamples whole patients (a cluster bootstrap, the real sets' too), and the pairs are taken in a
canonical order (case, k), so that the same volumes give the same numbers whatever the sharding or rerun history of
the run that made them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data.cache import cache_root
from ..data.images import patient_of
from ..io import read_volume, write_csv
from .distribution import DISTANCES, bootstrap_distance, bootstrap_excess, kid, median_bandwidth, mmd
from .features import FeatureExtractor, build_extractor, cached_features
from .sets import MetricsError, Pair, Volume, real_halves
from .voxel import bootstrap_ci, hu_histogram_distance, nodule_agreement, paired_metrics

log = logging.getLogger(__name__)

SYNTHETIC_VS_REAL = "synthetic-vs-real"
REAL_VS_REAL = "real-vs-real"
PAIRED = "synthetic-vs-real (paired)"
EXCESS = "synthetic minus real-vs-real"  # the distance's excess over the floor, with a paired interval
VOXEL_METRICS = ("mse", "mae", "psnr", "ssim")


def _subsample(size: int, n: int, rng: np.random.Generator) -> list[int]:
    """Indices of ``n`` of ``size`` items (seeded, sorted); all of them when ``n >= size``."""
    return [int(i) for i in sorted(rng.choice(size, n, replace=False))] if n < size else list(range(size))


def _k_of(pair: Pair) -> int:
    """The sample index k of a synthetic ``<case>_<k>`` (-1 for a synthetic named as its case)."""
    suffix = pair.synthetic.name.removeprefix(f"{pair.real.name}_")
    return int(suffix) if suffix.isdigit() and suffix != pair.synthetic.name else -1


def canonical_order(pairs: Sequence[Pair]) -> list[Pair]:
    """``pairs`` sorted by (real case, k, synthetic name), the order the subsample and the bootstraps index: a set of
    pairs gives the same numbers however its manifests (shards, reruns) or folders listed it."""
    return sorted(pairs, key=lambda p: (p.real.name, _k_of(p), p.synthetic.name))


def _features(
    extractor: FeatureExtractor, volumes: Sequence[Volume], region: str, cache_dir: Path, what: str
) -> np.ndarray:
    """[N, D] features of ``volumes`` (``region`` whole or lung)."""
    out = []
    for v in tqdm(volumes, desc=f"features {what} ({region})", unit="volume", mininterval=5):
        if region == "lung" and v.labels is None:
            raise MetricsError(f"{v.image}: the lung region needs a layout for this volume")
        out.append(cached_features(extractor, v.image, cache_dir, v.labels if region == "lung" else None))
    return np.stack(out)


def distribution_rows(
    synthetic: Sequence[Volume],
    reference: Sequence[Volume],
    floor: Sequence[Volume],
    settings: dict[str, Any],
    cache_dir: Path,
    extractor: FeatureExtractor | None = None,
    groups: Sequence[str] | None = None,
    layouts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows (metric, region, comparison, value, CI, N) of every distribution metric, synthetic-vs-real and
    real-vs-real at the same counts (both compare ``n = min(|synthetic|, |floor|)`` volumes with the reference), and
    the synthetic's excess over the floor (:data:`EXCESS`) with a paired interval (:func:`bootstrap_excess`).
    ``groups`` (one label per synthetic volume: its real case's patient) makes the synthetic side's bootstrap resample
    whole patients (None: each volume is its own); the floor and the reference resample by ``Volume.unit``.
    ``layouts`` (one per synthetic volume: its layout) counts the layouts of the set compared (``layouts_a``): fewer
    than its volumes, samples of one layout (correlated) bias the synthetic rows and the excess upward."""
    if groups is not None and len(groups) != len(synthetic):
        raise MetricsError(f"{len(groups)} group labels for {len(synthetic)} synthetic volumes")
    if len(reference) < 2 or min(len(synthetic), len(floor)) < 2:
        raise MetricsError(
            f"distribution metrics need >= 2 volumes per set: {len(synthetic)} synthetic, {len(reference)} "
            f"reference and {len(floor)} floor real volumes; use more cases or test layouts (the synthetic set holds "
            "metrics.samples_per_layout of each)"
        )
    extractor = extractor or build_extractor(settings["features"])
    rng = np.random.default_rng(settings["seed"])
    n = min(len(synthetic), len(floor))
    pick_syn, pick_floor = _subsample(len(synthetic), n, rng), _subsample(len(floor), n, rng)
    sets = {SYNTHETIC_VS_REAL: [synthetic[i] for i in pick_syn], REAL_VS_REAL: [floor[i] for i in pick_floor]}
    n_layouts = len({layouts[i] for i in pick_syn}) if layouts is not None else n
    set_groups = {
        SYNTHETIC_VS_REAL: None if groups is None else [groups[i] for i in pick_syn],
        REAL_VS_REAL: [v.unit for v in sets[REAL_VS_REAL]],
    }
    ref_groups = [v.unit for v in reference]
    log.info(
        "distribution metrics: %d synthetic and %d floor volumes vs %d reference volumes, %s features",
        n,
        n,
        len(reference),
        extractor.identity,
    )
    distances = dict(DISTANCES)
    distances["kid"] = lambda a, b: kid(a, b, settings["kid_subset_size"], settings["kid_subsets"], settings["seed"])
    rows = []
    for region in settings["regions"]:
        ref = _features(extractor, reference, region, cache_dir, "reference")
        feats = {comparison: _features(extractor, volumes, region, cache_dir, comparison)
                 for comparison, volumes in sets.items()}  # fmt: skip
        # MMD: one kernel for the region, its bandwidth the median distance of every set pooled, for both rows, the
        # excess and every resample (a median per call compared two kernels in the excess: the MMD of a larger mean
        # shift could come out smaller)
        if "mmd" in settings["distances"]:
            sigma = median_bandwidth(ref, np.concatenate(list(feats.values())))
            distances["mmd"] = lambda a, b, sigma=sigma: mmd(a, b, sigma)
        for metric in settings["distances"]:
            found = {}
            for comparison in sets:
                found[comparison] = bootstrap_distance(
                    distances[metric], feats[comparison], ref, settings["bootstrap"], settings["ci_level"],
                    settings["seed"], groups_a=set_groups[comparison], groups_b=ref_groups,
                )  # fmt: skip
            found[EXCESS] = bootstrap_excess(
                distances[metric], feats[SYNTHETIC_VS_REAL], feats[REAL_VS_REAL], ref, settings["bootstrap"],
                settings["ci_level"], settings["seed"], (set_groups[SYNTHETIC_VS_REAL], set_groups[REAL_VS_REAL],
                ref_groups),
            )  # fmt: skip
            for comparison, (value, lo, hi) in found.items():
                rows.append({"metric": metric, "region": region, "comparison": comparison, "value": value,
                             "ci_low": lo, "ci_high": hi, "n_a": n, "n_b": len(ref), "features": extractor.identity,
                             "reportable": extractor.reportable, "layouts_a": n_layouts})  # fmt: skip
    return rows


def pair_rows(pairs: Sequence[Pair], settings: dict[str, Any], hu_window: Sequence[float]) -> list[dict[str, Any]]:
    """Per-pair voxel metrics (whole and lung), lung HU histogram distance and nodule agreement, all on both
    volumes clipped to ``hu_window``."""
    rows = []
    for p in tqdm(pairs, desc="paired metrics", unit="pair", mininterval=5):
        real, rg = read_volume(p.real.image)
        syn, sg = read_volume(p.synthetic.image)
        if real.shape != syn.shape or not rg.same_grid(sg):
            raise MetricsError(
                f"{p.synthetic.image} and {p.real.image} are not on the same grid; pair each synthetic volume with "
                "the real case it was sampled for"
            )
        if min(real.shape) < settings["ssim_window"]:
            raise MetricsError(
                f"{p.real.image}: grid {real.shape} is smaller than the {settings['ssim_window']}-voxel SSIM window; "
                "lower metrics.ssim_window"
            )
        # both in the HU window the model's outputs cannot leave (model_to_hu clips to it): a real voxel beyond it
        # (emphysema below -1000 HU, calcium above 400) charged a perfect model in MSE, MAE, W1 and the nodule HU
        real, syn = (np.clip(v.astype(np.float32), *(float(h) for h in hu_window)) for v in (real, syn))
        labels = None
        label_path = p.synthetic.labels or p.real.labels
        if label_path is not None:
            labels, lg = read_volume(label_path)
            if labels.shape != real.shape or not lg.same_grid(rg):
                raise MetricsError(f"{label_path}: layout grid differs from {p.real.image}'s; use the pair's layout")
            if not (labels > 0).any():
                raise MetricsError(f"{label_path}: a layout without lung (no label > 0); use the pair's own layout")
        row: dict[str, Any] = {"synthetic": p.synthetic.name, "real": p.real.name, "patient": p.real.unit}
        regions: dict[str, np.ndarray | None] = {"whole": None}
        if labels is not None:
            regions["lung"] = labels > 0
        for region, mask in regions.items():
            m = paired_metrics(real, syn, mask, hu_window, settings["ssim_window"], settings["ssim_sigma"])
            row.update({f"{k}_{region}": v for k, v in m.items()})
        if labels is not None:
            row["hu_w1_lung"] = hu_histogram_distance(real, syn, labels > 0)
            nod = nodule_agreement(
                real, syn, labels == 2, rg.spacing, settings["nodule_solid_hu"], settings["nodule_margin_voxels"]
            )
            row.update(nod)
            if nod:
                row["nodule_hu_abs_diff"] = abs(nod["nodule_mean_hu_synthetic"] - nod["nodule_mean_hu_real"])
                row["nodule_ml_abs_diff"] = abs(nod["nodule_ml_synthetic"] - nod["nodule_ml_real"])
        rows.append(row)
    return rows


def _summary_key(column: str) -> tuple[str, str] | None:
    """(metric, region) of a per-pair column that is summarised, None for descriptive columns."""
    if column.startswith("nodule_") and column.endswith("_abs_diff"):
        return column.removeprefix("nodule_"), "nodule"
    metric, _, region = column.rpartition("_")
    return (metric, region) if region in ("whole", "lung") else None


def summarize_pairs(per_pair: Sequence[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean over pairs with a bootstrap interval, one row per paired metric and region; the interval resamples
    whole patients (the k samples of one layout share its real CT, the series of one patient its anatomy: one draw,
    not k; a row without a ``patient`` is grouped by its ``real`` case)."""
    columns: list[str] = []
    for r in per_pair:
        columns += [c for c in r if c not in columns and _summary_key(c)]
    rows = []
    for col in columns:
        having = [r for r in per_pair if col in r]
        kept = [r for r in having if np.isfinite(r[col])]
        if len(kept) < len(having):  # SSIM inside a mask no window fits: undefined, not 0
            log.warning("%s: %d of %d pairs undefined, left out of the mean", col, len(having) - len(kept), len(having))
        if not kept:
            continue
        values, groups = [r[col] for r in kept], [r.get("patient") or r["real"] for r in kept]
        metric, region = _summary_key(col)  # type: ignore[misc]
        value, lo, hi = bootstrap_ci(values, settings["bootstrap"], settings["ci_level"], settings["seed"],
                                     groups=groups)  # fmt: skip
        rows.append(
            {
                "metric": metric,
                "region": region,
                "comparison": PAIRED,
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n_a": len(values),
                "n_b": len(set(groups)),  # the patients the interval resamples
                "features": "",
                "reportable": True,
            }
        )
    return rows


def image_quality(
    pairs: Sequence[Pair],
    reference: Sequence[Volume],
    floor: Sequence[Volume],
    settings: dict[str, Any],
    hu_window: Sequence[float],
    out_table: Path,
    out_per_case: Path,
    cache_dir: Path,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Every image-quality metric: the synthetic volumes of ``pairs`` and the ``floor`` real volumes each against the
    ``reference`` real volumes (distribution metrics), and each pair's synthetic against its real (voxel metrics).
    Writes the table (one row per metric x region x comparison) and the per-pair CSV; returns the table rows."""
    torch.set_num_threads(max(1, threads))
    overlap = {v.image for v in floor} & {v.image for v in reference}
    if overlap:
        raise MetricsError(f"the floor set must be disjoint from the reference set; shared: {sorted(overlap)[:3]}")
    pairs = canonical_order(pairs)
    per_layout, taken = int(settings.get("samples_per_layout", 1)), Counter[str]()  # the first of each layout, by k
    chosen = []
    for p in pairs:
        taken[p.real.name] += 1
        if taken[p.real.name] <= per_layout:
            chosen.append(p)
    rows = distribution_rows([p.synthetic for p in chosen], reference, floor, settings, cache_dir,
                             groups=[p.real.unit for p in chosen], layouts=[p.real.name for p in chosen])  # fmt: skip
    per_pair = pair_rows(pairs, settings, hu_window)
    rows += summarize_pairs(per_pair, settings)
    write_csv(out_per_case, per_pair)
    write_csv(out_table, rows)
    return rows


# ---------------------------------------------------------------------------------------------------- folders
def _nifti(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise MetricsError(f"{folder}: not a folder of NIfTI volumes")
    found = sorted(p for p in folder.glob("*.nii*") if not p.name.startswith("."))  # not a killed write's temp
    files: dict[str, Path] = {}
    for p in found:
        name = p.name.removesuffix(".nii.gz").removesuffix(".nii")
        if name in files:
            raise MetricsError(f"{files[name]} and {p.name}: both are volume {name!r}; remove or rename one")
        files[name] = p
    files = {k: v for k, v in files.items() if not k.endswith("_layout")}
    if not files:
        raise MetricsError(f"{folder}: no *.nii / *.nii.gz volumes")
    return files


def _labels_for(name: str, image: Path, labels_dir: Path | None) -> Path | None:
    """``<name>_layout.nii.gz`` beside the image (lungddpm's synthetic layout), else ``labels_dir/<name>.nii.gz``."""
    beside = image.with_name(f"{name}_layout.nii.gz")
    if beside.is_file():
        return beside
    if labels_dir is not None:
        cand = labels_dir / f"{name}.nii.gz"
        if cand.is_file():
            return cand
    return None


def folder_patient(name: str, patient_regex: str | None = None) -> str:
    """The patient of a real volume ``name``, as the split's :func:`lungddpm.data.images.patient_of`: the first group
    of ``patient_regex`` (``data.images.patient_regex``) when given, else the name less a ``_s<n>`` series suffix
    (``LIDC-IDRI-0365_s2`` -> ``LIDC-IDRI-0365``), else the name itself."""
    return patient_of(name, patient_regex)


def folder_sets(
    real_dir: Path,
    synthetic_dir: Path,
    real_labels: Path | None = None,
    seed: int = 0,
    floor_fraction: float = 0.5,
    patient_regex: str | None = None,
) -> tuple[list[Pair], list[Volume], list[Volume]]:
    """Pairs (canonical order), reference and floor from two folders: a synthetic ``<case>_<k>`` (or ``<case>``)
    pairs with real ``<case>``; the real volumes are split by patient (``folder_patient``) into floor and reference
    (``real_halves``), so the real folder needs at least two volumes of patients that no synthetic volume was sampled
    from."""
    real = {
        n: Volume(n, p, _labels_for(n, p, real_labels), folder_patient(n, patient_regex))
        for n, p in _nifti(real_dir).items()
    }
    pairs = []
    for name, path in _nifti(synthetic_dir).items():
        base = name if name in real else name.rpartition("_")[0]
        if base not in real:
            raise MetricsError(f"{path}: no real volume {base!r} (or {name!r}) in {real_dir} to pair it with")
        labels = _labels_for(name, path, None) or real[base].labels  # sampled on its real case's layout
        pairs.append(Pair(Volume(name, path, labels), real[base]))
    sources = [p.real.name for p in pairs]
    patients = {n: v.patient for n, v in real.items()}
    floor, reference = real_halves(list(real.values()), sources, patients, seed, floor_fraction)
    log.info(
        "%d pairs; real volumes: %d floor, %d reference (%d patients)",
        len(pairs),
        len(floor),
        len(reference),
        len(set(patients.values())),
    )
    return canonical_order(pairs), reference, floor


def default_cache_dir() -> Path:
    """The feature cache of the CLI: $LUNGDDPM_CACHE/features or ~/.cache/lungddpm/features."""
    return cache_root() / "features"


def folders_entry(cfg: Config, real: Path, synthetic: Path, real_labels: Path | None, out: Path,
                  cache: Path | None, threads: int) -> list[dict[str, Any]]:  # fmt: skip
    """``lungddpm metrics``: the metrics of two folders of NIfTI volumes (:func:`folder_sets`) into ``out``'s
    ``image_quality.csv`` and ``per_case.csv``, with the config's ``metrics`` settings; returns the table's rows."""
    torch.set_num_threads(threads)
    settings = cfg.raw["metrics"]
    pairs, reference, floor = folder_sets(real, synthetic, real_labels, settings["seed"], settings["floor_fraction"],
                                          cfg.data.images.patient_regex)  # fmt: skip
    return image_quality(pairs, reference, floor, settings, cfg.intensity.hu_window, out / "image_quality.csv",
                         out / "per_case.csv", cache or default_cache_dir(), threads)  # fmt: skip


def workflow_sets(
    manifests: Sequence[Path],
    real: dict[str, tuple[Path, Path]],
    patients: Mapping[str, str],
    seed: int = 0,
    floor_fraction: float = 0.5,
) -> tuple[list[Pair], list[Volume], list[Volume]]:
    """Pairs from the eval run's shard manifests (each item names its image, layout, source case and k), sorted by
    (case, k) whatever the shard count or the order a shard listed them in; ``real`` maps every real case id to its
    (ct, layout) files, split by ``patients`` (case id -> patient id) into floor and reference (``real_halves``)."""
    from ..io import read_json

    pairs, listed_in = [], {}
    volumes = {case: Volume(case, ct, layout, patients[case]) for case, (ct, layout) in real.items()}
    for manifest in manifests:
        for item in read_json(manifest)["items"]:
            case = item["case_id"]
            if case not in volumes:
                raise MetricsError(f"{manifest}: item {item['item']} comes from {case}, which is not a real case input")
            if (first := listed_in.setdefault(item["item"], manifest)) != manifest:
                raise MetricsError(
                    f"{manifest}: item {item['item']} is listed in {first} too (shard manifests of two shardings?); "
                    "rerun the sample rule for this run: snakemake --cores all --forcerun sample"
                )
            pairs.append(Pair(Volume(item["item"], Path(item["image"]), Path(item["layout"])), volumes[case]))
    pairs = canonical_order(pairs)  # the items are named <case>_<k>
    floor, reference = real_halves(
        list(volumes.values()), [p.real.name for p in pairs], {c: patients[c] for c in volumes}, seed, floor_fraction
    )
    return pairs, reference, floor
