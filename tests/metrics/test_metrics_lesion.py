"""Lesion fidelity: margin profiles, set statistics and distances on hand-made nodules, the floor's halves."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from lungddpm.errors import LayoutError
from lungddpm.io import Geometry, write_csv, write_volume
from lungddpm.metrics.lesion import (
    ALL,
    COLUMNS,
    FidelitySettings,
    compare_sets,
    excess_intervals,
    fidelity,
    lesion_fidelity,
    margin_profile,
    measure,
    patient_halves,
    patient_of_case,
    profile_bins,
    real_nodules,
)
from lungddpm.metrics.lesion_figures import OTHER, gallery_rows, profile_curves
from lungddpm.metrics.lesion_matched import matched_rows, size_matched
from lungddpm.metrics.sets import MetricsError
from lungddpm.preprocessing.rois import ROI_COLUMNS

S = FidelitySettings(solid_hu=-300, profile_mm=3.0, profile_step_mm=1.0, gallery=2, seed=0, core_mm=1.0)


def _sphere(
    hu_in: float, hu_out: float, radius: float = 4.0, n: int = 16, core_hu: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A ball of ``hu_in`` (and, given ``core_hu``, a centre of that HU out to 2 voxels) in ``hu_out``."""
    z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2
    r2 = z**2 + y**2 + x**2
    mask = r2 <= radius**2
    ct = np.where(mask, hu_in, hu_out)
    return (ct if core_hu is None else np.where(r2 <= 2.0**2, core_hu, ct)).astype(np.float32), mask


@pytest.mark.parametrize("spacing", [1.0, 1.25, 0.7, 0.9, 1.3])
def test_core_keeps_its_layer_at_a_float32_spacing(spacing: float) -> None:
    """A 5^3 cube's layers lie 0.5, 1.5 and 2.5 voxels deep; a core from 1.5 voxels in holds the inner 3^3. The
    spacing as a NIfTI file stores it (float32: 0.7 -> 0.69999999) dropped that layer (1 voxel) before."""
    mask = np.zeros((9, 9, 9), bool)
    mask[2:7, 2:7, 2:7] = True
    settings = replace(S, core_mm=1.5 * spacing)
    got = measure("x", "solid", np.zeros(mask.shape, np.int16), mask, float(np.float32(spacing)), settings)
    assert got.core.size == 27


def test_margin_profile_of_a_step_edge() -> None:
    ct, mask = _sphere(0.0, -800.0)
    bins = profile_bins(S)
    assert list(bins) == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    for reach, step, edge in ((7.0, 2.0, 6.0), (5.0, 2.0, 4.0), (5.0, 1.25, 5.0), (0.9, 1.0, 1.0)):  # whole steps
        wider = profile_bins(replace(S, profile_mm=reach, profile_step_mm=step))  # not beyond (7 / 2 reached 8 mm)
        assert wider[-1] + step / 2 == edge and wider[0] == -wider[-1]
    prof = margin_profile(ct, mask, 1.0, bins)
    assert np.all(prof[:3] == 0.0) and np.all(prof[3:] == -800.0)  # inside at the nodule's HU, outside the lung's
    n = measure("a", "solid", ct, mask, 1.0, S)
    assert n.solid_fraction == 1.0 and n.hu.size == mask.sum() and n.crop.shape == (16, 16)
    soft = measure("b", "solid", np.where(mask, -500.0, -800.0), mask, 1.0, S)
    assert soft.solid_fraction == 0.0


