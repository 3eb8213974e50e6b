"""The segmentation datasets per scale (ROIs, lesion-run ROIs and CTs, real_fraction draws), scoring of ROIs by
kind, the synthetic_fraction sweep, nnU-Net's network resizing and the resampling of pasted CTs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from lungddpm.config import load_config
from lungddpm.errors import ConfigError, LungDDPMError
from lungddpm.io import Geometry, read_json, read_volume, write_csv, write_json, write_volume
from lungddpm.preprocessing.rois import ROI_COLUMNS
from lungddpm.segmentation.arms import Arm, EvaluationConfig, SegmentationConfig
from lungddpm.segmentation.datasets import (
    arm_cases,
    lesion_cases,
    lesion_eval_set,
    lesion_outputs,
    nested_draw,
    whole_cases,
)
from lungddpm.segmentation.evaluate import compare_arms, score_arm, sweep
from lungddpm.segmentation.nnunet import NnUNetError, apply_network, onto_grid

EV = EvaluationConfig(
    connectivity=3, min_overlap_voxels=1, bootstrap=200, ci_level=0.95, paired_test="wilcoxon", seed=0
)
ROI = Geometry(spacing=(1.25, 1.25, 1.25), origin=(0.0, 0.0, 0.0))


def _roi_table(folder: Path, case: str, n_nodules: int, rois_per_nodule: int, n_free: int) -> Path:
    """A ``rois.csv`` with tiny 8^3 ROIs: nodule ROIs carry a 2x2x2 nodule (label 2) at their centre."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [(f"{case}_n{n}_{r}", "nodule", n) for n in range(1, n_nodules + 1) for r in range(rois_per_nodule)]
    for name, kind, n in names + [(f"{case}_f{j}", "free", "") for j in range(n_free)]:
        layout = np.ones((8, 8, 8), np.uint8)
        if kind == "nodule":
            layout[3:5, 3:5, 3:5] = 2
        write_volume(folder / f"{name}_ct.nii.gz", np.where(layout == 2, 20, -800).astype(np.int16), ROI)
        write_volume(folder / f"{name}_layout.nii.gz", layout, ROI)
        rows.append({"roi": name, "case_id": case, "kind": kind, "nodule": n, "ct": f"{name}_ct.nii.gz",
                     "layout": f"{name}_layout.nii.gz", "texture_map": ""})  # fmt: skip
    write_csv(folder / "rois.csv", rows, ROI_COLUMNS)
    return folder / "rois.csv"


