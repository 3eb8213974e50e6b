"""The workflow report: ``summary.md``, opening with the downstream nnU-Net comparison (its table and plot), then
fidelity (lesion fidelity beside its real floor, with the gallery; whole-volume image quality beside real-vs-real),
then training, sampler timings, the lesion run and the samples. Figures are PNG files beside the summary."""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..io import read_csv, read_json
from .figures import cells, loss_figure, placeholder_figure, quality_figure

log = logging.getLogger(__name__)

DEMO_NOTE = (
    "> **Demo data.** Every number here comes from procedural thorax phantoms (written as DICOM at real LIDC scan "
    "geometry, nodules at real LIDC contours), small models trained briefly and a handful of "
    "test patients. They show that the pipeline runs end to end and how it is measured; they are not evidence about "
    "real CT."
)


def _fmt(v: str | float) -> str:
    if v == "":  # a CSV cell of an undefined value (e.g. the core of nodules too small to have one)
        return "n/a"
    x = float(v)
    if not np.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _ci(row: dict[str, str], value: str = "value", low: str = "ci_low", high: str = "ci_high") -> str:
    return f"{_fmt(row[value])} [{_fmt(row[low])}, {_fmt(row[high])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


CLUSTER_UNITS = {"nodule": "one nodule's jittered ROIs, with the nodules seen in them",  # evaluation.cluster -> unit
                 "patient": "every ROI of one patient (`segmentation.evaluation.cluster: patient`)"}  # fmt: skip
PAIRED_UNITS = {"mse": "HU²", "mae": "HU", "psnr": "dB", "ssim": "", "hu_w1": "HU", "hu_abs_diff": "HU",
                "ml_abs_diff": "mL"}  # fmt: skip


def _ci_marked(row: dict[str, str] | None, *keys: str) -> str:
    """:func:`_ci` (of ``keys``: value, low, high), marked † where the value lies outside its own interval (the
    resampling bias at small N); an undefined interval (NaN) marks nothing."""
    if not row:
        return ""
    v, lo, hi = cells(row, keys) if keys else cells(row)
    return _ci(row, *keys) + (" †" if v < lo or v > hi else "")


def _mean_sd(mean: str, sd: str, n: str) -> str:
    """'mean ± SD (n=k)'; one nodule has no spread: 'mean (n=1)'."""
    return f"{_fmt(mean)} (n={n})" if n == "1" else f"{_fmt(mean)} ± {_fmt(sd)} (n={n})"


def _pairs(row: dict[str, str]) -> str:
    """'4 (2 patients)': a paired row's pairs, and the patients its interval resamples (``n_b``; metrics 3)."""
    return f"{row['n_a']} ({row['n_b']} patients)"


def quality_section(rows: Sequence[dict[str, str]]) -> list[str]:
    """Markdown: distribution metrics synthetic-vs-real beside real-vs-real, then paired voxel metrics."""
    dist: dict[tuple[str, str], dict[str, dict[str, str]]] = defaultdict(dict)
    paired = []
    for r in rows:
        if r["comparison"].endswith("(paired)"):
            paired.append(r)
        else:
            dist[(r["metric"], r["region"])][r["comparison"]] = r
    out = ["## Image quality (eval run: test layouts)", ""]
    if not rows:
        return [*out, "No image-quality rows: the table is empty (rerun the metrics rule).", ""]
    if dist:
        first = next(iter(dist.values()))
        any_row = next(iter(first.values()))
        out.append(
            f"Features: `{any_row['features']}`. Value [bootstrap confidence interval]; N = volumes per set (the "
            "synthetic and the floor set have the same N, as FID and KID depend on it) vs the real reference set's "
            "volumes. KID, unbiased in N, is the "
            "headline at small N. Resampling duplicates volumes, which biases kernel distances upward at small N: "
            "a distance's own interval can lie above its value (marked †), so compare the sets by the excess, "
            "synthetic minus floor, whose paired interval draws both against the same reference resamples: an "
            "interval above 0 says the synthetic volumes are further from real ones than real ones are."
        )
        if any_row.get("reportable") == "False":
            out.append("**Random-network features: a test configuration, never a reported metric.**")
        syn = next((r for by in dist.values() for c, r in by.items() if c == "synthetic-vs-real"), None)
        if syn and syn.get("layouts_a") and (n := int(syn["n_a"])) > (layouts := int(syn["layouts_a"])):
            out.append(f"**The {n} synthetic volumes come from {layouts} test layouts (metrics.samples_per_layout "
                       f"{-(-n // layouts)}): {CORRELATED}**")  # fmt: skip
        out.append("")
        body = []
        for (metric, region), by in dist.items():
            s, f, e = by.get("synthetic-vs-real"), by.get("real-vs-real"), by.get("synthetic minus real-vs-real")
            body.append([metric.upper(), region, _ci_marked(s), _ci_marked(f), _ci(e) if e else "",
                         f"{(s or f)['n_a']} vs {(s or f)['n_b']}"])  # fmt: skip
        out += _table(["metric", "region", "synthetic vs real", "real vs real (floor)", "synthetic − floor [paired]",
                       "N per set vs reference"], body)  # fmt: skip
        out.append("")
    if paired:
        out += ["Paired voxel metrics (each synthetic volume against the real CT of its layout; the interval resamples "
                "patients, a layout's samples together):", ""]  # fmt: skip
        out += _table(
            ["metric", "region", "unit", "mean [CI]", "pairs (patients resampled)"],
            [[r["metric"], r["region"], PAIRED_UNITS.get(r["metric"], ""), _ci(r), _pairs(r)] for r in paired],
        )
        out.append("")
    return out