def test_set_distances_known_answers() -> None:
    a = [measure("a", "solid", *_sphere(0.0, -800.0), 1.0, S)]
    shifted = [measure("b", "solid", *_sphere(-100.0, -800.0), 1.0, S)]
    same = compare_sets(a, a, 1.0)
    assert same["w1_hu"] == 0.0 and same["profile_l1_hu"] == 0.0 and same["mean_hu_a"] == same["mean_hu_b"] == 0.0
    d = compare_sets(a, shifted, 1.0)
    assert d["w1_hu"] == pytest.approx(100.0) and d["mean_hu_b"] == pytest.approx(-100.0)
    # the sharp step drops 800 HU between -0.5 and +0.5 mm: 800 HU/mm; the shifted one 700
    assert d["sharpness_a"] == pytest.approx(800.0) and d["sharpness_b"] == pytest.approx(700.0)
    assert d["profile_l1_hu"] == pytest.approx(100.0 * 3 / 6)  # the three inside bins of six differ by 100 HU
    assert compare_sets(shifted, a, 1.0)["profile_l1_hu"] == pytest.approx(50.0)  # a distance: symmetric, >= 0


def test_w1_interval_resamples_whole_nodules() -> None:
    a = [measure(f"a{i}", "solid", *_sphere(-40.0 * i, -800.0), 1.0, S) for i in range(5)]
    b = [measure(f"b{i}", "solid", *_sphere(-300.0 - 40.0 * i, -800.0), 1.0, S) for i in range(5)]
    one = compare_sets(a[:1], a[:1], 1.0, 50, 0.95, 0)  # one nodule (patient) each: every resample the same,
    assert np.isnan(one["w1_ci_low"]) and np.isnan(one["w1_ci_high"])  # no interval (was a zero-width one)
    assert (one["patients_a"], one["patients_b"], one["n_a"]) == (1, 1, 1)
    d = compare_sets(a, b, 1.0, 400, 0.95, 1)
    assert d["w1_ci_low"] < d["w1_hu"] < d["w1_ci_high"]
    # every resample of a lies at -160..0 HU and of b at -460..-300: W1 is 140 at the least and 460 at the most
    assert 140.0 <= d["w1_ci_low"] and d["w1_ci_high"] <= 460.0 and d["w1_ci_high"] - d["w1_ci_low"] > 20.0
    # a set against itself: W1 0; two resamples of it differ a little (a distance's bootstrap lies above 0)
    floor = compare_sets(a, a, 1.0, 400, 0.95, 1)
    assert floor["w1_hu"] == 0.0 <= floor["w1_ci_low"] < floor["w1_ci_high"] < d["w1_ci_low"]
    assert compare_sets(a, b, 1.0, 400, 0.95, 1)["w1_ci_low"] == d["w1_ci_low"]  # seeded: reproducible
    narrow = compare_sets(a, b, 1.0, 400, 0.5, 1)
    assert d["w1_ci_low"] <= narrow["w1_ci_low"] <= narrow["w1_ci_high"] <= d["w1_ci_high"]
    none = compare_sets(a, b, 1.0)  # no resamples: no interval, not a made-up one
    assert np.isnan(none["w1_ci_low"]) and np.isnan(none["w1_ci_high"]) and none["w1_hu"] == d["w1_hu"]