def _lesion_run(folder: Path, cases: list[str], sites: int, per_case: int = 1) -> Path:
    """A lesion shard manifest with ``per_case`` items per case, each inserting a nodule into the case's nodule-free
    ROIs ``<case>_f0`` .. ``_f<sites - 1>``."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for case, k in ((c, k) for c in cases for k in range(per_case)):
        item = f"{case}_{k}"
        files = {"ct": f"{item}_ct.nii.gz", "label": f"{item}_label.nii.gz"}
        for j in range(sites):
            files |= {f"s{j}_after": f"{item}_s{j}_after.nii.gz", f"s{j}_layout": f"{item}_s{j}_layout.nii.gz"}
        prov = {"item": item, "source_case": case, "files": files,
                "sites": [{"site": f"{case}_f{j}", "texture_requested": "solid"} for j in range(sites)]}  # fmt: skip
        write_json(folder / f"{item}.json", prov)
        items.append({"item": item, "case_id": case, "skipped": False})
    write_json(folder / "shard_0.json", {"run": "lesion", "items": items})
    return folder / "shard_0.json"


def test_nested_draws_and_real_fraction_counts() -> None:
    small, large = nested_draw(20, 5, [3, 1]), nested_draw(20, 10, [3, 1])
    assert set(small) <= set(large) and len(large) == 10 and nested_draw(20, 5, [4, 1]) != small
    assert Arm("a", True, 0.0, real_fraction=0.25).n_real(9) == 2  # round half up, 2.25 -> 2
    assert Arm("a", True, 0.0, real_fraction=0.01).n_real(9) == 1  # at least one unit when real is on
    assert Arm("a", False, 1.0).n_real(9) == 0 and Arm("a", True, 0.5).n_synthetic(7) == 4
    # exact halves round up though the float product lies below them (0.29 * 50 = 14.499999999999998)
    assert Arm("a", True, 0.29).n_synthetic(50) == 15 and Arm("a", True, 0.57).n_synthetic(50) == 29
    assert Arm("a", True, 0.0, real_fraction=0.35).n_real(90) == 32
    with pytest.raises(ConfigError, match="only 3 exist"):
        nested_draw(3, 4, 0)


def test_lesion_cases_group_a_nodules_rois_and_count_synthetic_by_nodule_rois(tmp_path: Path) -> None:
    tables = [_roi_table(tmp_path / "rois" / c, c, 2, 2, 2) for c in ("c1", "c2")]  # 8 nodule ROIs, 4 free
    shard = _lesion_run(tmp_path / "lesion", ["c1", "c2"], 2, per_case=2)  # 8 inserted nodules, 2 per free ROI
    syn = lesion_outputs([shard], "roi")
    assert [s["id"] for s in syn][:2] == ["c1_0_s0", "c1_0_s1"] and syn[0]["texture"] == "solid"
    assert [s["site"] for s in syn][:3] == ["c1_f0", "c1_f1", "c1_f0"]
    assert syn[0]["image"] == tmp_path / "lesion/c1_0_s0_after.nii.gz"
    full = lesion_cases(Arm("r", True, 0.0), 0, tables, syn, ["t1"])
    assert len(full) == 12 and all(c.kind == "real" for c in full)
    half = lesion_cases(Arm("h", True, 0.5, real_fraction=0.5), 0, tables, syn, ["t1"])
    real_half = [c.identifier for c in half if c.kind == "real"]
    # 2 of 4 nodules with both their ROIs, 2 of 4 free ROIs; a subset of the full draw
    nodules = {i.rsplit("_", 1)[0] for i in real_half if "_n" in i}
    assert len(nodules) == 2 and sum("_n" in i for i in real_half) == 4 and sum("_f" in i for i in real_half) == 2
    assert set(real_half) <= {c.identifier for c in full}
    # synthetic_fraction x all 8 nodule ROIs of the split, whatever real_fraction: 0.5 x 8 = 4, all of them
    # inpainted into the 2 free ROIs this arm sees: one built on a free ROI left out would bring that ROI back
    synthetic = [c.identifier.removeprefix("syn_") for c in half if c.kind == "synthetic"]
    site = {s["id"]: s["site"] for s in syn}
    assert len(synthetic) == 4 and {f"real_{site[i]}" for i in synthetic} == {i for i in real_half if "_f" in i}
    assert len({c.identifier for c in lesion_cases(Arm("s", True, 0.5), 0, tables, syn, ["t1"])} - set(real_half)) > 4
    with pytest.raises(ConfigError, match=r"needs 6 synthetic cases but the lesion run made 4 on the real data this "
                       r"arm sees, with no nodule outline of a train case it leaves out \(real_fraction 0.5\); "
                       r"raise lesion.insert"):  # fmt: skip
        lesion_cases(Arm("h", True, 0.75, 0.5, "lesion"), 0, tables, syn, ["t1"])
    with pytest.raises(ConfigError, match=r"needs 12 synthetic cases but the lesion run made 8; raise lesion.insert"):
        lesion_cases(Arm("x", True, 1.5, synthetic_source="lesion"), 0, tables, syn, ["t1"])
    with pytest.raises(LungDDPMError, match=r"derive from test cases \['c2'\]"):
        lesion_cases(Arm("r", True, 0.0), 0, tables, syn, ["c2"])
    via_inputs = arm_cases("lesion", Arm("h", True, 0.5, 0.5, "lesion"), 0, {"tables": tables, "synthetic": [shard]},
                           ["t1"])  # fmt: skip
    assert [c.identifier for c in via_inputs] == [c.identifier for c in half]


def test_a_low_data_arm_keeps_or_leaves_out_nodules_seen_in_each_others_rois_together(tmp_path: Path) -> None:
    """Case A's nodules 1 and 2 lie 10 mm apart, each in the other's 40 mm ROIs; case B has one. A draw of a third of
    the nodules kept A1's ROIs, which hold A2's label, while A2 counted as left out (seeds 2, 3 and 5)."""
    rows = []
    for case, nodules in (("A", {"1": 0, "2": 10}), ("B", {"1": 0})):
        for n, x in nodules.items():
            for r in range(2):
                roi = f"{case}_n{n}_{r}"
                rows.append({"roi": roi, "case_id": case, "kind": "nodule", "nodule": n, "diameter_mm": 8,
                             "centre_x": x + r, "centre_y": 0, "centre_z": 0, "nodule_x": x, "nodule_y": 0,
                             "nodule_z": 0, "spacing_mm": 1.25, "size": 32, "ct": f"{roi}_ct.nii.gz",
                             "layout": f"{roi}_layout.nii.gz"})  # fmt: skip
        rows.append({"roi": f"{case}_f0", "case_id": case, "kind": "free", "spacing_mm": 1.25, "size": 32,
                     "ct": f"{case}_f0_ct.nii.gz", "layout": f"{case}_f0_layout.nii.gz"})  # fmt: skip
    write_csv(tmp_path / "rois.csv", rows, ROI_COLUMNS)
    drawn = set()
    for seed in range(8):
        cases = lesion_cases(Arm("low", True, 0.0, real_fraction=0.34), seed, [tmp_path / "rois.csv"], [], ["T"])
        kept = frozenset(c.identifier.removeprefix("real_").rsplit("_", 1)[0] for c in cases if "_n" in c.identifier)
        assert kept in ({"A_n1", "A_n2"}, {"B_n1"}), (seed, kept)
        drawn.add(kept)
    assert len(drawn) == 2  # both units are drawn by some seed


def test_a_low_data_arm_draws_no_synthetic_case_holding_an_outline_it_leaves_out(tmp_path: Path) -> None:
    """real_fraction < 1: a synthetic case whose inserted bank nodule comes from a train case with annotations the arm
    leaves out brought that outline back (the baseline at that real_fraction never sees it); such cases are not
    drawn. Outlines of kept cases, and of LIDC scans outside the split, stay."""
    tables = [_roi_table(tmp_path / "rois" / c, c, 2, 1, 2) for c in ("c1", "c2")]  # 4 nodules, 4 free ROIs
    syn = lesion_outputs([_lesion_run(tmp_path / "lesion", ["c1", "c2"], 2, per_case=2)], "roi")
    arm = Arm("h", True, 0.25, 0.5, "lesion")  # 2 of the 4 nodules, 2 of the 4 free ROIs; 0.25 x 4 = 1 synthetic
    half = lesion_cases(arm, 0, tables, syn, ["t"])
    kept = {c.identifier.removeprefix("real_").rsplit("_", 1)[0] for c in half if "_n" in c.identifier}
    left_out = sorted({n.split("_n")[0] for n in {f"{c}_n{k}" for c in ("c1", "c2") for k in (1, 2)} - kept})
    seen = {c.identifier.removeprefix("real_") for c in half if "_f" in c.identifier}
    on_seen = [it["id"] for it in syn if it["site"] in seen]
    assert left_out and len(on_seen) == 4
    # every item on a seen site but one holds an outline of a case with a nodule left out: that one is drawn
    tagged = [{**it, "bank_cases": (left_out[0] if it["id"] in on_seen[1:] else "LIDC-IDRI-0001",)} for it in syn]
    drawn = [c.identifier for c in lesion_cases(arm, 0, tables, tagged, ["t"]) if c.kind == "synthetic"]
    assert drawn == [f"syn_{on_seen[0]}"]
    with pytest.raises(ConfigError, match=r"needs 2 synthetic cases but the lesion run made 1 on the real data this "
                       r"arm sees, with no nodule outline of a train case it leaves out"):  # fmt: skip
        lesion_cases(Arm("h", True, 0.5, 0.5, "lesion"), 0, tables, tagged, ["t"])
    assert len(lesion_cases(Arm("a", True, 1.0, 1.0, "lesion"), 0, tables, tagged, ["t"])) == 12  # all real: no filter
    # the whole scale: an augment layout with a bank nodule of the train CT the arm leaves out
    real = {c: (tmp_path / f"{c}_ct.nii.gz", tmp_path / f"{c}_layout.nii.gz") for c in ("c1", "c2")}
    augment = []
    for case, source in (("c1", "c2"), ("c2", "c1"), ("c1", "c1"), ("c2", "c2")):
        item = f"{case}_{source}"
        write_json(tmp_path / "augment" / f"{item}.json", {"edits": [{"op": "insert", "source_case": source}]})
        augment.append({"item": item, "case_id": case, "image": f"{item}.nii.gz", "layout": f"{item}_layout.nii.gz",
                        "folder": str(tmp_path / "augment")})  # fmt: skip
    cases = whole_cases(Arm("v", True, 0.5, real_fraction=0.5), 0, real, augment, ["t"])
    (own,) = [c.source_case for c in cases if c.kind == "real"]
    assert [(c.source_case, c.bank_cases) for c in cases if c.kind == "synthetic"] == [(own, (own,))]
    # own images named after LIDC patients (LIDC_IDRI_0001.nii.gz): the bank's pylidc case ids are compared by patient
    real = {c: (tmp_path / f"{c}_ct.nii.gz", tmp_path / f"{c}_layout.nii.gz") for c in ("LIDC_IDRI_0001", "p2")}
    banks = (("p2", "LIDC-IDRI-0001"), ("LIDC_IDRI_0001", "LIDC-IDRI-0009"))
    sampled = [{"item": f"{c}_{k}", "case_id": c, "image": "x.nii.gz", "layout": "x_layout.nii.gz", "bank_cases": (b,)}
               for k, (c, b) in enumerate(banks)]  # fmt: skip
    arm = Arm("v", True, 0.5, real_fraction=0.5)
    kept = lambda s: whole_cases(Arm("r", True, 0.0, 0.5), s, real, [], ["t"])[0].source_case  # noqa: E731
    seed = next(s for s in range(20) if kept(s) == "p2")
    with pytest.raises(ConfigError, match="made 0 on the real data this arm sees, with no nodule outline"):
        whole_cases(arm, seed, real, sampled, ["t"])  # p2's only item holds the left-out patient 0001's outline
    # only such arms prepare again (segment_prepare's params): their draw's version
    assert Arm("h", True, 0.5, 0.5).params()["synthetic_draw"] == 2
    assert Arm("a", True, 0.5).params() == {"name": "a", "real": True, "synthetic_fraction": 0.5, "real_fraction": 1.0,
                                            "synthetic_source": "volume"}  # fmt: skip


def test_items_of_other_cases_or_holding_test_patients_nodules_are_refused(tmp_path: Path) -> None:
    """A bank that held a test patient's nodule (a stale or hand-made one) put its contour into training, and a
    lesion item of a case no longer in the train split trained silently at the lesion scale."""
    tables = [_roi_table(tmp_path / "rois" / c, c, 1, 1, 1) for c in ("c1", "c2")]
    shard = _lesion_run(tmp_path / "lesion", ["c1", "c2"], 1)
    prov = read_json(tmp_path / "lesion/c2_0.json")
    prov["sites"][0]["source_case"] = "LIDC-IDRI-0886"  # the bank nodule's scan
    write_json(tmp_path / "lesion/c2_0.json", prov)
    syn = lesion_outputs([shard], "roi")
    assert [s["bank_cases"] for s in syn] == [("",), ("LIDC-IDRI-0886",)]
    assert len(lesion_cases(Arm("s", True, 1.0), 0, tables, syn, ["LIDC-IDRI-0001"])) == 6  # another patient
    with pytest.raises(LungDDPMError, match=r"arm s: synthetic cases hold nodules drawn from test patients: "
                       r"\['syn_c2_0_s0 \(LIDC-IDRI-0886\)'\]; .*rerun nodule_bank and synthesize_lesion"):  # fmt: skip
        lesion_cases(Arm("s", True, 1.0), 0, tables, syn, ["LIDC-IDRI-0886_s1"])  # the patient's other series
    real = {"c1": (tmp_path / "c1_ct.nii.gz", tmp_path / "c1_layout.nii.gz")}
    cts = lesion_outputs([shard], "ct")
    with pytest.raises(LungDDPMError, match=r"synthetic cases hold nodules drawn from test patients: \['syn_c2_0"):
        whole_cases(
            Arm("p", True, 1.0, synthetic_source="lesion"), 0, {**real, "c2": real["c1"]}, cts, ["LIDC-IDRI-0886"]
        )
    with pytest.raises(LungDDPMError, match=r"c2_0.json: lesion item c2_0 of case c2, not a train case .*rerun synth"):
        whole_cases(Arm("p", True, 1.0, synthetic_source="lesion"), 0, real, cts[1:], ["t"])
    with pytest.raises(LungDDPMError, match=r"c2_0.json: lesion item of case c2, not a train case .*\(made before the "
                       r"split changed; 1 such ROIs\); rerun synthesize_lesion"):  # fmt: skip
        lesion_cases(Arm("s", True, 0.5), 0, tables[:1], syn, ["t"])


def test_whole_cases_with_lesion_cts_resample_onto_the_case_grid(tmp_path: Path) -> None:
    real = {c: (tmp_path / f"{c}_ct.nii.gz", tmp_path / f"{c}_layout.nii.gz") for c in ("c1", "c2")}
    shard = _lesion_run(tmp_path / "lesion", ["c1", "c2"], 1)
    items = lesion_outputs([shard], "ct")
    assert [i["id"] for i in items] == ["c1_0", "c2_0"] and items[0]["layout"].name == "c1_0_label.nii.gz"
    cases = whole_cases(Arm("p", True, 1.0, synthetic_source="lesion"), 0, real, items, ["t"])
    syn = [c for c in cases if c.kind == "synthetic"]
    assert [c.identifier for c in syn] == ["syn_c1_0", "syn_c2_0"] and syn[0].grid == real["c1"][0]
    augment = [
        {
            "item": "c1_0",
            "case_id": "c1",
            "image": "results/synthetic/augment/c1_0.nii.gz",
            "layout": "results/synthetic/augment/c1_0_layout.nii.gz",
            "folder": str(tmp_path / "augment"),
        }
    ]
    write_json(tmp_path / "augment/c1_0.json", {"edits": [{"op": "remove"}, {"op": "insert", "source_case": "c9"}]})
    (syn_volume,) = [c for c in whole_cases(Arm("v", True, 0.5), 0, real, augment, ["t"]) if c.kind == "synthetic"]
    assert syn_volume.bank_cases == ("c9",)  # the augment run's inserted bank nodule, checked against the test split
    write_json(tmp_path / "augment/c1_0.json", {"edits": [{"op": "insert", "source_case": "LIDC-IDRI-0886"}]})
    with pytest.raises(LungDDPMError, match=r"synthetic cases hold nodules drawn from test patients: \['syn_c1_0"):
        whole_cases(Arm("v", True, 0.5), 0, real, augment, ["LIDC-IDRI-0886"])
    assert syn_volume.image == tmp_path / "augment" / "c1_0.nii.gz"  # beside its manifest, not in the cwd
    assert syn_volume.layout == tmp_path / "augment" / "c1_0_layout.nii.gz"
    quarter = whole_cases(Arm("q", True, 0.0, real_fraction=0.25), 0, real, [], ["t"])
    assert len(quarter) == 1
    # half the real CTs plus pasted CTs: only those pasted into the CT this arm sees (the others hold the real
    # nodules, and their labels, of a CT left out)
    more = lesion_outputs([_lesion_run(tmp_path / "lesion2", ["c1", "c2"], 1, per_case=2)], "ct")
    half = whole_cases(Arm("h", True, 0.5, real_fraction=0.5, synthetic_source="lesion"), 0, real, more, ["t"])
    (seen,) = [c.source_case for c in half if c.kind == "real"]
    assert [c.source_case for c in half if c.kind == "synthetic"] == [seen]
    with pytest.raises(ConfigError, match=r"needs 2 synthetic cases but the lesion run made 1 on the real data"):
        whole_cases(Arm("h", True, 1.0, real_fraction=0.5, synthetic_source="lesion"), 0, real, items, ["t"])
    # whole-volume samples too: their layouts are the nodule annotations of the CTs they were sampled from
    sampled = [{**augment[0], "item": f"{c}_0", "case_id": c} for c in ("c1", "c2")]
    by_layout = whole_cases(Arm("v", True, 0.5, real_fraction=0.5), 0, real, sampled, ["t"])
    (sampled_from,) = [c.source_case for c in by_layout if c.kind == "synthetic"]
    assert sampled_from == seen  # the same seeded half of the CTs
    # a native 1 mm CT with a 6 mm nodule, resampled onto a 2 mm model grid of the same patient
    native = Geometry(spacing=(1.0, 1.0, 1.0), origin=(-10.0, -10.0, -10.0))
    ct = np.full((20, 20, 20), -900, np.int16)
    target = np.zeros((20, 20, 20), np.uint8)
    target[8:14, 8:14, 8:14] = 1
    ct[target == 1] = 40
    model = Geometry(spacing=(2.0, 2.0, 2.0), origin=(-9.5, -9.5, -9.5))
    write_volume(tmp_path / "grid.nii.gz", np.zeros((10, 10, 10), np.int16), model)
    hu, label, geometry = onto_grid(ct, target, native, tmp_path / "grid.nii.gz", 0.5)
    assert hu.shape == label.shape == (10, 10, 10) and geometry == model and hu.dtype == np.int16
    assert label.sum() == 27 and hu[5, 5, 5] == 40 and hu[0, 0, 0] == -900  # 6 mm = 3 voxels of 2 mm a side
    # a 2 mm nodule centred on a corner of 2 x 2 x 2 coarse voxels covers 1/8 of each; blurred and cut at 0.5 it
    # vanished from the label while its HU stayed in the image
    small = np.zeros((20, 20, 20), np.uint8)
    small[9:11, 9:11, 9:11] = 1
    _, label, _ = onto_grid(ct, small, native, tmp_path / "grid.nii.gz", 0.5)
    assert label.sum() == 1  # its centroid voxel, as the real cases' nodule labels keep it
    _, label, _ = onto_grid(ct, small, native, tmp_path / "grid.nii.gz", 0.05)
    assert label.sum() == 8  # every voxel it covers by at least 5 % (1/8 each, as sampled by 5^3 points)
    # a grid reaching 6 mm beyond the native CT (whose minimum, -900, never reaches the padding): those voxels keep
    # the grid CT's padding, not the native CT's minimum
    wide = Geometry(spacing=(2.0, 2.0, 2.0), origin=(-9.5, -9.5, -15.5))
    write_volume(tmp_path / "wide.nii.gz", np.full((13, 10, 10), -1024, np.int16), wide)
    hu, _, _ = onto_grid(ct, target, native, tmp_path / "wide.nii.gz", 0.5)
    assert hu[:3, 5, 5].tolist() == [-1024] * 3 and hu[3, 5, 5] == -900 and hu[8, 5, 5] == 40


def test_roi_scores_by_kind_and_the_fp_metric(tmp_path: Path) -> None:
    tables = [_roi_table(tmp_path / "rois/t1", "t1", 2, 1, 2)]
    tests = lesion_eval_set(tables)
    assert [(t.identifier, t.kind) for t in tests] == [
        ("t1_n1_0", "nodule"), ("t1_n2_0", "nodule"), ("t1_f0", "free"), ("t1_f1", "free")
    ]  # fmt: skip
    preds = {}
    for t in tests:
        layout = read_volume(t.truth)[0]
        p = (layout == 2).astype(np.uint8)
        if t.identifier == "t1_n2_0":
            p[:] = 0  # a missed nodule
        if t.identifier == "t1_f1":
            p[0, 0, 0] = p[7, 7, 7] = 1  # two false-positive components
        preds[t.identifier] = p
    run = tmp_path / "run.json"
    for case, p in preds.items():
        write_volume(tmp_path / f"pred/{case}.nii.gz", p, ROI)
    write_json(run, {"arm": "real", "seed": 0, "fold": "all",
                     "predictions": {c: str(tmp_path / f"pred/{c}.nii.gz") for c in preds}})  # fmt: skip
    rows = score_arm("real", [run], tests, tmp_path / "scores.csv", EV)
    by = {r["case_id"]: r for r in rows}
    assert by["t1_n1_0"]["dice"] == 1.0 and by["t1_n2_0"]["dice"] == 0.0 and by["t1_n2_0"]["n_found"] == 0
    assert math.isnan(by["t1_n1_0"]["false_positives"]) and math.isnan(by["t1_f0"]["dice"])
    assert by["t1_f0"]["false_positives"] == 0 and by["t1_f1"]["false_positives"] == 2
    out = compare_arms({"real": tmp_path / "scores.csv"}, "real", tmp_path / "c.csv", tmp_path / "c.png", EV)
    got = {r["metric"]: r for r in out}
    assert got["dice"]["mean"] == 0.5 and got["dice"]["n_cases"] == 2
    assert got["fp_per_free_roi"]["mean"] == 1.0 and got["fp_per_free_roi"]["n_cases"] == 2
    assert got["detection_sensitivity"]["mean"] == 0.5
    with open(tmp_path / "scores.csv") as fh:
        assert [r["kind"] for r in csv.DictReader(fh)] == ["free", "free", "nodule", "nodule"]  # by case id
    old = [{k: v for k, v in r.items() if k != "sensitivity"} for r in csv.DictReader(open(tmp_path / "scores.csv"))]
    write_csv(tmp_path / "old.csv", old)  # a table without a metric column: named, with the fix
    with pytest.raises(LungDDPMError, match=r"old.csv: no column sensitivity .*; rerun segment_score"):
        compare_arms({"real": tmp_path / "old.csv"}, "real", tmp_path / "c2.csv", tmp_path / "c2.png", EV)
    write_volume(tmp_path / "pred/t1_f1.nii.gz", np.zeros((4, 4, 4), np.uint8), ROI)  # not the truth's grid
    with pytest.raises(LungDDPMError, match=r"t1_f1.nii.gz: grid \(4, 4, 4\) at .*, but its truth .* is \(8, 8, 8\)"):
        score_arm("real", [run], tests, tmp_path / "scores2.csv", EV)
    # a prediction of the same shape on a test ROI since remade elsewhere (another jitter) was scored as its own
    moved = Geometry(ROI.spacing, (ROI.origin[0] + 10.0, *ROI.origin[1:]))
    write_volume(tmp_path / "pred/t1_f1.nii.gz", preds["t1_f1"], moved)
    with pytest.raises(LungDDPMError, match=r"t1_f1.nii.gz: grid \(8, 8, 8\) at .*, but its truth .*rerun segment_tr"):
        score_arm("real", [run], tests, tmp_path / "scores2.csv", EV)


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    """A fraction's row holds the fraction itself: read back from the arm's name (6 digits) it was 0.333333."""
    scores = {}
    for f, found in ((0.0, 1), (1 / 3, 2), (2.0, 3)):
        rows = [
            {
                "arm": f"sweep_{f:g}x",
                "seed": 0,
                "fold": "all",
                "case_id": f"n{i}",
                "kind": "nodule",
                "dice": 1.0 if i < found else 0.0,
                "sensitivity": 1.0 if i < found else 0.0,
                "specificity": 1.0,
                "detection_sensitivity": 1.0 if i < found else 0.0,
                "false_positives": math.nan,
                "cluster": f"n{i}",
                "n_nodules": 1,
            }
            for i in range(4)
        ]
        rows.append({"arm": f"sweep_{f:g}x", "seed": 0, "fold": "all", "case_id": "f0", "kind": "free",
                     "dice": math.nan, "sensitivity": math.nan, "specificity": 1.0, "detection_sensitivity": math.nan,
                     "false_positives": 3 - f, "cluster": "f0", "n_nodules": 0})  # fmt: skip
        scores[f] = tmp_path / f"{f}.csv"
        write_csv(scores[f], rows)
    out = sweep(scores, tmp_path / "sweep.csv", tmp_path / "sweep.png", EV, 0.25)
    dice = {r["synthetic_fraction"]: r for r in out if r["metric"] == "dice"}
    assert [dice[f]["mean"] for f in (0.0, 1 / 3, 2.0)] == [0.25, 0.5, 0.75]
    assert dice[2.0]["diff"] == pytest.approx(0.5) and dice[0.0]["baseline"] == "sweep_0x"
    assert {r["metric"] for r in out} >= {"fp_per_free_roi"}
    with open(tmp_path / "sweep.csv") as fh:
        assert float(next(csv.DictReader(fh))["synthetic_fraction"]) == 0.0
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_network_resizing_and_scale_config() -> None:
    arch = {
        "features_per_stage": [32, 64, 128, 256, 320],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    }
    plans = {"configurations": {"3d_fullres": {"batch_size": 2, "patch_size": [32, 64, 64],
                                               "architecture": {"arch_kwargs": arch}}}}  # fmt: skip
    network = {"features_base": 8, "features_max": 48, "batch_size": 4, "patch_size": 24}
    with pytest.raises(NnUNetError, match=r"not a multiple of the planned network's total stride \[8, 16, 16\]"):
        apply_network(plans, "3d_fullres", network)
    changes = apply_network(plans, "3d_fullres", {**network, "patch_size": 32})
    conf = plans["configurations"]["3d_fullres"]
    assert arch["features_per_stage"] == [8, 16, 32, 48, 48] and conf["batch_size"] == 4
    assert changes["batch_size"] == [2, 4] and conf["patch_size"] == [32, 32, 32]
    assert apply_network(plans, "3d_fullres", dict.fromkeys(network)) == {}
    raw = load_config(REPO / "config/config.yaml").raw
    seg = SegmentationConfig.from_config(raw)
    assert seg.scale == "lesion" and {a.synthetic_source for a in seg.arms} == {"lesion"}
    assert seg.sweep_names == ["sweep_0x", "sweep_0.5x", "sweep_1x", "sweep_2x"] and seg.arm("sweep_2x").real
    paper = load_config(REPO / "config/paper.yaml", {"data": {"dicom_root": "/data/LIDC-IDRI"}}).raw
    assert SegmentationConfig.from_config(paper).scale == "whole"
    raw["segmentation"]["arms"] = [{"name": "v", "real": True, "synthetic_fraction": 1, "synthetic_source": "volume"}]
    raw["segmentation"]["baseline"] = "v"
    with pytest.raises(ConfigError, match="ROIs come from the lesion run only"):
        SegmentationConfig.from_config(raw)
    raw["segmentation"]["scale"] = "whole"  # a lesion-run CT keeps its real, labelled nodules: not synthetic-only
    raw["segmentation"]["arms"][0].update(real=False, synthetic_source="lesion")
    with pytest.raises(ConfigError, match=r"arms\[v\]: real: false with synthetic_source lesion .* not be synth"):
        SegmentationConfig.from_config(raw)
    raw["segmentation"]["arms"][0].update(real=True)
    assert SegmentationConfig.from_config(raw).arm("v").synthetic_source == "lesion"
    raw["segmentation"]["scale"], raw["lesion"]["enabled"] = "lesion", False
    raw["segmentation"]["arms"][0].pop("synthetic_source")
    with pytest.raises(ConfigError, match="lesion.enabled is false"):
        SegmentationConfig.from_config(raw)
    raw["segmentation"]["enabled"] = False  # segmentation off too: nothing needs the ROIs
    seg = SegmentationConfig.from_config(raw)
    assert (seg.enabled, seg.scale, seg.arm_names) == (False, "lesion", ["v"])


def test_jittered_rois_of_one_nodule_are_one_cluster(tmp_path: Path) -> None:
    from lungddpm.metrics.voxel import bootstrap_ci

    values = [0.0, 0.0, 1.0, 1.0]
    assert bootstrap_ci(values, 300, 0.95, 7, groups=["a", "b", "c", "d"]) == bootstrap_ci(values, 300, 0.95, 7)
    mean, lo, hi = bootstrap_ci(values, 300, 0.95, 7, groups=["n1", "n1", "n2", "n2"])
    assert mean == 0.5 and (lo, hi) == (0.0, 1.0)  # two clusters: only 0, 0.5 and 1 can be drawn
    tests = lesion_eval_set([_roi_table(tmp_path / "rois/t1", "t1", 2, 2, 1)])
    assert [t.cluster for t in tests] == ["t1_n1", "t1_n1", "t1_n2", "t1_n2", "t1_f0"]
    by_patient = lesion_eval_set([tmp_path / "rois/t1/rois.csv"], {"t1": "P7"}, "patient")
    assert {t.cluster for t in by_patient} == {"P7"}  # evaluation.cluster: patient puts every ROI of P7 together
    rows = {arm: [] for arm in ("real", "syn")}
    for t in tests:
        for arm, d in (("real", 0.5), ("syn", 0.5 + (0.1 if t.cluster == "t1_n1" else 0.3))):
            rows[arm].append({"arm": arm, "seed": 0, "fold": "all", "case_id": t.identifier, "kind": t.kind,
                              "cluster": t.cluster, "dice": d if t.kind == "nodule" else math.nan,
                              "sensitivity": math.nan, "specificity": 1.0, "detection_sensitivity": math.nan,
                              "false_positives": 0 if t.kind == "free" else math.nan,
                              "n_nodules": int(t.kind == "nodule")})  # fmt: skip
    for arm in rows:
        write_csv(tmp_path / f"{arm}.csv", rows[arm])
    scores = {arm: tmp_path / f"{arm}.csv" for arm in rows}
    out = {(r["arm"], r["metric"]): r for r in compare_arms(scores, "real", tmp_path / "c.csv", None, EV)}
    dice = out["syn", "dice"]
    assert (dice["n_cases"], dice["n_clusters"]) == (4, 2) and dice["diff"] == pytest.approx(0.2)
    assert dice["p_value"] == pytest.approx(0.5)  # exact Wilcoxon on 2 nodule pairs (+0.1, +0.3), not on 4 ROIs


def test_a_nodule_roi_detects_its_own_nodule_and_neighbours_share_a_cluster(tmp_path: Path) -> None:
    """Two nodules in each other's ROIs: each ROI counts its own nodule for detection (the neighbour's voxels only
    in Dice), and the two nodules are one unit of the intervals and the test."""
    folder = tmp_path / "rois/t1"
    folder.mkdir(parents=True)
    layout = np.ones((8, 8, 8), np.uint8)
    layout[1:3, 1:3, 1:3] = layout[5:7, 5:7, 5:7] = 2  # nodule 1 around index 1.5, nodule 2 around 5.5
    write_volume(folder / "layout.nii.gz", layout, ROI)
    write_volume(folder / "ct.nii.gz", np.where(layout == 2, 20, -800).astype(np.int16), ROI)
    at = {1: 1.5 * 1.25, 2: 5.5 * 1.25, 3: 40.0}  # nodule centres (mm on every axis); nodule 3 lies far away
    rows = [{"roi": f"t1_n{n}_0", "case_id": "t1", "kind": "nodule", "nodule": n, "diameter_mm": 2.5, "size": 8,
             "spacing_mm": 1.25, "ct": "ct.nii.gz", "layout": "layout.nii.gz", "texture_map": "",
             **{f"centre_{a}": 3.5 * 1.25 if n < 3 else 40.0 for a in "xyz"}, **{f"nodule_{a}": at[n] for a in "xyz"}}
            for n in (1, 2, 3)]  # fmt: skip
    write_csv(folder / "rois.csv", rows, ROI_COLUMNS)
    tests = lesion_eval_set([folder / "rois.csv"])
    assert [t.cluster for t in tests] == ["t1_n1+2", "t1_n1+2", "t1_n3"]
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[1:3, 1:3, 1:3] = 1  # nodule 1 found, nodule 2 missed
    write_volume(tmp_path / "pred.nii.gz", pred, ROI)
    predictions = {t.identifier: str(tmp_path / "pred.nii.gz") for t in tests}
    write_json(tmp_path / "run.json", {"arm": "real", "seed": 0, "fold": "all", "predictions": predictions})
    by = {r["case_id"]: r for r in score_arm("real", [tmp_path / "run.json"], tests, tmp_path / "s.csv", EV)}
    assert (by["t1_n1_0"]["n_nodules"], by["t1_n1_0"]["n_found"], by["t1_n2_0"]["n_found"]) == (1, 1, 0)
    assert by["t1_n1_0"]["dice"] == pytest.approx(2 * 8 / (8 + 16)) and by["t1_n1_0"]["truth_voxels"] == 16


def test_nnunet_folds_keep_a_source_case_together() -> None:
    from lungddpm.segmentation.nnunet_stages import grouped_splits

    groups = {f"real_c{c}_n1_{r}": f"c{c}" for c in range(6) for r in range(2)} | {
        f"syn_c{c}_0": f"c{c}" for c in range(6)
    }
    splits = grouped_splits(groups, 12345)
    assert splits is not None and len(splits) == 5 and splits == grouped_splits(groups, 12345)
    assert sorted(k for s in splits for k in s["val"]) == sorted(groups)  # each case validates exactly once
    for s in splits:
        assert not {groups[k] for k in s["val"]} & {groups[k] for k in s["train"]}  # no patient on both sides
        assert sorted(s["train"] + s["val"]) == sorted(groups)
    assert grouped_splits({f"r{i}": f"c{i % 4}" for i in range(8)}, 12345) is None  # 4 patients: no 5 grouped folds


def _score_rows(arm: str, kinds: dict[str, str], dice: float) -> list[dict[str, object]]:
    """One model's scores.csv rows: ``kinds`` case id -> kind; nodule ROIs score ``dice``, the rest NaN."""
    return [{"arm": arm, "seed": 0, "fold": "all", "case_id": c, "kind": k, "cluster": c,
             "dice": dice if k == "nodule" else math.nan, "sensitivity": math.nan, "specificity": 1.0,
             "detection_sensitivity": math.nan, "false_positives": 0 if k == "free" else math.nan, "n_nodules": 1}
            for c, k in kinds.items()]  # fmt: skip