def timing_section(manifests: Sequence[Path]) -> list[str]:
    """Markdown: per sampling run, the sampler, steps, volumes and seconds per volume (from the provenance)."""
    runs: dict[str, dict[str, Any]] = {}
    for m in manifests:
        data = read_json(m)
        for item in data["items"]:
            prov = read_json(item["provenance"])
            r = runs.setdefault(data["run"], {"sampler": {}, "steps": {}, "device": {}, "s": []})
            for key in ("sampler", "steps", "device"):  # a resume elsewhere keeps earlier items: every value shown
                r[key][str(prov[key])] = None
            r["s"].append(float(prov["seconds"]))
    body = [
        [run, *(", ".join(r[k]) for k in ("sampler", "steps", "device")), str(len(r["s"])), f"{np.mean(r['s']):.1f}"]
        for run, r in sorted(runs.items())
    ]
    out = ["## Sampling", ""]
    out += _table(["run", "sampler", "steps", "device", "volumes", "seconds per volume"], body)
    return [*out, ""]


def sampled_checkpoints(manifests: Sequence[Path]) -> list[str]:
    """Each checkpoint the whole-volume runs sampled from, as ``path`` (its content digest's prefix, or the file's
    SHA-256 for items sampled before 2026-12-05), from the provenance."""
    provs = [read_json(item["provenance"]) for m in manifests for item in read_json(m)["items"]]
    return sorted({f"`{p['checkpoint']}` (model digest `{p['model_sha256'][:12]}`)" if "model_sha256" in p else
                   f"`{p['checkpoint']}` (SHA-256 `{p['checkpoint_sha256'][:12]}`)" for p in provs})  # fmt: skip


def montage_section(manifests: Sequence[Path], figures: Path, per_run: int, base: Path) -> list[str]:
    """Copy the first ``per_run`` montages and GIF sweeps of each run into ``figures`` and link them (relative to
    ``base``, the summary's folder)."""
    note = "Each montage: rows real CT, layout, synthetic; columns axial, coronal, sagittal. The GIF sweeps the axial slices."  # noqa: E501
    out = ["## Samples", "", note, ""]
    figures.mkdir(parents=True, exist_ok=True)
    shown: dict[str, int] = defaultdict(int)
    for m in manifests:
        data = read_json(m)
        for item in data["items"]:
            if shown[data["run"]] >= per_run:
                continue
            shown[data["run"]] += 1
            for key in ("montage", "gif"):
                src = Path(item[key])
                dst = figures / f"{data['run']}_{src.name}"
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
            out.append(f"**{data['run']} / {item['item']}**  ")
            montage, sweep = (figures / f"{data['run']}_{Path(item[k]).name}" for k in ("montage", "gif"))
            out.append(f"![{item['item']}]({_relative(montage, base)}) ![sweep]({_relative(sweep, base)})")
            out.append("")
    return out