def test_w1_excess_over_the_floor_is_paired() -> None:
    rng = np.random.default_rng
    half_a = [measure(f"a{i}", "solid", *_sphere(-40.0 * i, -800.0), 1.0, S) for i in range(4)]
    half_b = [measure(f"b{i}", "solid", *_sphere(-20.0 - 40.0 * i, -800.0), 1.0, S) for i in range(4)]
    like_real = [measure(f"s{i}", "solid", *_sphere(-40.0 * i, -800.0), 1.0, S) for i in range(4)]  # a copy of A
    far = [measure(f"f{i}", "solid", *_sphere(-400.0 - 40.0 * i, -800.0), 1.0, S) for i in range(4)]
    # a synthetic set like half A: no excess beyond the sampling of nodules, the interval straddles 0
    copy = excess_intervals(half_a, like_real, half_b, 300, 0.95, rng(0))
    assert copy["w1"][0] < 0.0 < copy["w1"][1] and copy["core_w1"][0] < 0.0 < copy["core_w1"][1]
    assert 0.0 < excess_intervals(half_a, far, half_b, 300, 0.95, rng(0))["w1"][0]  # above the floor at every draw
    # the rim of half A around a bright core (+400 HU, 33 of 280 voxels): the pooled histogram dilutes it, the
    # core's W1 (88 core voxels) does not
    bright = [measure(f"c{i}", "solid", *_sphere(-40.0 * i, -800.0, core_hu=400.0 + 40 * i), 1.0, S) for i in range(4)]
    got = excess_intervals(half_a, bright, half_b, 300, 0.95, rng(0))
    assert got["w1"][1] < 100.0 < 140.0 < got["core_w1"][0] < got["core_w1"][1] < 220.0
    assert all(np.isnan(v).all() for v in excess_intervals(half_a, far, half_b, 0, 0.95, rng(0)).values())
    # a half of one patient is the same in every draw: no interval (it was the synthetic set's spread alone)
    one = [dataclasses.replace(n, patient="P1") for n in half_a]
    assert all(np.isnan(v).all() for v in excess_intervals(one, far, half_b, 300, 0.95, rng(0)).values())
    assert np.isnan(matched_rows(one, far, half_b, S, [0, 1])[1]["w1_excess_ci_low"])
    rows = fidelity(half_a + half_b, bright, S)  # the real split draws its own halves; the synthetic row carries it
    by = {(r["texture_class"], r["comparison"]): r for r in rows}
    floor, synth = by["solid", "real A vs real B"], by["solid", "synthetic vs real B"]
    for key in ("w1", "core_w1"):
        assert synth[f"{key}_excess_hu"] == pytest.approx(synth[f"{key}_hu"] - floor[f"{key}_hu"])
        assert synth[f"{key}_excess_ci_low"] < synth[f"{key}_excess_hu"] < synth[f"{key}_excess_ci_high"]
        assert np.isnan(floor[f"{key}_excess_hu"]) and np.isnan(floor[f"{key}_excess_ci_low"])
    assert synth["core_w1_excess_ci_low"] > 0.0 and synth["core_w1_hu"] > 2 * synth["w1_hu"]
    tiny = np.zeros((5, 5, 5), bool)
    tiny[2, 2, 2] = True  # one voxel, no core: that set's core distances are NaN, not an error
    t = [measure("t", "solid", np.zeros((5, 5, 5), np.float32), tiny, 1.0, S)]
    assert np.isnan(excess_intervals(half_a, t, half_b, 50, 0.95, rng(0))["core_w1"]).all()
    assert np.isnan(compare_sets(t, half_b, 1.0)["core_w1_hu"])


