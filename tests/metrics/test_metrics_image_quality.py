from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lungddpm.cli import main
from lungddpm.errors import ImageError
from lungddpm.io import Geometry, read_volume, write_json, write_volume
from lungddpm.metrics import distribution
from lungddpm.metrics import image_quality as iq
from lungddpm.metrics.image_quality import (
    MetricsError,
    Pair,
    Volume,
    canonical_order,
    folder_patient,
    folder_sets,
    image_quality,
    real_halves,
    summarize_pairs,
    workflow_sets,
)
from lungddpm.metrics.sets import check_synthetic_set
from lungddpm.metrics.voxel import bootstrap_ci
from lungddpm.report.summary import quality_section

SETTINGS = {
    "features": {"extractor": "random", "size": [16, 16, 16], "clip_hu": [-1000, 200], "body_threshold_hu": -500,
                 "weights": None, "seed": 0},
    "regions": ["whole", "lung"], "distances": ["kid", "fid", "mmd"], "kid_subset_size": 100, "kid_subsets": 10,
    "bootstrap": 20, "ci_level": 0.9, "seed": 0, "ssim_window": 3, "ssim_sigma": 1.0, "nodule_solid_hu": -400,
    "nodule_margin_voxels": 1, "floor_fraction": 0.5, "samples_per_layout": 4,  # every sample of these tests' layouts
}  # fmt: skip
GEOM = Geometry((4.0, 4.0, 4.0), (0.0, 0.0, 0.0))


def case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 16^3 thorax-like volume [Z, Y, X] and its layout (1 lung, 2 nodule)."""
    ct = np.full((16, 16, 16), -1000, np.int16)
    ct[2:14, 2:14, 1:15] = 40 + rng.integers(-30, 30, (12, 12, 14))
    layout = np.zeros(ct.shape, np.uint8)
    layout[4:12, 4:12, 3:7] = 1
    layout[4:12, 4:12, 9:13] = 1
    ct[layout == 1] = -850 + rng.integers(-40, 40, int((layout == 1).sum()))
    z, y, x = rng.integers(5, 10), rng.integers(5, 10), rng.integers(4, 5)
    layout[z : z + 2, y : y + 2, x : x + 2] = 2
    ct[layout == 2] = 30
    return ct, layout


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("iq")
    rng = np.random.default_rng(0)
    real, labels, syn = root / "real", root / "labels", root / "synthetic"
    for i in range(6):
        ct, layout = case(rng)
        write_volume(real / f"LIDC-IDRI-000{i}.nii.gz", ct, GEOM)
        write_volume(labels / f"LIDC-IDRI-000{i}.nii.gz", layout, GEOM)
        if i < 2:  # synthetic volumes of two "test" cases, k = 0, 1: the real one with lung noise
            for k in range(2):
                s = ct.copy()
                s[layout > 0] += rng.integers(-60, 60, int((layout > 0).sum())).astype(np.int16)
                write_volume(syn / f"LIDC-IDRI-000{i}_{k}.nii.gz", s, GEOM)
                write_volume(syn / f"LIDC-IDRI-000{i}_{k}_layout.nii.gz", layout, GEOM)
    return {"root": root, "real": real, "labels": labels, "synthetic": syn}


def test_a_single_synthetic_volume_is_refused_when_the_workflow_is_parsed() -> None:
    """One test case with one sample per layout gives one synthetic volume: the metrics would fail after training and
    sampling, so the workflow's parse refuses it (rules/common.smk), naming the key."""
    check_synthetic_set(1, 2)
    check_synthetic_set(2, 1)
    check_synthetic_set(1, 2, 2)
    # the metrics take metrics.samples_per_layout of them (1 by default): one layout gives them one volume
    with pytest.raises(MetricsError, match=r"1 test case\(s\) x metrics.samples_per_layout 1: .* raise split.test"):
        check_synthetic_set(1, 2, 1)
    with pytest.raises(MetricsError, match=r"1 test case\(s\) x 1 sample\(s\) per layout: .* sample.eval_samples_per"):
        check_synthetic_set(1, 1)
    # an empty test split (split.test: 0): raising the samples per layout, as the message said, cannot help
    with pytest.raises(MetricsError, match=r"^the test split is empty: .* give split.test > 0"):
        check_synthetic_set(0, 5)