def segmentation_section(comparison: Path, figure: Path | None, base: Path, cluster: str = "nodule") -> list[str]:
    """Markdown: the downstream nnU-Net comparison (mean [CI] per arm and metric, difference from the baseline arm
    with its CI and paired test) and its plot. ``cluster``: ``segmentation.evaluation.cluster`` (nodule, patient)."""
    rows = read_csv(comparison)
    lesion = any(r["metric"] == "fp_per_free_roi" for r in rows)  # named by the scores' kind: ROIs, free ones or not
    out = ["## Downstream nodule segmentation (nnU-Net v2, real test split)", ""]
    out.append(
        "Scale: **ROIs** at native resolution (`segmentation.scale: lesion`): each arm trains on ROIs of the train "
        "patients and is tested on every ROI of the test patients; Dice, voxel sensitivity and detection are over "
        "the nodule ROIs, false positives are connected components per nodule-free ROI."
        if lesion
        else "Scale: **whole CTs** on the model grid (`segmentation.scale: whole`), tested on the test patients' CTs."
    )
    out.append("")
    body = []
    for r in rows:
        mean = f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        diff = f"{_fmt(r['diff'])} [{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}]" if r.get("diff") else ""
        p = f"{_fmt(r['p_value'])} ({r['test']})" if r.get("p_value") else ""
        clusters = f" ({r['n_clusters']} clusters)" if r.get("n_clusters") not in (None, "", r["n_cases"]) else ""
        body.append([r["arm"], r["metric"], mean, diff, p, f"{r['n_cases']}{clusters} x {r['n_models']}"])
    if body:
        if rows[0].get("baseline"):
            out += [f"Baseline arm: `{rows[0]['baseline']}`; a difference is the arm's mean minus the baseline's, "
                    "paired by case.", ""]  # fmt: skip
        out += _table(["arm", "metric", "mean [CI]", "difference from baseline [CI]", "p", "cases x models"], body)
        out.append("")
        out.append(
            f"A cluster is {CLUSTER_UNITS[cluster] if lesion else 'one patient (the CTs of its series together)'}: "
            "intervals resample whole clusters and the paired test compares one mean difference per cluster, so "
            "correlated cases do not overstate confidence."
        )
        out.append("")
    if figure is not None:
        out += [f"![segmentation]({_relative(figure, base)})", ""]
    return out


def fidelity_section(table: Path, figures: Sequence[Path], base: Path) -> list[str]:
    """Markdown: lesion fidelity per texture class, synthetic against real half B beside real half A against B,
    and its figures (margin profiles, gallery)."""
    out = ["## Lesion fidelity (inserted nodules against real nodules of the same texture class)", ""]
    out.append(
        "W1 = Wasserstein-1 distance of the HU histograms inside the nodules, with its bootstrap interval over "
        "patients (lesion.fidelity.ci, both sets resampled, a patient's nodules together); W1 over the floor = the "
        "synthetic row's W1 minus the floor's, with a paired interval (real A, real B and the synthetic set resampled"
        " together: above 0, the synthetic nodules are further from real ones than the sampling of patients "
        "explains); solid = fraction of nodule voxels at or above the solid threshold; sharpness = HU drop per mm "
        "across the boundary; core = the voxels at least lesion.fidelity.core_mm inside it (a dark rim can hide a "
        "bright core in the pooled histogram), core HU their mean, core W1 the W1 of their HU histograms, with its "
        "excess over the floor drawn in the same paired resamples. The floor compares two halves of the real nodules "
        "of disjoint patients; the "
        "synthetic nodules are compared with the same half B. The size-matched rows replace each real half by, per "
        "synthetic nodule, the real nodule of its class nearest in log voxel count, leaving out a synthetic nodule "
        "of a class either half lacks (a small nodule is mostly "
        "partial-volume rim, so sets of different sizes differ even where like sizes agree); their n counts the "
        "distinct real nodules used, and their intervals match again in every resample; with few distinct real "
        "nodules the matched floor is the noisier side, so their excess leans below 0."
    )
    out.append("")
    rows = read_csv(table)
    body = [
        [r["texture_class"], r["comparison"], _counts(r), _w1(r), _w1(r, "w1_excess"),
         f"{_fmt(r['mean_hu_a'])} / {_fmt(r['mean_hu_b'])}", f"{_fmt(r['sd_hu_a'])} / {_fmt(r['sd_hu_b'])}",
         f"{_fmt(r['solid_fraction_a'])} / {_fmt(r['solid_fraction_b'])}",
         f"{_fmt(r['sharpness_a'])} / {_fmt(r['sharpness_b'])}", _fmt(r["profile_l1_hu"]),
         f"{_fmt(r['core_hu_a'])} / {_fmt(r['core_hu_b'])}", _w1(r, "core_w1"), _w1(r, "core_w1_excess")]
        for r in rows
    ]  # fmt: skip
    out += _table(["class", "comparison", "n", "W1 HU", "W1 over the floor HU", "mean HU a / b", "SD HU a / b",
                   "solid a / b", "sharpness HU/mm a / b", "profile L1 HU", "core HU a / b", "core W1 HU",
                   "core W1 over the floor HU"], body)  # fmt: skip
    out.append("")
    made = {r["texture_class"] for r in rows if r["comparison"].startswith("synthetic")}
    unmade = [c for c in dict.fromkeys(r["texture_class"] for r in rows) if c not in made]
    if unmade:  # its table rows, profile and gallery row show the real nodules alone
        out += [f"No synthetic nodule of class {', '.join(unmade)} was inserted: only its floor is shown.", ""]
    if alone := [r["texture_class"] for r in rows if r["comparison"].startswith("synthetic") and r["n_b"] == "0"]:
        out += [f"No real nodule of class {', '.join(alone)} to compare its synthetic ones with: their row shows "
                "their own statistics only.", ""]  # fmt: skip
    out += [f"![{Path(f).stem}]({_relative(Path(f), base)})" for f in figures] + [""]
    return out