def test_size_matched_rows_compare_like_sizes() -> None:
    """Real nodules: large ones near 0 HU, small ones about -300 (mostly rim); synthetic: small ones like the real
    small ones. Pooled over all real sizes they look 270 HU too dark; against real nodules of their size they do
    not."""
    s = dataclasses.replace(S, bootstrap=200)
    big = [measure(f"big{i}", "solid", *_sphere(-10.0 * i, -800.0), 1.0, S) for i in range(4)]
    small = [measure(f"sm{i}", "solid", *_sphere(-290.0 - 5.0 * i, -800.0, radius=2.0), 1.0, S) for i in range(8)]
    syn = [measure(f"s{i}", "solid", *_sphere(-295.0 - 10.0 * i, -800.0, radius=2.0), 1.0, S) for i in range(3)]
    a, b = [big[0], big[2], *small[0::2]], [big[1], big[3], *small[1::2]]  # each: 2 large and 4 small
    assert size_matched(syn, b) == [small[1]] * 3  # 32 voxels each: the first of the tied small ones
    gg = measure("g", "ground-glass", *_sphere(-300.0, -800.0, radius=2.0), 1.0, S)
    assert size_matched(syn[:1], [gg, big[0]]) == [big[0]]  # its own class first, whatever the size
    assert size_matched([gg], [big[0], small[0]]) == [None]  # no ground-glass in the pool: no match, not a solid one
    assert size_matched([gg], [big[0]], [small[0], gg]) == [gg]  # a resample without the class: the full half's
    anyone = dataclasses.replace(syn[0], texture_class="any")  # lesion.insert.texture: any matches every class
    assert size_matched([anyone], [gg, big[0]]) == [gg] and matched_rows(a, [anyone], b, s, [0, 1])
    assert matched_rows(a, [gg], b, s, [0, 1]) == []  # no class of the halves: no size-matched rows
    kept = matched_rows(a, [*syn, gg], b, s, [0, 1])[1]  # the ground-glass nodule is left out, not matched to solid
    assert kept["n_a"] == 3 and kept["w1_hu"] == matched_rows(a, syn, b, s, [0, 1])[1]["w1_hu"]
    plain = compare_sets(syn, b, 1.0)
    assert plain["w1_hu"] > 150.0 > 50.0 > compare_sets(a, b, 1.0)["w1_hu"]  # far above the plain floor
    floor, synth = matched_rows(a, syn, b, s, [0, 1])
    assert floor["comparison"] == "real A vs real B, size-matched" and synth["comparison"].startswith("synthetic")
    assert (floor["n_a"], floor["n_b"], synth["n_a"], synth["n_b"]) == (1, 1, 3, 1)  # distinct used (ties: the first)
    assert synth["w1_hu"] < 20.0 and synth["mean_hu_a"] == pytest.approx(-305.0) and synth["mean_hu_b"] == -295.0
    assert synth["w1_excess_hu"] == pytest.approx(synth["w1_hu"] - floor["w1_hu"])
    assert synth["w1_excess_ci_low"] <= synth["w1_excess_hu"] <= synth["w1_excess_ci_high"] < 30.0
    assert floor["w1_ci_low"] <= floor["w1_hu"] <= floor["w1_ci_high"] and np.isnan(floor["w1_excess_hu"])
    assert matched_rows(a, syn, b, s, [0, 1])[1]["w1_excess_ci_low"] == synth["w1_excess_ci_low"]  # seeded
    far = [measure(f"f{i}", "solid", *_sphere(-600.0, -800.0, radius=2.0), 1.0, S) for i in range(3)]
    assert matched_rows(a, far, b, s, [0, 1])[1]["w1_excess_ci_low"] > 200.0  # a real gap at matched size stays


def test_core_is_the_voxels_deep_inside() -> None:
    # a bright core of radius 2 in a dark rim out to radius 4, on a 1 mm grid; core_mm 1: depth - 0.5 >= 1 mm
    ct, mask = _sphere(-400.0, -800.0)
    zz, yy, xx = np.mgrid[:16, :16, :16] - 7.5
    ct = np.where(zz**2 + yy**2 + xx**2 <= 2.0**2, 50.0, ct).astype(np.float32)
    n = measure("c", "solid", ct, mask, 1.0, S)
    depth = ndi.distance_transform_edt(mask) - 0.5
    assert n.core.size == int((mask & (depth >= 1.0)).sum()) > 0 and n.core.size < n.hu.size
    assert -400.0 <= n.core.min() and n.core.mean() > n.hu.mean()  # the core leaves the outer layer out
    d = compare_sets([n], [measure("f", "solid", *_sphere(-400.0, -800.0), 1.0, S)], 1.0)
    assert d["core_hu_a"] == pytest.approx(n.core.mean()) and d["core_hu_b"] == -400.0 and d["core_sd_b"] == 0.0
    tiny = np.zeros((5, 5, 5), bool)
    tiny[2, 2, 2] = True  # one voxel: no core, NaN rather than an error
    t = measure("t", "solid", np.zeros((5, 5, 5), np.float32), tiny, 1.0, S)
    assert t.core.size == 0 and np.isnan(compare_sets([t], [t], 1.0)["core_hu_a"])