def test_rois_without_free_rois_are_still_the_roi_scale(tmp_path: Path) -> None:
    """Scores without a free-ROI row (e.g. an arm scored on nodule ROIs only) are still ROIs (fp_per_free_roi, with
    no case), not whole CTs: the scale is read from the rows' kind."""
    from lungddpm.report.summary import segmentation_section

    write_csv(tmp_path / "real.csv", _score_rows("real", {"n1": "nodule", "n2": "nodule"}, 0.5))
    out = compare_arms({"real": tmp_path / "real.csv"}, "real", tmp_path / "c.csv", tmp_path / "c.png", EV)
    fp = {r["metric"]: r for r in out}["fp_per_free_roi"]
    assert fp["n_cases"] == 0 and math.isnan(fp["mean"]) and "fp_per_scan" not in {r["metric"] for r in out}
    text = "\n".join(segmentation_section(tmp_path / "c.csv", None, tmp_path))
    assert "Scale: **ROIs**" in text and "whole CTs" not in text


def test_roi_truth_is_26_connected_whatever_the_prediction_connectivity(tmp_path: Path) -> None:
    """A true nodule of two diagonal voxels is one nodule under evaluation.connectivity 1 (the predictions' only)."""
    from lungddpm.segmentation.datasets import EvalCase

    layout = np.ones((6, 6, 6), np.uint8)
    layout[2, 2, 2] = layout[3, 3, 3] = 2
    write_volume(tmp_path / "layout.nii.gz", layout, ROI)
    write_volume(tmp_path / "pred.nii.gz", (layout == 2).astype(np.uint8), ROI)
    write_json(tmp_path / "run.json", {"arm": "real", "seed": 0, "fold": "all",
                                       "predictions": {"r": str(tmp_path / "pred.nii.gz")}})  # fmt: skip
    tests = [EvalCase("r", tmp_path / "ct.nii.gz", tmp_path / "layout.nii.gz", "nodule", "r")]
    faces = EvaluationConfig(1, 1, 200, 0.95, "wilcoxon", 0)
    (row,) = score_arm("real", [tmp_path / "run.json"], tests, tmp_path / "scores.csv", faces)
    assert (row["n_nodules"], row["n_found"], row["detection_sensitivity"]) == (1, 1, 1.0)
    assert row["n_components"] == 2  # the prediction's two voxels: two components with faces only


