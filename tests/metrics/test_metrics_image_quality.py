from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungddpm.cli import main
from lungddpm.io import Geometry, read_volume, write_volume
from lungddpm.metrics.image_quality import MetricsError, Volume, folder_sets, image_quality, real_halves
from lungddpm.report.summary import quality_section

SETTINGS = {
    "features": {"extractor": "random", "size": [16, 16, 16], "clip_hu": [-1000, 200], "body_threshold_hu": -500,
                 "weights": None, "seed": 0},
    "regions": ["whole", "lung"], "distances": ["kid", "fid", "mmd"], "kid_subset_size": 100, "kid_subsets": 10,
    "bootstrap": 20, "ci_level": 0.9, "seed": 0, "ssim_window": 3, "ssim_sigma": 1.0, "nodule_solid_hu": -400,
    "nodule_margin_voxels": 1, "floor_fraction": 0.5,
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
    assert len(dist) == 3 * 2 * 2  # metrics x regions x (synthetic-vs-real, real-vs-real)
    for r in dist:
        assert r["n_a"] == "3" and r["n_b"] == "3" and r["reportable"] == "False"
        assert float(r["ci_low"]) <= float(r["ci_high"])
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
    assert "| synthetic vs real | real vs real (floor) |" in md and "3 vs 3" in md
    assert "never a reported metric" in md


def test_metrics_cli_on_two_folders(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = folders["root"] / "cli"
    args = ["--set", "metrics.features.extractor=random", "--set", "metrics.features.size=[16,16,16]",
            "--set", "metrics.bootstrap=10", "--set", "metrics.regions=[whole]"]  # fmt: skip
    code = main([*args, "metrics", "--real", str(folders["real"]), "--synthetic", str(folders["synthetic"]),
                 "--out", str(out), "--cache", str(folders["root"] / "cache"), "--threads", "1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "real-vs-real" in printed and "N=3 vs 3" in printed
    assert {r["region"] for r in csv.DictReader(open(out / "image_quality.csv"))} >= {"whole", "lung"}
    lonely = folders["root"] / "lonely"
    write_volume(lonely / "LIDC-IDRI-0999_0.nii.gz", np.zeros((4, 4, 4), np.int16), GEOM)
    with pytest.raises(MetricsError, match="LIDC-IDRI-0999_0.nii.gz: no real volume 'LIDC-IDRI-0999'"):
        folder_sets(folders["real"], lonely)


def test_too_few_real_patients_are_refused_naming_the_fix() -> None:
    vols = [Volume(n, Path(f"{n}.nii.gz"), None) for n in ("a", "b", "c")]
    with pytest.raises(MetricsError, match="add real cases"):
        real_halves(vols, ["a"])