def test_floor_halves_are_disjoint_and_share_the_reference() -> None:
    real = [measure(f"r{i}", "solid", *_sphere(-50.0 * i, -800.0), 1.0, S) for i in range(6)]
    real += [measure("g0", "ground-glass", *_sphere(-600.0, -800.0), 1.0, S)]
    syn = [measure(f"s{i}", "solid", *_sphere(-400.0, -800.0), 1.0, S) for i in range(3)]
    rows = fidelity(real, syn, S)
    by = {(r["texture_class"], r["comparison"]): r for r in rows}
    floor, synth = by["solid", "real A vs real B"], by["solid", "synthetic vs real B"]
    assert (floor["n_a"], floor["n_b"], synth["n_a"], synth["n_b"]) == (3, 3, 3, 3)
    assert floor["mean_hu_b"] == synth["mean_hu_b"]  # the same half B
    assert synth["w1_hu"] > floor["w1_hu"]
    # one real ground-glass nodule: no floor, and no synthetic of that class either
    assert ("ground-glass", "real A vs real B") not in by and ("ground-glass", "synthetic vs real B") not in by
    assert by["all", "real A vs real B"]["n_a"] + by["all", "real A vs real B"]["n_b"] == 7
    assert ("part-solid", "real A vs real B") not in by