def test_real_halves_are_disjoint_patient_groups_with_sources_in_the_floor() -> None:
    vols = [Volume(n, Path(f"{n}.nii.gz"), None) for n in ("a", "b_s1", "b_s2", "c", "d", "e", "f")]
    group = {v.name: v.name.partition("_s")[0] for v in vols}
    for seed in range(5):
        floor, ref = real_halves(vols, ["c"], group, seed)
        names_f, names_r = {v.name for v in floor}, {v.name for v in ref}
        assert not names_f & names_r and names_f | names_r == {v.name for v in vols}
        assert "c" in names_f  # the synthetic set's own source CTs are never in the reference
        assert ({"b_s1", "b_s2"} <= names_f) or ({"b_s1", "b_s2"} <= names_r)  # one patient, one half
        assert len({group[n] for n in names_f}) == 3  # half of the six patients


def test_image_quality_tables_have_floor_beside_synthetic_at_the_same_n(folders: dict[str, Path]) -> None:
    pairs, reference, floor = folder_sets(folders["real"], folders["synthetic"], folders["labels"])
    assert len(pairs) == 4 and len(reference) == 3 and len(floor) == 3
    assert {p.real.name for p in pairs} <= {v.name for v in floor}
    out = folders["root"] / "out"
    rows = image_quality(pairs, reference, floor, SETTINGS, (-1000, 400), out / "iq.csv", out / "pc.csv",
                         folders["root"] / "cache")  # fmt: skip
    table = list(csv.DictReader(open(out / "iq.csv")))
    assert len(table) == len(rows)
    dist = [r for r in table if "paired" not in r["comparison"]]
    assert len(dist) == 3 * 2 * 3  # metrics x regions x (synthetic-vs-real, real-vs-real, the excess)
    for r in dist:
        assert r["n_a"] == "3" and r["n_b"] == "3" and r["reportable"] == "False"
        assert float(r["ci_low"]) <= float(r["ci_high"])
    by = {(r["metric"], r["region"], r["comparison"]): float(r["value"]) for r in dist}
    for metric, region, _ in by:  # the excess is the synthetic row's value less the floor's
        gap = by[(metric, region, iq.SYNTHETIC_VS_REAL)] - by[(metric, region, iq.REAL_VS_REAL)]
        assert by[(metric, region, iq.EXCESS)] == pytest.approx(gap, rel=1e-4, abs=1e-9)
    paired = {(r["metric"], r["region"]): float(r["value"]) for r in table if "paired" in r["comparison"]}
    assert paired[("mse", "whole")] < paired[("mse", "lung")]  # all differences lie inside the lungs
    assert paired[("ssim", "whole")] > paired[("ssim", "lung")]
    diffs = []
    for p in pairs:  # the nodule HU difference recomputed from the files
        real, syn = (read_volume(v.image)[0].astype(float) for v in (p.real, p.synthetic))
        nodule = read_volume(p.synthetic.labels)[0] == 2
        diffs.append(abs(syn[nodule].mean() - real[nodule].mean()))
    assert paired[("hu_abs_diff", "nodule")] == pytest.approx(np.mean(diffs), rel=1e-4)
    assert float(next(r["value"] for r in table if r["metric"] == "mse" and r["region"] == "lung")) > 0
    per_case = list(csv.DictReader(open(out / "pc.csv")))
    assert [r["synthetic"] for r in per_case] == ["LIDC-IDRI-0000_0", "LIDC-IDRI-0000_1", "LIDC-IDRI-0001_0",
                                                   "LIDC-IDRI-0001_1"]  # fmt: skip
    md = "\n".join(quality_section(table))
    assert "| synthetic vs real | real vs real (floor) | synthetic − floor [paired] |" in md and "3 vs 3" in md
    assert "| mse | whole | HU² |" in md and "| psnr | whole | dB |" in md
    assert "never a reported metric" in md


def test_a_volume_smaller_than_the_ssim_window_is_refused_naming_the_key(folders: dict[str, Path]) -> None:
    pairs, _, _ = folder_sets(folders["real"], folders["synthetic"], folders["labels"])
    shape = read_volume(pairs[0].real.image)[0].shape
    with pytest.raises(MetricsError, match=rf"LIDC-IDRI-0000.nii.gz: grid \({shape[0]}, .*smaller than the "
                       rf"{min(shape) + 1}-voxel SSIM window; lower metrics.ssim_window"):  # fmt: skip
        iq.pair_rows(pairs, {**SETTINGS, "ssim_window": min(shape) + 1}, (-1000, 400))


