"""The cases of each arm's nnU-Net dataset and of the test set, per segmentation scale (no nnU-Net, no torch).

- ``lesion``: real nodule ROIs (grouped per nodule, so that a nodule's jittered ROIs are drawn together) and
  nodule-free ROIs of the train split, plus ROIs with nodules inpainted by the lesion run; the test set is every
  ROI of the test split. Synthetic ROIs number ``synthetic_fraction`` x the train split's real nodule ROIs.
- ``whole``: the real train CTs on the model grid, plus whole-volume ``augment`` CTs or lesion-run CTs (real train
  CTs with pasted nodules, resampled onto their case's model grid at export); the test set is the test CTs.

Every draw is seeded and nested: for one seed a smaller fraction's cases are inside a larger one's. With
``real_fraction`` < 1 the synthetic cases are drawn from those built on the real data the arm sees (its CTs; its
nodule-free ROIs), so that no real CT or ROI left out comes back under a synthetic name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, LungDDPMError
from ..io import read_json
from ..preprocessing.cases import lidc_patient_in
from ..preprocessing.rois import read_roi_table
from .arms import Arm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingCase:
    """One nnU-Net training case: a CT (int16 HU) and the semantic layout whose label 2 is the target.
    ``grid``: a CT whose grid the pair is resampled onto at export (None = as written)."""

    identifier: str
    image: Path
    layout: Path
    kind: str  # "real" | "synthetic"
    source_case: str
    grid: Path | None = None
    bank_cases: tuple[str, ...] = ()  # a lesion item's inserted nodules: the LIDC cases their contours come from


@dataclass(frozen=True)
class EvalCase:
    """One test image: ``truth`` is the nodule instance map (whole) or the ROI layout (lesion, label 2).
    ``cluster``: the independent unit it belongs to (its nodule or patient, :func:`eval_set`)."""

    identifier: str
    image: Path
    truth: Path
    kind: str  # "scan" | "nodule" | "free"
    source_case: str
    cluster: str = ""
    own: tuple[tuple[str, str], ...] = ()  # a nodule ROI's own nodule: its rois.csv nodule_x/y/z and diameter_mm


def nested_draw(n_total: int, n: int, seed: int | Sequence[int]) -> list[int]:
    """Indices of ``n`` of ``n_total`` units, drawn with ``seed``; a smaller draw is a prefix of a larger one."""
    if n > n_total:
        raise ConfigError(f"{n} cases requested but only {n_total} exist")
    return sorted(np.random.default_rng(seed).permutation(n_total)[:n].tolist())


def shard_items(manifests: Sequence[Path], run: str) -> list[dict[str, Any]]:
    """Items of run ``run`` (``augment`` | ``lesion``) from its shard manifests, sorted by item name; each gets
    ``folder`` (where its files lie)."""
    items: list[dict[str, Any]] = []
    for m in manifests:
        data = read_json(m)
        if data.get("run") != run:
            raise LungDDPMError(f"{m}: a shard manifest of run {data.get('run')!r}, expected {run!r}")
        items += [{**it, "folder": str(Path(m).parent)} for it in data["items"]]
    return sorted(items, key=lambda it: it["item"])


def lesion_outputs(manifests: Sequence[Path], per: str) -> list[dict[str, Any]]:
    """The lesion run's synthetic cases: ``per="roi"`` one per inserted nodule (the inpainted ROI and its layout),
    ``per="ct"`` one per item (the pasted native CT and its label map). Keys: id, image, layout, case_id (and,
    per ROI, site: the nodule-free ROI it was inpainted into, and texture; bank_cases: the LIDC cases of its inserted
    nodules)."""
    out = []
    for it in shard_items(manifests, "lesion"):
        folder = Path(it["folder"])
        prov_path = folder / f"{it['item']}.json"
        prov = read_json(prov_path)
        files = prov["files"]
        if per == "ct":
            out.append({"id": it["item"], "image": folder / files["ct"], "layout": folder / files["label"],
                        "case_id": prov["source_case"], "provenance": prov_path,
                        "bank_cases": tuple(s.get("source_case", "") for s in prov["sites"])})  # fmt: skip
            continue
        for j, site in enumerate(prov["sites"]):
            out.append({"id": f"{it['item']}_s{j}", "image": folder / files[f"s{j}_after"],
                        "layout": folder / files[f"s{j}_layout"], "case_id": prov["source_case"],
                        "site": site.get("site", ""), "texture": site.get("texture_requested", ""),
                        "provenance": prov_path, "bank_cases": (site.get("source_case", ""),)})  # fmt: skip
    return out


def _bank_cases(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The LIDC cases of the bank nodules inserted into a synthetic ``item`` (lesion run or ``augment``)."""
    return tuple(item["bank_cases"]) if "bank_cases" in item else _inserted_from(item)