def test_a_failed_prepare_leaves_no_manifest_and_a_missing_scores_table_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lungddpm segment prepare` stopped by nnU-Net (or a kill) after the raw dataset was rewritten kept the old
    prepared.json, which training then trusted; and compare before score gave a FileNotFoundError traceback."""
    from lungddpm.segmentation import nnunet
    from lungddpm.segmentation.arms import segmentation_config
    from lungddpm.segmentation.evaluate import read_scores

    cfg = segmentation_config(load_config(REPO / "config/config.yaml").raw)
    tables = [_roi_table(tmp_path / "rois" / c, c, 2, 2, 2) for c in ("c1", "c2", "c3")]
    arm = Arm("real", True, 0.0, synthetic_source="lesion")
    out = tmp_path / "prepared.json"
    write_json(out, {"arm": "real", "cases": [{"identifier": "OLD"}], "data_sha256": "old"})

    def killed(*args: object, **kwargs: object) -> None:
        raise NnUNetError("killed during nnU-Net plan")

    monkeypatch.setattr(nnunet, "launch", killed)
    with pytest.raises(NnUNetError, match="killed"):
        nnunet.prepare_arm(arm, 0, lesion_cases(arm, 0, tables, [], ["t"]), ["t"], tmp_path / "state", out, cfg, 1)
    assert any((tmp_path / "state/nnUNet_raw").rglob("*.nii.gz")) and not out.exists()
    with pytest.raises(LungDDPMError, match=r"real/scores.csv: no scores table; score the arm first"):
        read_scores(tmp_path / "real/scores.csv")