def test_paired_metrics_score_a_perfect_model_zero_beyond_the_hu_window(tmp_path: Path) -> None:
    """The model's outputs are clipped to intensity.hu_window; the real CT is not: emphysema below -1000 HU and a
    calcified nodule above 400 HU charged a perfect model (real through the window and back) MAE, lung W1 and 336 HU
    of nodule HU, while its PSNR and SSIM (windowed) said identical."""
    ct, layout = case(np.random.default_rng(1))
    ct[layout == 1] = np.where(np.arange(int((layout == 1).sum())) % 3 == 0, -1040, -860)  # below the window
    ct[layout == 2] = 736  # a calcified nodule
    write_volume(tmp_path / "real.nii.gz", ct, GEOM)
    write_volume(tmp_path / "layout.nii.gz", layout, GEOM)
    write_volume(tmp_path / "syn.nii.gz", np.clip(ct, -1000, 400), GEOM)  # a perfect model
    real = Volume("real", tmp_path / "real.nii.gz", tmp_path / "layout.nii.gz")
    row = iq.pair_rows([Pair(Volume("syn", tmp_path / "syn.nii.gz", None), real)], SETTINGS, (-1000, 400))[0]
    for column in ("mse_whole", "mae_whole", "mse_lung", "mae_lung", "hu_w1_lung", "nodule_hu_abs_diff"):
        assert row[column] == 0.0, (column, row[column])
    assert row["psnr_whole"] == 100.0 and row["ssim_lung"] == pytest.approx(1.0)
    assert row["nodule_mean_hu_real"] == 400.0


def test_a_layout_without_lung_is_refused_naming_the_files(folders: dict[str, Path], tmp_path: Path) -> None:
    """Before: a bare ValueError (a traceback from the CLI) from the voxel metrics and a FeatureError naming no file
    from the features."""
    from lungddpm.metrics.features import FeatureError, build_extractor, cached_features

    pairs, _, _ = folder_sets(folders["real"], folders["synthetic"], folders["labels"])
    empty = tmp_path / "empty_layout.nii.gz"
    write_volume(empty, np.zeros(read_volume(pairs[0].real.image)[0].shape, np.uint8), GEOM)
    pair = dataclasses.replace(pairs[0], synthetic=dataclasses.replace(pairs[0].synthetic, labels=empty))
    with pytest.raises(MetricsError, match=r"empty_layout.nii.gz: a layout without lung \(no label > 0\)"):
        iq.pair_rows([pair], SETTINGS, (-1000, 400))
    image = pairs[0].real.image
    with pytest.raises(FeatureError, match=rf"{image.name} \(layout .*empty_layout.nii.gz\): empty feature region"):
        cached_features(build_extractor(SETTINGS["features"]), image, tmp_path / "cache", empty)


def test_a_killed_writes_hidden_temporary_is_no_volume(folders: dict[str, Path]) -> None:
    real = sorted(folders["real"].glob("*.nii.gz"))[0]
    temp = folders["real"] / f".{real.name}.abc.tmp.nii.gz"
    temp.write_bytes(real.read_bytes())
    try:
        _, reference, floor = folder_sets(folders["real"], folders["synthetic"], folders["labels"])
    finally:
        temp.unlink()  # the folders are the module's
    assert not [v.name for v in reference + floor if v.name.startswith(".")]