def test_lesion_fidelity_reads_rois_and_the_lesion_run(tmp_path: Path) -> None:
    g = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    rows = []
    for i in range(4):
        ct, mask = _sphere(-40.0 * i, -820.0)
        write_volume(tmp_path / f"n{i}_ct.nii.gz", ct.astype(np.int16), g)
        write_volume(tmp_path / f"n{i}_tex.nii.gz", np.where(mask, 3, 0).astype(np.uint8), g)  # 3 = solid's label
        rows.append({"roi": f"c_n{i + 1}_0", "case_id": f"c{i}", "kind": "nodule", "texture_class": "solid",
                     "ct": f"n{i}_ct.nii.gz", "layout": "", "texture_map": f"n{i}_tex.nii.gz"})  # fmt: skip
    write_csv(tmp_path / "rois.csv", rows, ROI_COLUMNS)
    ct, mask = _sphere(-200.0, -820.0, radius=3.0)
    write_volume(tmp_path / "s_after.nii.gz", ct.astype(np.int16), g)
    write_volume(tmp_path / "s_layout.nii.gz", np.where(mask, 2, 1).astype(np.uint8), g)
    items = [{"id": "c_0_s0", "image": tmp_path / "s_after.nii.gz", "layout": tmp_path / "s_layout.nii.gz",
              "texture": "solid"}]  # fmt: skip
    out = tmp_path / "out"
    got = lesion_fidelity([tmp_path / "rois.csv"], items, S, out / "f.csv", out / "p.png", out / "g.png")
    with open(out / "f.csv") as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(got) == 8  # solid and all: floor and synthetic rows, plain and size-matched
    plain = {"real A vs real B", "synthetic vs real B"}
    assert {r["comparison"] for r in written} == plain | {f"{c}, size-matched" for c in plain}
    syn = next(r for r in got if r["texture_class"] == "solid" and r["comparison"].startswith("synthetic"))
    assert syn["n_a"] == 1 and syn["mean_hu_a"] == pytest.approx(-200.0) and syn["solid_fraction_a"] == 1.0
    row = next(r for r in written if r["texture_class"] == "solid" and r["comparison"].startswith("synthetic"))
    assert float(row["core_hu_a"]) == -200.0 and float(row["core_sd_a"]) == 0.0  # the uniform sphere's core
    assert (out / "p.png").read_bytes()[:4] == (out / "g.png").read_bytes()[:4] == b"\x89PNG"
    from lungddpm.report.summary import fidelity_section

    md = "\n".join(fidelity_section(out / "f.csv", [out / "p.png"], out))
    assert "| core HU a / b |" in md and "| -200 / " in md  # the synthetic row's core, then the real half's
    w1 = float(row["w1_hu"])  # one synthetic nodule (one unit): no interval of its own, not a zero-width one
    assert row["w1_ci_low"] == row["w1_ci_high"] == "" and f"| {w1:.4g} |" in md
    assert (row["patients_a"], row["patients_b"]) == ("1", "2") and "1 vs 2 (1 vs 2 patients)" in md
    floor_w1 = next(r for r in written if r["texture_class"] == "solid" and r["comparison"] == "real A vs real B")
    assert float(floor_w1["w1_ci_low"]) <= float(floor_w1["w1_hu"]) <= float(floor_w1["w1_ci_high"])
    excess = float(row["w1_excess_hu"])  # one synthetic nodule (one patient): an excess, and no interval
    assert row["w1_excess_ci_low"] == row["w1_excess_ci_high"] == ""
    assert f"| {excess:.4g} |" in md and "| W1 over the floor HU |" in md
    core, core_excess = float(row["core_w1_hu"]), float(row["core_w1_excess_hu"])
    assert core > 0.0 and core == pytest.approx(float(row["core_hu_b"]) + 200.0)  # a point mass below the cores
    assert row["core_w1_excess_ci_low"] == row["core_w1_excess_ci_high"] == ""
    assert "| core W1 HU | core W1 over the floor HU |" in md and f"| {core:.4g} | {core_excess:.4g} |" in md
    floor_row = next(r for r in written if r["texture_class"] == "solid" and r["comparison"].startswith("real"))
    assert floor_row["w1_excess_hu"] == floor_row["core_w1_excess_hu"] == ""  # no excess over itself: empty, not 0
    old = [{k: v for k, v in r.items() if not k.startswith("core_w1")} for r in written]  # a table from before
    write_csv(out / "old.csv", old, list(old[0]))
    lines = [ln for ln in fidelity_section(out / "old.csv", [], out) if ln.startswith("| solid | synthetic")]
    assert lines[0].endswith(" |  |  |")  # still renders, with empty core W1 cells
    tiny = [{**r, "core_hu_a": "", "core_sd_a": ""} for r in written]  # NaN is an empty cell: nodules with no core
    write_csv(out / "tiny.csv", tiny, list(written[0]))
    assert "| n/a / " in "\n".join(fidelity_section(out / "tiny.csv", [], out))
    bad = [{**items[0], "layout": tmp_path / "n0_tex.nii.gz"}]  # no label 2
    with pytest.raises(LayoutError, match="no nodule label"):
        lesion_fidelity([tmp_path / "rois.csv"], bad, S, out / "f.csv", out / "p.png", out / "g.png")
    # the patients map (the workflow's splits) names the unit; all four nodules of one patient: no floor, refused
    one = {f"c{i}": "p" for i in range(4)}
    assert {(n.case, n.patient) for n in real_nodules([tmp_path / "rois.csv"], S, one)} == {(f"c{i}", "p") for i in
                                                                                          range(4)}  # fmt: skip
    with pytest.raises(MetricsError, match=r"real ones of two patients .*4 real of 1 patient\(s\)"):
        lesion_fidelity([tmp_path / "rois.csv"], items, S, out / "f.csv", out / "p.png", out / "g.png", one)


def _patients(hus: list[float], copies: int, tag: str, radius: float = 4.0) -> list:
    """One nodule per patient ``{tag}{i}`` of HU ``hus[i]``, each ``copies`` times (as two series of a patient, or
    ``samples_per_case`` nodules at one site): identical voxels, distinct names."""
    return [measure(f"{tag}{i}_{c}", "solid", *_sphere(hu, -800.0, radius=radius + 0.5 * (i % 3)), 1.0, S,
                    f"{tag}{i}_s{c + 1}", f"{tag}{i}") for i, hu in enumerate(hus) for c in range(copies)]  # fmt: skip