def _inserted_from(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The LIDC cases of the bank nodules an ``augment`` item's layout edit inserted (its provenance's edits)."""
    if "folder" not in item:
        return ()
    edits = read_json(Path(item["folder"]) / f"{item['item']}.json").get("edits") or []
    return tuple(e.get("source_case", "") for e in edits if e.get("op") == "insert")


def _not_a_train_case(item: Mapping[str, Any], what: str, more: str = "") -> LungDDPMError:
    """The refusal of a lesion ``item`` made on a case that is no train case of the split (a stale lesion run)."""
    return LungDDPMError(f"{item.get('provenance', item.get('id'))}: {what} of case {item['case_id']}, not a "
                         f"train case of this split (made before the split changed{more}); rerun "
                         "synthesize_lesion")  # fmt: skip


def _check_leak(arm: Arm, cases: Sequence[TrainingCase], test_cases: Sequence[str]) -> None:
    """Refuse training cases made on a test case, or holding a nodule drawn from a test patient's (the bank)."""
    leaked = sorted({c.source_case for c in cases} & set(test_cases))
    if leaked:
        raise LungDDPMError(
            f"arm {arm.name}: training cases derive from test cases {leaked}; the synthetic runs must use train "
            "cases only — rerun the split, sample and synthesize_lesion stages"
        )
    tested = {lidc_patient_in(c) for c in test_cases} - {None}
    banked = sorted({f"{c.identifier} ({b})" for c in cases for b in c.bank_cases if lidc_patient_in(b) in tested})
    if banked:
        raise LungDDPMError(
            f"arm {arm.name}: synthetic cases hold nodules drawn from test patients: {banked[:5]}"
            f"{' ...' if len(banked) > 5 else ''}; the nodule bank must leave the test split out — rerun nodule_bank "
            "and synthesize_lesion"
        )


def _log(arm: Arm, seed: int, cases: Sequence[TrainingCase], what: str) -> None:
    n_real = sum(c.kind == "real" for c in cases)
    log.info("arm %s seed %d: %d real + %d synthetic training %s", arm.name, seed, n_real, len(cases) - n_real, what)


def _synthetic(
    arm: Arm,
    items: Sequence[Mapping[str, Any]],
    seen: set[str],
    left_out: set[str],
    key: str,
    n: int,
    seed: int,
    fix: str,
) -> list[Mapping[str, Any]]:
    """``n`` of ``items``, drawn with ``seed``. With ``real_fraction`` < 1 only those built on the real data the arm
    sees (``item[key]`` in ``seen``) whose inserted bank nodules come from no train case with annotations the arm
    leaves out (``left_out``): either would bring a real CT, ROI or nodule outline left out back."""
    if arm.real and arm.real_fraction < 1:
        out = {lidc_patient_in(c) or c for c in left_out}  # by patient: bank cases are pylidc's, own images' not
        items = [it for it in items if it[key] in seen and not {lidc_patient_in(b) or b for b in _bank_cases(it)} & out]
        made = (f"made {len(items)} on the real data this arm sees, with no nodule outline of a train case it leaves "
                f"out (real_fraction {arm.real_fraction:g})")  # fmt: skip
    else:
        made = f"made {len(items)}"
    if n > len(items):
        raise ConfigError(
            f"segmentation.arms[{arm.name}]: synthetic_fraction {arm.synthetic_fraction} needs {n} synthetic cases "
            f"but the {arm.synthetic_source} run {made}; {fix}, or lower the fraction"
        )
    return [items[i] for i in nested_draw(len(items), n, seed)]