def _w1(row: dict[str, str], key: str = "w1") -> str:
    """``{key}_hu`` [its bootstrap interval]; the interval left out where there is none (``bootstrap: 0``, the
    core W1 of a row), and an empty cell where the value is (the excess over the floor of a floor row, a table
    written before the column)."""
    value, low, high = row.get(f"{key}_hu", ""), row.get(f"{key}_ci_low", ""), row.get(f"{key}_ci_high", "")
    if value == "":
        return ""
    if low == "" or high == "":
        return _fmt(value)
    keys = (f"{key}_hu", f"{key}_ci_low", f"{key}_ci_high")
    return _ci_marked(row, *keys) if key in ("w1", "core_w1") else _ci(row, *keys)  # a distance's bias: †


def _counts(row: dict[str, str]) -> str:
    """``n_a vs n_b`` nodules, with the patients (the bootstrap's unit) where the table has them."""
    n = f"{row['n_a']} vs {row['n_b']}"
    return f"{n} ({row['patients_a']} vs {row['patients_b']} patients)" if row.get("patients_a") else n


def lesion_section(
    manifests: Sequence[Path], texture: Path | None, figures: Path, base: Path, montages: int
) -> list[str]:
    """Markdown: the lesion run (nodules inserted into train CTs, sampler, seconds per nodule), the texture-control
    table (``texture``; None: not run), and the before/after montages of the first ``montages`` sites."""
    sites, seconds, cases, shown = [], [], set(), []
    how: dict[str, dict[str, None]] = {k: {} for k in ("sampler", "batch", "device", "feather", "margin")}
    for m in manifests:
        for item in read_json(m)["items"]:
            prov = read_json(Path(m).parent / f"{item['item']}.json")
            sites += prov["sites"]
            seconds += [prov["seconds_per_nodule"]] * len(prov["sites"])  # a mean per nodule, not per item
            cases.add(prov["source_case"])
            shown += [Path(m).parent / prov["files"][f"s{j}_montage"] for j in range(len(prov["sites"]))]
            # each value of the items (a resume keeps items made at another batch size or on another device)
            values = (f"{prov['sample']['sampler']} {prov['sample']['steps']} steps", prov["batch_size"],
                      prov.get("device", "an unrecorded device"), prov["insert"]["feather_mm"],
                      prov["insert"]["margin_mm"])  # fmt: skip
            for seen, value in zip(how.values(), values):
                seen[str(value)] = None
    out = ["## Lesion scale: nodules inpainted into real CTs at native resolution", ""]
    if not cases:  # every item has its source case
        return [*out, "The lesion run inserted no nodules (its manifests list no items).", ""]
    sampler, batch, device, feather, margin = (" / ".join(v) for v in how.values())
    out.append(
        f"{len(sites)} nodules inserted into the nodule-free lung ROIs of {len(cases)} train CT(s), {sampler}, "
        f"{np.mean(seconds):.2f} s of sampling per nodule in a shard job (batched {batch}, on {device}; the shards "
        f"run side by side), pasted back with a {feather} mm feather inside a {margin} mm margin."
    )
    if texture is not None:
        out += ["", "Texture control (the same nodules, sites and seeds per requested class):", ""]
        body = [
            [r["texture_class"], _mean_sd(r["inserted_mean_hu"], r["inserted_sd_hu"], r["n_inserted"]),
             _mean_sd(r["real_mean_hu"], r["real_sd_hu"], r["n_real"]) if r["n_real"] != "0" else "none"]
            for r in read_csv(texture)
        ]  # fmt: skip
        out += _table(["requested texture", "inserted nodules: mean HU", "real train nodules: mean HU"], body)
    out.append("")
    figures.mkdir(parents=True, exist_ok=True)
    for src in shown[:montages]:
        dst = figures / f"lesion_{src.name}"
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        out += [f"**{src.name.removesuffix('_montage.png')}** (ROI before / after / edited layout)  ",
                f"![{src.name}]({_relative(dst, base)})", ""]  # fmt: skip
    return out


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())  # "figures/x.png" below base, "../x.png" beside it