def test_halves_and_bootstraps_go_by_patient() -> None:
    """A patient's nodules are one unit: a real set whose patients each hold 3 copies of one nodule, and a synthetic
    set of 2 copies per site, give the floor, W1, excesses and all their intervals of one nodule per patient."""
    s = dataclasses.replace(S, bootstrap=120)
    real_hu, syn_hu = [-40.0 * i for i in range(8)], [-60.0 - 50.0 * j for j in range(3)]
    once = fidelity(_patients(real_hu, 1, "p"), _patients(syn_hu, 1, "q"), s)
    copied = fidelity(_patients(real_hu, 3, "p"), _patients(syn_hu, 2, "q"), s)
    assert len(once) == len(copied) == 8 and all(np.isfinite(r["w1_ci_low"]) for r in copied)
    for a, b in zip(once, copied, strict=True):
        assert (a["texture_class"], a["comparison"]) == (b["texture_class"], b["comparison"])
        for key in COLUMNS[4:]:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-9, nan_ok=True), (a["comparison"], key)
        if not a["comparison"].endswith("size-matched"):  # matched rows count distinct nodules
            assert (b["n_a"], b["n_b"]) == ((2 if a["comparison"].startswith("syn") else 3) * a["n_a"], 3 * a["n_b"])
    floor = next(r for r in copied if r["comparison"] == "real A vs real B")
    assert floor["w1_hu"] > 0.0 and floor["w1_ci_low"] < floor["w1_ci_high"]  # copies never sit on both sides


def test_patient_halves_are_patient_disjoint() -> None:
    counts = [5, 1, 1, 2, 1, 3, 1]  # nodules per patient
    real = [measure(f"r{p}_{k}", "solid", *_sphere(-30.0 * p, -800.0), 1.0, S, f"P{p}_s{k % 2}", f"P{p}")
            for p, n in enumerate(counts) for k in range(n)]  # fmt: skip
    for seed in range(12):
        a, b = patient_halves(real, [seed, 3])
        units_a, units_b = {n.unit for n in a}, {n.unit for n in b}
        assert not units_a & units_b and units_a | units_b == {f"P{p}" for p in range(len(counts))}
        assert len(a) + len(b) == 14 and 4 <= len(a) <= 10  # about half of the nodules (as whole patients allow)
        assert patient_halves(real, [seed, 3]) == (a, b)  # seeded
    single = [measure(f"s{i}", "solid", *_sphere(-30.0 * i, -800.0), 1.0, S) for i in range(7)]  # own units
    perm = np.random.default_rng([0, 2]).permutation(7)  # one nodule per patient: the seeded halves of the nodules
    assert patient_halves(single, [0, 2]) == ([single[i] for i in perm[:3]], [single[i] for i in perm[3:]])
    assert patient_halves(real[:5], [0, 2]) == ([], real[:5])  # one patient: no halves
    rows = fidelity(real, single[:2], S)  # the floor's n: a prefix of whole patients
    floor = next(r for r in rows if r["texture_class"] == "solid" and r["comparison"] == "real A vs real B")
    assert (floor["n_a"], floor["n_b"]) == tuple(map(len, patient_halves(real, [S.seed, 2])))
    assert patient_of_case("LIDC-IDRI-0365_s2") == "LIDC-IDRI-0365" == patient_of_case("LIDC-IDRI-0365")
    assert patient_of_case("ct_7", {"ct_7": "anon-3"}) == "anon-3" and patient_of_case("") == ""