def whole_cases(
    arm: Arm,
    seed: int,
    real: Mapping[str, tuple[Path, Path]],
    synthetic: Sequence[Mapping[str, Any]],
    test_cases: Sequence[str],
) -> list[TrainingCase]:
    """The whole-scale training set of ``arm`` for ``seed``.

    real: train case -> (ct, layout) on the model grid; synthetic: ``augment`` items (``item``, ``case_id``,
    ``image``, ``layout``) or :func:`lesion_outputs` (``per="ct"``), as ``arm.synthetic_source`` says; lesion-run
    CTs are resampled onto their case's model grid. test_cases: refused if any training case derives from one.
    """
    names = sorted(real)
    chosen = [names[i] for i in nested_draw(len(names), arm.n_real(len(names)), [seed, 1])]
    cases = [TrainingCase(f"real_{c}", Path(real[c][0]), Path(real[c][1]), "real", c) for c in chosen]
    fix = {"volume": "raise sample.samples_per_layout", "lesion": "raise lesion.insert.samples_per_case"}[
        arm.synthetic_source
    ]
    left_out = set(names) - set(chosen)
    for it in _synthetic(arm, synthetic, set(chosen), left_out, "case_id", arm.n_synthetic(len(real)), seed, fix):
        name = it.get("item", it.get("id"))
        grid = Path(real[it["case_id"]][0]) if arm.synthetic_source == "lesion" and it["case_id"] in real else None
        if arm.synthetic_source == "lesion" and grid is None:
            raise _not_a_train_case(it, f"lesion item {name}")
        image, layout = (Path(it["folder"]) / Path(it[k]).name if "folder" in it else Path(it[k])
                         for k in ("image", "layout"))  # beside its manifest, wherever the command runs  # fmt: skip
        cases.append(TrainingCase(f"syn_{name}", image, layout, "synthetic", it["case_id"], grid,
                                  _bank_cases(it)))  # fmt: skip
    _check_leak(arm, cases, test_cases)
    _log(arm, seed, cases, "CTs")
    return cases


def roi_rows(tables: Sequence[Path]) -> list[dict[str, Any]]:
    """Every ROI of the ``rois.csv`` tables, with its files resolved (``ct_path``, ``layout_path``)."""
    rows = []
    for t in tables:
        for r in read_roi_table(Path(t)):
            rows.append({**r, "ct_path": Path(t).parent / r["ct"], "layout_path": Path(t).parent / r["layout"]})
    return rows