def test_metrics_cli_on_two_folders(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = folders["root"] / "cli"
    args = ["--set", "metrics.features.extractor=random", "--set", "metrics.features.size=[16,16,16]",
            "--set", "metrics.bootstrap=10", "--set", "metrics.regions=[whole]"]  # fmt: skip
    code = main([*args, "metrics", "--real", str(folders["real"]), "--synthetic", str(folders["synthetic"]),
                 "--out", str(out), "--cache", str(folders["root"] / "cache"), "--threads", "1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "real-vs-real" in printed and "N=3 vs 3" in printed
    rows = list(csv.DictReader(open(out / "image_quality.csv")))
    distances = [r for r in rows if "paired" not in r["comparison"]]  # --set metrics.regions=[whole] applied
    assert distances and {r["region"] for r in distances} == {"whole"} and {r["n_a"] for r in distances} == {"3"}
    assert {r["region"] for r in rows if "paired" in r["comparison"]} >= {"whole", "lung"}  # paired: every region
    lonely = folders["root"] / "lonely"
    write_volume(lonely / "LIDC-IDRI-0999_0.nii.gz", np.zeros((4, 4, 4), np.int16), GEOM)
    with pytest.raises(MetricsError, match="LIDC-IDRI-0999_0.nii.gz: no real volume 'LIDC-IDRI-0999'"):
        folder_sets(folders["real"], lonely)


def test_too_few_real_patients_are_refused_naming_the_fix() -> None:
    vols = [Volume(n, Path(f"{n}.nii.gz"), None) for n in ("a", "b", "c")]
    floor_short = r"the floor has 1 volume\(s\) of 1 patient\(s\), the reference 2 of 2; .* add real cases"
    with pytest.raises(MetricsError, match=floor_short):
        real_halves(vols, ["a"])
    six = [Volume(n, Path(f"{n}.nii.gz"), None) for n in "abcdef"]  # 0.9 leaves one reference patient; 0.5 three
    with pytest.raises(MetricsError, match=r"the floor has 5 volume\(s\) of 5 patient\(s\), the reference 1 of 1; "
                       r".*metrics.floor_fraction \(now 0.9\) sets the floor's share"):  # fmt: skip
        real_halves(six, ["a"], floor_fraction=0.9)
    assert len(real_halves(six, ["a"], floor_fraction=0.5)[1]) == 3


def manifest_item(folders: dict[str, Path], case_id: str, k: int) -> dict[str, object]:
    """An eval-run manifest entry (``synthesize_shard``) of the fixture's synthetic ``<case_id>_<k>``."""
    name = f"{case_id}_{k}"
    syn = folders["synthetic"]
    return {"item": name, "case_id": case_id, "k": k, "image": str(syn / f"{name}.nii.gz"),
            "layout": str(syn / f"{name}_layout.nii.gz")}  # fmt: skip


def test_same_volumes_same_numbers_whatever_the_shards_or_resume_history(folders: dict[str, Path]) -> None:
    """One manifest, two round-robin shards, or a resumed shard that listed its skipped items first: the same four
    pairs, so the same table and per-pair rows (4 synthetic > 3 floor volumes: the subsample picks by position)."""
    items = [manifest_item(folders, f"LIDC-IDRI-000{c}", k) for c in range(2) for k in range(2)]
    real = {n: (p, folders["labels"] / p.name) for n, p in ((p.name.removesuffix(".nii.gz"), p)
            for p in sorted(folders["real"].glob("*.nii.gz")))}  # fmt: skip
    patients = {c: c for c in real}
    splits = {"one": [items], "shards": [items[0::2], items[1::2]], "resumed": [items[2:] + items[:2]]}
    tables, per_pair = {}, {}
    for how, shards in splits.items():
        out = folders["root"] / f"order_{how}"
        manifests = [out / f"shard_{i}.json" for i in range(len(shards))]
        for path, shard_items in zip(manifests, shards):
            write_json(path, {"run": "eval", "items": shard_items})
        pairs, reference, floor = workflow_sets(manifests, real, patients)
        assert [p.synthetic.name for p in pairs] == [i["item"] for i in items]  # (case, k) order
        image_quality(pairs, reference, floor, SETTINGS, (-1000, 400), out / "iq.csv", out / "pc.csv",
                      folders["root"] / "cache")  # fmt: skip
        tables[how], per_pair[how] = (out / "iq.csv").read_text(), (out / "pc.csv").read_text()
    assert tables["shards"] == tables["one"] and tables["resumed"] == tables["one"]
    assert per_pair["shards"] == per_pair["one"] and per_pair["resumed"] == per_pair["one"]
    overlapping = [folders["root"] / "order_one/shard_0.json", folders["root"] / "order_shards/shard_1.json"]
    with pytest.raises(MetricsError, match=r"item LIDC-IDRI-0000_1 is listed in .*order_one/shard_0.json too"):
        workflow_sets(overlapping, real, patients)  # a manifest of one shard beside shard 1 of two
    shuffled = [Pair(Volume(f"c_{k}", Path(f"c_{k}.nii.gz"), None), Volume("c", Path("c.nii.gz"), None))
                for k in (10, 2, 0, 11, 1)]  # fmt: skip
    assert [p.synthetic.name for p in canonical_order(shuffled)] == ["c_0", "c_1", "c_2", "c_10", "c_11"]


def per_pair_rows(values: list[float], k: int) -> list[dict[str, object]]:
    """Per-pair rows (``pair_rows``) of k synthetic samples of each layout, all k with their layout's value."""
    return [{"synthetic": f"case{i}_{j}", "real": f"case{i}", "mse_whole": v, "ssim_lung": 1 - v / 10}
            for i, v in enumerate(values) for j in range(k)]  # fmt: skip


def test_paired_intervals_resample_whole_layouts_not_samples() -> None:
    """k samples of one layout share its real CT: with k copies of one value per layout the interval is that of one
    sample per layout, not ~sqrt(k) narrower."""
    values = list(np.random.default_rng(2).normal(5.0, 2.0, 12))
    settings = {**SETTINGS, "bootstrap": 500}
    one = {(r["metric"], r["region"]): r for r in summarize_pairs(per_pair_rows(values, 1), settings)}
    four = {(r["metric"], r["region"]): r for r in summarize_pairs(per_pair_rows(values, 4), settings)}
    assert set(one) == set(four) == {("mse", "whole"), ("ssim", "lung")}
    for key, r in four.items():
        assert (r["n_a"], r["n_b"], one[key]["n_a"]) == (48, 12, 12)  # 48 pairs, 12 units resampled
        for col in ("value", "ci_low", "ci_high"):
            assert r[col] == pytest.approx(one[key][col], rel=1e-9), (key, col)
    _, lo, hi = bootstrap_ci(np.repeat(values, 4), 500, SETTINGS["ci_level"], SETTINGS["seed"])  # 48 "independent"
    mse = four[("mse", "whole")]
    assert mse["ci_high"] - mse["ci_low"] > 1.5 * (hi - lo)  # ~sqrt(4) = 2 times the per-sample interval
    series = [
        {**r, "real": f"{r['real']}_s{n}", "patient": r["real"]} for r in per_pair_rows(values, 1) for n in (1, 2)
    ]
    two = {(r["metric"], r["region"]): r for r in summarize_pairs(series, settings)}  # a patient's 2 series: 1 draw
    assert {(r["n_a"], r["n_b"]) for r in two.values()} == {(24, 12)}
    assert [two[key][col] for key in one for col in ("ci_low", "ci_high")] == pytest.approx(
        [one[key][col] for key in one for col in ("ci_low", "ci_high")], rel=1e-9
    )


def test_distribution_intervals_resample_whole_layouts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The synthetic side of the distribution bootstrap draws whole layouts: k volumes of a layout with one feature
    vector (a shared background) give the interval of one volume per layout."""
    rng = np.random.default_rng(3)
    layout_feats = {f"case{i}": rng.normal(size=4) for i in range(10)}
    feats = {f"floor{i}": rng.normal(0.3, 1.0, 4) for i in range(40)}
    feats |= {f"ref{i}": rng.normal(size=4) for i in range(8)}
    for k in (1, 3):
        feats |= {f"case{i}_{k}_{j}": f for i, (c, f) in enumerate(layout_feats.items()) for j in range(k)}

    settings = fake_gap_features(monkeypatch, feats)
    reference = [Volume(f"ref{i}", Path(f"ref{i}.nii.gz"), None) for i in range(8)]
    floor = [Volume(f"floor{i}", Path(f"floor{i}.nii.gz"), None) for i in range(40)]
    rows = {}
    for k in (1, 3):
        pairs = [Pair(Volume(f"case{i}_{k}_{j}", Path(f"s{i}_{j}.nii.gz"), None), Volume(c, Path(f"{c}.nii.gz"), None))
                 for i, c in enumerate(layout_feats) for j in range(k)]  # fmt: skip
        table = image_quality(pairs, reference, floor, settings, (-1000, 400), tmp_path / "iq.csv",
                              tmp_path / "pc.csv", tmp_path)  # fmt: skip
        rows[k] = next(r for r in table if r["comparison"] == iq.SYNTHETIC_VS_REAL)
    assert rows[3]["n_a"] == 30 and rows[1]["n_a"] == 10
    for col in ("value", "ci_low", "ci_high"):
        assert rows[3][col] == pytest.approx(rows[1][col], rel=1e-9), col


def test_mmd_rows_and_their_excess_share_one_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each MMD took the median bandwidth of its own two sets, so the excess subtracted MMDs of two kernels (and one
    of a larger mean shift could come out smaller): one bandwidth per region now, of every set pooled."""
    rng = np.random.default_rng(5)
    feats = {f"s{i}": rng.normal(2.0, 1.0, 4) for i in range(6)} | {f"f{i}": rng.normal(0.5, 1.0, 4) for i in range(6)}
    feats |= {f"r{i}": rng.normal(0.0, 1.0, 4) for i in range(8)} | {f"c{i}": rng.normal(size=4) for i in range(6)}
    settings = {**fake_gap_features(monkeypatch, feats), "distances": ["mmd"], "bootstrap": 20}
    volumes = {k: [Volume(f"{k}{i}", Path(f"{k}{i}.nii.gz"), None) for i in range(n)] for k, n in
               (("s", 6), ("f", 6), ("r", 8), ("c", 6))}  # fmt: skip
    pairs = [Pair(s, c) for s, c in zip(volumes["s"], volumes["c"])]
    table = image_quality(pairs, volumes["r"], volumes["f"], settings, (-1000, 400), tmp_path / "iq.csv",
                          tmp_path / "pc.csv", tmp_path)  # fmt: skip
    row = {r["comparison"]: r["value"] for r in table}
    stack = {k: np.stack([feats[v.name] for v in vs]) for k, vs in volumes.items()}
    sigma = distribution.median_bandwidth(stack["r"], np.concatenate([stack["s"], stack["f"]]))
    syn, floor = distribution.mmd(stack["s"], stack["r"], sigma), distribution.mmd(stack["f"], stack["r"], sigma)
    assert row[iq.SYNTHETIC_VS_REAL] == pytest.approx(syn) and row[iq.REAL_VS_REAL] == pytest.approx(floor)
    assert row[iq.EXCESS] == pytest.approx(syn - floor) and syn > floor
    assert distribution.mmd(stack["s"], stack["r"]) != pytest.approx(syn)  # its own median: another kernel


def fake_gap_features(monkeypatch: pytest.MonkeyPatch, feats: dict[str, np.ndarray]) -> dict[str, object]:
    """Settings of one distance, "gap" (|difference of the sets' first-feature means|: k copies of a row leave it
    unchanged), on the features ``feats`` (volume name -> vector) in place of the extractor's; no paired metrics."""

    def fake_features(extractor: object, volumes: list[Volume], region: str, cache_dir: Path, what: str) -> np.ndarray:
        return np.stack([feats[v.name] for v in volumes])

    monkeypatch.setattr(iq, "_features", fake_features)
    monkeypatch.setattr(iq, "pair_rows", lambda pairs, settings, hu_window: [])
    monkeypatch.setitem(distribution.DISTANCES, "gap", lambda a, b: abs(float(a[:, 0].mean() - b[:, 0].mean())))
    monkeypatch.setattr(iq, "build_extractor", lambda settings: type("Fake", (), {"identity": "x", "reportable": 0}))
    return {**SETTINGS, "regions": ["whole"], "distances": ["gap"], "bootstrap": 300}


def test_distribution_metrics_take_samples_per_layout_and_count_the_layouts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The k samples of a layout share its anatomy: several per layout biased the synthetic rows and the excess over
    the floor (one volume per patient) upward. By default the first sample of each layout counts (by k, however the
    manifests listed them); layouts_a counts the layouts, and the report says when there are fewer than volumes."""
    rng = np.random.default_rng(6)
    feats = {f"case{i}_{k}": rng.normal(size=4) for i in range(6) for k in range(3)}
    feats |= {f"floor{i}": rng.normal(size=4) for i in range(12)} | {f"ref{i}": rng.normal(size=4) for i in range(8)}
    settings = fake_gap_features(monkeypatch, feats)
    seen: list[list[str]] = []
    real_distribution = iq.distribution_rows

    def spy(synthetic: list[Volume], *args: object, **kwargs: object) -> list:
        seen.append([v.name for v in synthetic])
        return real_distribution(synthetic, *args, **kwargs)

    monkeypatch.setattr(iq, "distribution_rows", spy)
    pairs = [Pair(Volume(f"case{i}_{k}", Path(f"case{i}_{k}.nii.gz"), None), Volume(f"case{i}", Path(f"c{i}.nii.gz"),
                                                                                     None)) for i in range(6)
             for k in (2, 0, 1)]  # fmt: skip
    reference = [Volume(f"ref{i}", Path(f"ref{i}.nii.gz"), None) for i in range(8)]
    floor = [Volume(f"floor{i}", Path(f"floor{i}.nii.gz"), None) for i in range(12)]
    out = []
    for per_layout in (1, 2):
        table = image_quality(pairs, reference, floor, {**settings, "samples_per_layout": per_layout},
                              (-1000, 400), tmp_path / "iq.csv", tmp_path / "pc.csv", tmp_path)  # fmt: skip
        out.append(next(r for r in table if r["comparison"] == iq.SYNTHETIC_VS_REAL))
    assert seen[0] == [f"case{i}_0" for i in range(6)]
    assert seen[1] == [f"case{i}_{k}" for i in range(6) for k in (0, 1)]
    assert (out[0]["n_a"], out[0]["layouts_a"], out[1]["n_a"], out[1]["layouts_a"]) == (6, 6, 12, 6)
    said = "\n".join(quality_section([{k: str(v) for k, v in r.items()} for r in (out[1],)]))
    assert "The 12 synthetic volumes come from 6 test layouts (metrics.samples_per_layout 2)" in said
    assert "come from" not in "\n".join(quality_section([{k: str(v) for k, v in out[0].items()}]))


def test_real_sets_resample_whole_patients(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The floor and the reference draw whole patients: two series of a patient with one feature vector give the
    real-vs-real interval of one series per patient, where resampling volumes would narrow it."""
    rng = np.random.default_rng(4)
    floor_feats, ref_feats = rng.normal(0.3, 1.0, (10, 4)), rng.normal(size=(8, 4))
    feats = {f"s{i}": rng.normal(size=4) for i in range(20)}
    feats |= {f"f{i}_s{j}": f for i, f in enumerate(floor_feats) for j in (1, 2)}
    feats |= {f"r{i}_s{j}": f for i, f in enumerate(ref_feats) for j in (1, 2)}
    settings = {**fake_gap_features(monkeypatch, feats), "samples_per_layout": 20}  # all 20 of the one layout
    pairs = [Pair(Volume(f"s{i}", Path(f"s{i}.nii.gz"), None), Volume("f0_s1", Path("f0_s1.nii.gz"), None, "f0"))
             for i in range(20)]  # fmt: skip

    def real(prefix: str, n: int, series: tuple[int, ...], patient: bool) -> list[Volume]:
        return [Volume(f"{prefix}{i}_s{j}", Path(f"{prefix}{i}_s{j}.nii.gz"), None, f"{prefix}{i}" if patient else "")
                for i in range(n) for j in series]  # fmt: skip

    rows = {}
    for name, series, patient in (("one", (1,), True), ("two", (1, 2), True), ("two, no patients", (1, 2), False)):
        table = image_quality(pairs, real("r", 8, series, patient), real("f", 10, series, patient), settings,
                              (-1000, 400), tmp_path / "iq.csv", tmp_path / "pc.csv", tmp_path)  # fmt: skip
        rows[name] = next(r for r in table if r["comparison"] == iq.REAL_VS_REAL)
    assert (rows["two"]["n_a"], rows["two"]["n_b"], rows["one"]["n_a"], rows["one"]["n_b"]) == (20, 16, 10, 8)
    for col in ("value", "ci_low", "ci_high"):
        assert rows["two"][col] == pytest.approx(rows["one"][col], rel=1e-9), col
    width = {k: r["ci_high"] - r["ci_low"] for k, r in rows.items()}
    assert width["two, no patients"] < 0.85 * width["one"]  # volumes as units: too narrow


def name_folders(root: Path, real: list[str], synthetic: list[str]) -> tuple[Path, Path]:
    """Folders of empty ``<name>.nii.gz`` files (``folder_sets`` only lists them)."""
    for folder, names in ((root / "real", real), (root / "synthetic", synthetic)):
        folder.mkdir(parents=True)
        for name in names:
            (folder / f"{name}.nii.gz").touch()
    return root / "real", root / "synthetic"


def assert_patients_whole(floor: list[Volume], reference: list[Volume], series: dict[str, list[str]]) -> None:
    """Every patient's series (patient -> case ids) lie in one half."""
    halves = {v.name: half for half, vols in (("floor", floor), ("reference", reference)) for v in vols}
    for patient, cases in series.items():
        assert len({halves[c] for c in cases}) == 1, (patient, {c: halves[c] for c in cases})


def test_folder_sets_keep_a_patients_series_in_one_half(tmp_path: Path) -> None:
    """``lungddpm metrics``: the two series of a patient (LIDC case ids ``<patient>_s<n>``) never land in both halves,
    and a patient with a sampled series is wholly in the floor."""
    assert folder_patient("LIDC-IDRI-0365_s2") == "LIDC-IDRI-0365"
    assert folder_patient("LIDC-IDRI-0001") == "LIDC-IDRI-0001"
    series = {p: [f"{p}_s1", f"{p}_s2"] for p in ("LIDC-IDRI-0365", "LIDC-IDRI-0002")}
    singles = [f"LIDC-IDRI-00{i}" for i in range(10, 16)]
    real, syn = name_folders(tmp_path, [c for cs in series.values() for c in cs] + singles, ["LIDC-IDRI-0365_s1_0"])
    for seed in range(8):
        pairs, reference, floor = folder_sets(real, syn, seed=seed)
        assert [p.real.name for p in pairs] == ["LIDC-IDRI-0365_s1"]
        assert {"LIDC-IDRI-0365_s1", "LIDC-IDRI-0365_s2"} <= {v.name for v in floor}
        assert_patients_whole(floor, reference, series)
        assert {v.name: v.unit for v in floor + reference}["LIDC-IDRI-0365_s2"] == "LIDC-IDRI-0365"
        assert pairs[0].real.unit == "LIDC-IDRI-0365"


def test_folder_sets_group_by_the_configs_patient_regex(tmp_path: Path) -> None:
    """With ``data.images.patient_regex`` the patients are its first group (``patient_of``), as in the split."""
    regex = r"(p\d+)_t\d+$"
    assert folder_patient("p07_t1", regex) == "p07"
    with pytest.raises(ImageError, match="patient_regex"):
        folder_patient("q07", regex)
    series = {p: [f"{p}_t0", f"{p}_t1"] for p in ("p01", "p02")}
    singles = [f"p1{i}_t0" for i in range(6)]
    real, syn = name_folders(tmp_path, [c for cs in series.values() for c in cs] + singles, ["p01_t0_0"])
    for seed in range(8):
        _, reference, floor = folder_sets(real, syn, seed=seed, patient_regex=regex)
        assert {"p01_t0", "p01_t1"} <= {v.name for v in floor}
        assert_patients_whole(floor, reference, series)


def test_folder_volumes_are_unique_and_a_synthetic_one_falls_back_to_its_real_cases_layout(tmp_path: Path) -> None:
    """``e.nii`` beside ``e.nii.gz`` dropped one of them unsaid; a synthetic volume without a layout of its own had
    no lung region although its pairs' lung metrics used the real case's layout."""
    names = [f"LIDC-IDRI-00{i}" for i in range(10, 16)]
    real, syn = name_folders(tmp_path, names, ["LIDC-IDRI-0010_0"])
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "LIDC-IDRI-0010.nii.gz").touch()
    (pair,) = folder_sets(real, syn, real_labels=labels)[0]
    assert pair.synthetic.labels == pair.real.labels == labels / "LIDC-IDRI-0010.nii.gz"
    (syn / "LIDC-IDRI-0010_0_layout.nii.gz").touch()  # its own layout comes first
    assert folder_sets(real, syn, real_labels=labels)[0][0].synthetic.labels == syn / "LIDC-IDRI-0010_0_layout.nii.gz"
    (real / "LIDC-IDRI-0011.nii").touch()
    with pytest.raises(MetricsError, match=r"real/LIDC-IDRI-0011.nii and LIDC-IDRI-0011.nii.gz: both are volume "):
        folder_sets(real, syn)


def test_identical_pairs_stay_in_the_summary_and_one_patient_has_no_interval(caplog) -> None:
    """PSNR of an identical pair was infinite and silently left out of the mean (the best pairs vanished); a set
    of one patient resampled to itself every time, a zero-width interval that looked exact."""
    settings = {"bootstrap": 50, "ci_level": 0.95, "seed": 0}
    rows = [{"synthetic": "a_0", "real": "a", "patient": "P1", "psnr_whole": 100.0, "ssim_lung": float("nan")},
            {"synthetic": "a_1", "real": "a", "patient": "P2", "psnr_whole": 60.0, "ssim_lung": 0.5},
            {"synthetic": "b_0", "real": "b", "patient": "P2", "psnr_whole": 70.0, "ssim_lung": 0.7}]  # fmt: skip
    with caplog.at_level("WARNING"):
        out = {(r["metric"], r["region"]): r for r in summarize_pairs(rows, settings)}
    assert out["psnr", "whole"]["value"] == pytest.approx(230 / 3) and out["psnr", "whole"]["n_a"] == 3
    assert out["ssim", "lung"]["n_a"] == 2 and "ssim_lung: 1 of 3 pairs undefined" in caplog.text
    value, lo, hi = bootstrap_ci([0.3, 0.9], 50, groups=["P1", "P1"])
    assert value == pytest.approx(0.6) and np.isnan(lo) and np.isnan(hi)
    a, b = np.random.default_rng(0).normal(size=(2, 4, 3))
    assert np.isnan(distribution.bootstrap_distance(distribution.fid, a, b, 20, groups_a=["P1"] * 4)[1])
    excess = distribution.bootstrap_excess(distribution.fid, a, a, b, 20, groups=(None, ["P1"] * 4, None))
    assert excess[0] == 0.0 and np.isnan(excess[1]) and np.isnan(excess[2])