def test_a_class_of_one_patient_has_no_floor(caplog: pytest.LogCaptureFixture) -> None:
    real = _patients([-40.0 * i for i in range(4)], 1, "p")
    real += [measure(f"g{k}", "ground-glass", *_sphere(-600.0 - 10 * k, -800.0), 1.0, S, "g_s1", "g") for k in range(3)]
    syn = [measure("s", "ground-glass", *_sphere(-620.0, -800.0), 1.0, S, "q", "q")]
    with caplog.at_level("WARNING"):
        rows = fidelity(real, syn, S)
    by = {(r["texture_class"], r["comparison"]): r for r in rows}
    assert ("ground-glass", "real A vs real B") not in by and by["ground-glass", "synthetic vs real B"]["n_b"] == 3
    assert np.isnan(by["ground-glass", "synthetic vs real B"]["w1_excess_hu"])
    assert "ground-glass: real half A 0 nodules of 0 patients, half B 3 of 1: one patient, no floor" in caplog.text
    # the profiles figure draws the table's halves (it drew every real nodule, the table's B half only one of them)
    curves = {cls: dict(c) for cls, c in profile_curves(real, syn, S)}
    assert list(curves["ground-glass"]) == ["real", "synthetic"] and curves["ground-glass"]["real"] == real[4:]
    assert list(curves["solid"]) == ["real A", "real B"] and "part-solid" not in {c for c, v in curves.items() if v}
    for cls in ("solid", ALL):
        table = {r["comparison"]: r for r in rows if r["texture_class"] == cls}
        assert len(curves[cls]["real A"]) == table["real A vs real B"]["n_a"]
        assert len(curves[cls]["real B"]) == table["real A vs real B"]["n_b"]


def test_a_synthetic_class_with_no_real_nodule_has_a_row_of_its_own_and_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ground-glass nodules inserted where the real ones are all solid: a row counts them (n_b 0) with their own
    statistics, the log and the report say why nothing compares them (the class had no row and nothing said so)."""
    from lungddpm.report.summary import fidelity_section

    real = _patients([-40.0 * i for i in range(4)], 1, "p")
    syn = [measure(f"s{k}", "ground-glass", *_sphere(-600.0 - 20 * k, -800.0), 1.0, S, f"q{k}", f"q{k}")
           for k in range(2)]  # fmt: skip
    with caplog.at_level("WARNING"):
        rows = fidelity(real, syn, S)
    gg = [r for r in rows if r["texture_class"] == "ground-glass"]
    assert [(r["comparison"], r["n_a"], r["n_b"], r["patients_a"]) for r in gg] == [("synthetic vs real B", 2, 0, 2)]
    assert gg[0]["mean_hu_a"] == -610.0 and gg[0]["solid_fraction_a"] == 0.0 and np.isnan(gg[0]["w1_hu"])
    assert "ground-glass: 2 synthetic nodules but no real one of this class: no comparison" in caplog.text
    table = tmp_path / "fidelity.csv"
    write_csv(table, rows, COLUMNS)
    said = "\n".join(fidelity_section(table, [], tmp_path))
    assert "No real nodule of class ground-glass to compare its synthetic ones with" in said
    assert "| ground-glass | synthetic vs real B | 2 vs 0 (2 vs 0 patients) |  |  | -610 / n/a |" in said


def test_gallery_shows_nodules_of_no_texture_class() -> None:
    real = [*_patients([-40.0, -80.0], 1, "p"), measure("u", "unknown", *_sphere(-90.0, -800.0), 1.0, S)]
    syn = [measure(f"a{i}", "any", *_sphere(-50.0, -800.0), 1.0, S) for i in range(3)]
    rows = dict(gallery_rows(real, syn, 2))
    assert rows[f"synthetic {OTHER}"] == syn[:2] and rows[f"real {OTHER}"] == [real[2]]
    assert rows["real solid"] == real[:2] and rows["synthetic solid"] == []
    assert list(dict(gallery_rows(real[:2], real[:1], 2))) == [f"{w} {c}" for c in ("ground-glass", "part-solid",
                                                               "solid") for w in ("synthetic", "real")]  # fmt: skip