def lesion_cases(
    arm: Arm,
    seed: int,
    tables: Sequence[Path],
    synthetic: Sequence[Mapping[str, Any]],
    test_cases: Sequence[str],
) -> list[TrainingCase]:
    """The lesion-scale training set of ``arm`` for ``seed``: ``real_fraction`` of the train nodules (all their
    ROIs; nodules seen in each other's ROIs, :func:`_sharing_nodules`, drawn together: one's ROIs hold the other's
    label) and of the nodule-free ROIs of ``tables``, plus ``synthetic_fraction`` x the tables' nodule ROIs of the
    lesion run's ROIs (:func:`lesion_outputs`, ``per="roi"``)."""
    rows = roi_rows(tables)
    nodule_rows = [r for r in rows if r["kind"] == "nodule"]
    free = [r for r in rows if r["kind"] == "free"]
    unit_of = _sharing_nodules(nodule_rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(nodule_rows, key=lambda r: (r["case_id"], r["nodule"])):  # units in their first nodule's order
        groups.setdefault(unit_of[(r["case_id"], r["nodule"])], []).append(r)
    keys = list(groups)
    kept = [keys[i] for i in nested_draw(len(keys), arm.n_real(len(keys)), [seed, 1])]
    chosen = [r for k in kept for r in groups[k]]
    left_out = {r["case_id"] for k in set(keys) - set(kept) for r in groups[k]}  # its outlines are not seen
    chosen_free = [free[i] for i in nested_draw(len(free), arm.n_real(len(free)), [seed, 2])]
    chosen += chosen_free
    cases = [TrainingCase(f"real_{r['roi']}", r["ct_path"], r["layout_path"], "real", r["case_id"]) for r in chosen]
    fix = "raise lesion.insert.samples_per_case or lesion.roi.free_per_case"
    seen = {r["roi"] for r in chosen_free}  # a synthetic ROI is a nodule-free ROI with a nodule inpainted
    train = {r["case_id"] for r in rows}
    if stale := [it for it in synthetic if it["case_id"] not in train]:
        raise _not_a_train_case(stale[0], "lesion item", f"; {len(stale)} such ROIs")
    for it in _synthetic(arm, synthetic, seen, left_out, "site", arm.n_synthetic(len(nodule_rows)), seed, fix):
        cases.append(TrainingCase(f"syn_{it['id']}", Path(it["image"]), Path(it["layout"]), "synthetic", it["case_id"],
                                  bank_cases=tuple(it.get("bank_cases", ()))))  # fmt: skip
    if not cases:
        raise ConfigError(f"segmentation.arms[{arm.name}]: no training ROI; check lesion.roi and the split")
    _check_leak(arm, cases, test_cases)
    _log(arm, seed, cases, "ROIs")
    return cases


def lesion_eval_set(
    tables: Sequence[Path], patients: Mapping[str, str] | None = None, cluster: str = "nodule"
) -> list[EvalCase]:
    """Every ROI (nodule and nodule-free) of the test split's ``rois.csv`` tables. Its cluster: with ``cluster``
    "nodule", a nodule ROI's nodule (its jittered ROIs together, and those of a nodule either one's ROIs reach:
    ``<case>_n2+3``) and a nodule-free ROI itself; with "patient", the case's patient (``patients``: case ->
    patient id; the case id where absent)."""
    rows = roi_rows(tables)
    if not any(r["kind"] == "nodule" for r in rows):
        raise LungDDPMError(f"{[str(t) for t in tables]}: the test split has no nodule ROI to segment")

    together = _sharing_nodules(rows)

    def unit(r: Mapping[str, Any]) -> str:
        if cluster == "patient":
            return (patients or {}).get(r["case_id"], r["case_id"])
        return together[(r["case_id"], r["nodule"])] if r["kind"] == "nodule" else r["roi"]

    own = ("nodule_x", "nodule_y", "nodule_z", "diameter_mm")
    return [EvalCase(r["roi"], r["ct_path"], r["layout_path"], r["kind"], r["case_id"], unit(r),
                     tuple((k, r.get(k) or "") for k in own) if r["kind"] == "nodule" else ())
            for r in rows]  # fmt: skip


def _sharing_nodules(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """(case, nodule) -> its cluster name: the nodule with every nodule that one of their ROIs reaches (its centre
    within the ROI's box widened by its radius and a voxel: the nodules' recorded sizes, not their shapes), so that
    two nodules seen in each other's ROIs are one unit."""
    from scipy.sparse.csgraph import connected_components

    nodules = {(r["case_id"], r["nodule"]): r for r in rows if r["kind"] == "nodule"}
    index = {k: i for i, k in enumerate(nodules)}
    reach = np.zeros((len(nodules), len(nodules)), bool)  # [ROI's nodule, nodule it reaches]
    for r in (r for r in rows if r["kind"] == "nodule" and r.get("centre_x") and r.get("size")):
        centre = np.array([float(r[f"centre_{a}"]) for a in "xyz"])
        half = (float(r["size"]) / 2 + 1) * float(r["spacing_mm"])  # the ROI's box and a voxel
        for (case, n), other in nodules.items():
            if case != r["case_id"] or n == r["nodule"] or not other.get("nodule_x"):
                continue
            at = np.array([float(other[f"nodule_{a}"]) for a in "xyz"])
            if np.all(np.abs(at - centre) <= half + float(other.get("diameter_mm") or 0) / 2):
                reach[index[(r["case_id"], r["nodule"])], index[(case, n)]] = True
    if not nodules:
        return {}
    _, group = connected_components(reach | reach.T, directed=False)  # as data.nodules.touching_groups groups
    members: dict[int, list[str]] = {}
    for k in sorted(nodules, key=lambda k: (k[0], int(k[1]) if str(k[1]).isdigit() else 0, str(k[1]))):
        members.setdefault(int(group[index[k]]), []).append(str(k[1]))
    return {k: f"{k[0]}_n{'+'.join(members[int(group[index[k]])])}" for k in nodules}


def whole_eval_set(
    cts: Mapping[str, Path], nodules: Mapping[str, Path], patients: Mapping[str, str] | None = None
) -> list[EvalCase]:
    """The test CTs (case -> ct.nii.gz) with their nodule instance maps (case -> nodules.nii.gz); each CT's cluster
    is its patient (``patients``: case -> patient id; the case id where absent), so two series of one patient are
    one unit."""
    if sorted(cts) != sorted(nodules):
        raise LungDDPMError(f"test CTs {sorted(cts)} and nodule maps {sorted(nodules)} name other cases")
    p = patients or {}
    return [EvalCase(c, Path(cts[c]), Path(nodules[c]), "scan", c, p.get(c, c)) for c in sorted(cts)]


def _paths(inputs: Mapping[str, Any], key: str) -> list[Path]:
    value = inputs.get(key, [])
    return [Path(value)] if isinstance(value, str | Path) else [Path(v) for v in value]


def arm_cases(
    scale: str, arm: Arm, seed: int, inputs: Mapping[str, Any], test_cases: Sequence[str]
) -> list[TrainingCase]:
    """The training set of ``arm`` from the rule's named inputs: ``tables`` (lesion) or ``ct`` + ``layouts``
    (whole), and ``synthetic`` (that run's shard manifests) when the arm uses synthetic cases."""
    synthetic = _paths(inputs, "synthetic") if arm.synthetic_fraction > 0 else []
    if scale == "lesion":
        return lesion_cases(arm, seed, _paths(inputs, "tables"), lesion_outputs(synthetic, "roi"), test_cases)
    real = {p.parent.name: (p, lay) for p, lay in zip(_paths(inputs, "ct"), _paths(inputs, "layouts"))}
    items = shard_items(synthetic, "augment") if arm.synthetic_source == "volume" else lesion_outputs(synthetic, "ct")
    return whole_cases(arm, seed, real, items if synthetic else [], test_cases)


def eval_set(
    scale: str, inputs: Mapping[str, Any], patients: Mapping[str, str] | None = None, cluster: str = "nodule"
) -> list[EvalCase]:
    """The test set from the rule's named inputs: ``tables`` (lesion) or ``ct`` + ``nodules`` (whole); ``patients``
    (case -> patient id) and ``cluster`` (``segmentation.evaluation.cluster``) set each case's independent unit."""
    if scale == "lesion":
        return lesion_eval_set(_paths(inputs, "tables"), patients, cluster)
    cts = {p.parent.name: p for p in _paths(inputs, "ct")}
    return whole_eval_set(cts, {p.parent.name: p for p in _paths(inputs, "nodules")}, patients)


def train_inputs(
    scale: str, arm: Arm, cases: Sequence[str], results: Path | str, synthetic: Mapping[str, Sequence[Any]]
) -> dict[str, list[str]]:
    """An arm's named training inputs under ``results`` (rules/segment.smk and ``lungddpm segment`` alike): the
    train ``cases``' ROI tables (lesion) or CTs and layouts (whole), plus ``synthetic[arm.synthetic_source]`` (that
    run's shard manifests) when the arm uses synthetic cases."""
    res = Path(results)
    if scale == "lesion":
        inputs = {"tables": [str(res / "rois" / c / "rois.csv") for c in cases]}
    else:
        inputs = {
            "ct": [str(res / "preprocessed" / c / "ct.nii.gz") for c in cases],
            "layouts": [str(res / "layouts" / f"{c}.nii.gz") for c in cases],
        }
    if arm.synthetic_fraction > 0:
        inputs["synthetic"] = [str(p) for p in synthetic[arm.synthetic_source]]
    return inputs


def eval_inputs(scale: str, cases: Sequence[str], results: Path | str) -> dict[str, list[str]]:
    """The test set's named inputs under ``results``: every ROI table of the test ``cases`` (lesion) or their CTs
    with their nodule instance maps (whole)."""
    res = Path(results)
    if scale == "lesion":
        return {"tables": [str(res / "rois" / c / "rois.csv") for c in cases]}
    return {
        "ct": [str(res / "preprocessed" / c / "ct.nii.gz") for c in cases],
        "nodules": [str(res / "preprocessed" / c / "nodules.nii.gz") for c in cases],
    }