CORRELATED = (
    "a layout's samples share its anatomy and background: the synthetic rows and the excess are biased "
    "upward (above 0 for a perfect generator); upper bounds. More test layouts: samples_per_layout 1"
)
FOR_ARMS_ONLY = (
    "The lesion run ran for the segmentation arms that use it (`synthetic_source: lesion`); its fidelity "
    "and texture control did not (`lesion.enabled: false`: set it to true and rerun to add them)."
)
NOT_RUN = (
    "Not run: `{key}: false` in this run's config. Set it to true and rerun `snakemake --cores all` (the "
    "stages it adds run, and this report is remade)."
)


def write_report(
    out_md: Path,
    image_quality: Path,
    train_log: Path | None,
    manifests: Sequence[Path],
    loss_png: Path,
    quality_png: Path,
    figures: Path,
    montages: int,
    demo: bool,
    segmentation: Path | None = None,
    segmentation_png: Path | None = None,
    lesion_manifests: Sequence[Path] = (),
    lesion_texture: Path | None = None,
    fidelity: Path | None = None,
    fidelity_figures: Sequence[Path] = (),
    cluster: str = "nodule",
) -> None:
    """Write ``summary.md`` and its figures (loss curve — without a training log, an imported or given checkpoint,
    a note naming it —, image-quality bars, copied montages): downstream result first, then fidelity, then samples.
    ``cluster``: ``segmentation.evaluation.cluster``, the lesion scale's unit of the intervals and paired test."""
    rows = read_csv(image_quality)
    if train_log is not None:
        loss_figure(train_log, loss_png)
    else:
        placeholder_figure("not trained here: no training log", loss_png)
    quality_figure(rows, quality_png)
    base = out_md.parent
    md = ["# lungddpm report", ""]
    if demo:
        md += [DEMO_NOTE, ""]
    if segmentation is not None:
        md += segmentation_section(segmentation, segmentation_png, base, cluster)
    else:
        md += ["## Downstream nodule segmentation", "", NOT_RUN.format(key="segmentation.enabled"), ""]
    if fidelity is not None:
        md += fidelity_section(fidelity, fidelity_figures, base)
    elif lesion_manifests:  # lesion.enabled false, the lesion run made for a segmentation arm
        md += ["## Lesion scale", "", FOR_ARMS_ONLY, ""]
    else:
        md += ["## Lesion scale", "", NOT_RUN.format(key="lesion.enabled"), ""]
    md += quality_section(rows)
    md += [f"![image quality]({_relative(quality_png, base)})", ""]
    md += ["## Training (whole-volume model)", ""]
    if train_log is None:
        used = ", ".join(sampled_checkpoints(manifests)) or "no checkpoint"
        md += [f"Not trained here (`model.init_from` or `sample.checkpoint`): the samples came from {used}.", ""]
    md += [f"![training loss]({_relative(loss_png, base)})", ""]
    md += timing_section(manifests)
    if lesion_manifests:
        md += lesion_section(lesion_manifests, lesion_texture, figures, base, montages)
    md += montage_section(manifests, figures, montages, base)
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    log.info("report: %s", out_md)
