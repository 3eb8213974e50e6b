from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungddpm.config import LayoutConfig
from lungddpm.errors import LayoutError
from lungddpm.io import Geometry, read_volume, write_json, write_volume
from lungddpm.preprocessing.layout import (
    ball,
    check_layout,
    check_source_lungs,
    compose_layout,
    dilate_mm,
    face_border,
    make_layout,
)

GEOM = Geometry(spacing=(10.0, 10.0, 10.0), origin=(-155.0, -155.0, -300.0))
CFG = LayoutConfig(min_lung_ml=500, max_lung_ml=12000, min_side_fraction=0.15)


def two_lungs() -> np.ndarray:
    lung = np.zeros((32, 32, 32), dtype=bool)
    lung[8:24, 8:24, 4:14] = True
    lung[8:24, 8:24, 18:28] = True
    return lung


def test_compose_labels_nodules_inside_lung() -> None:
    lung = two_lungs()
    nodules = np.zeros(lung.shape, dtype=np.uint8)
    nodules[10, 10, 10] = 1
    nodules[2, 2, 2] = 2  # outside the lung mask: becomes nodule, never dropped
    layout = compose_layout(lung, nodules)
    assert layout.dtype == np.uint8
    assert layout[10, 10, 10] == 2 and layout[2, 2, 2] == 2
    assert layout[12, 12, 5] == 1 and layout[0, 0, 0] == 0
    assert set(np.unique(layout)) == {0, 1, 2}


def test_checks_pass_on_two_lungs() -> None:
    stats = check_layout(compose_layout(two_lungs(), np.zeros((32, 32, 32), np.uint8)), GEOM, CFG, "x")
    assert stats["lung_ml"] == pytest.approx(2 * 16 * 16 * 10)
    assert stats["side_fractions"] == [0.5, 0.5]


def test_checks_fail_loudly() -> None:
    lung = two_lungs()
    bad = compose_layout(lung, np.zeros(lung.shape, np.uint8))
    bad[0, 0, 0] = 7
    with pytest.raises(LayoutError, match=r"case-x: labels \[0, 1, 7\] found"):
        check_layout(bad, GEOM, CFG, "case-x")
    one = lung.copy()
    one[..., 16:] = False
    one[..., 4] = True  # widen one lung so the volume stays in range
    with pytest.raises(LayoutError, match="two lungs were not found"):
        check_layout(compose_layout(one, np.zeros(lung.shape, np.uint8)), GEOM, CFG, "case-x", midline_x_mm=0.0)
    tiny = np.zeros_like(lung)
    tiny[10:12, 10:12, 5:7] = tiny[10:12, 10:12, 20:22] = True
    with pytest.raises(LayoutError, match="lung volume 16 mL outside"):
        check_layout(compose_layout(tiny, np.zeros(lung.shape, np.uint8)), GEOM, CFG, "case-x")
    empty = np.zeros(lung.shape, np.uint8)
    for midline in (None, 0.0):  # min_lung_ml 0 let it through to an IndexError / ZeroDivisionError
        with pytest.raises(LayoutError, match="case-x: no lung voxel"):
            check_layout(empty, GEOM, LayoutConfig(0, 12000, 0.15), "case-x", midline_x_mm=midline)


def test_make_layout_writes_same_grid(tmp_path: Path) -> None:
    nodules = np.zeros((32, 32, 32), np.uint8)
    nodules[12:14, 12:14, 8:10] = 1
    write_volume(tmp_path / "lung.nii.gz", two_lungs().astype(np.uint8), GEOM)
    write_volume(tmp_path / "nodules.nii.gz", nodules, GEOM)
    write_json(tmp_path / "meta.json", {"body_midline_x_mm": 0.0})
    make_layout(tmp_path, tmp_path / "layout.nii.gz", CFG)
    layout, geom = read_volume(tmp_path / "layout.nii.gz")
    assert geom.same_grid(GEOM) and layout.shape == nodules.shape
    assert (layout == 2).sum() == 8 and layout.dtype == np.uint8
    # nodules on another spacing, same origin and shape: refused (only the origin and shape were compared)
    write_volume(tmp_path / "nodules.nii.gz", nodules, Geometry(tuple(2 * s for s in GEOM.spacing), GEOM.origin))
    with pytest.raises(LayoutError, match="lung.nii.gz and nodules.nii.gz are on different grids; rerun preprocess"):
        make_layout(tmp_path, tmp_path / "layout2.nii.gz", CFG)
    assert not (tmp_path / "layout2.nii.gz").exists()


def test_only_a_scan_whose_air_is_too_little_and_cut_at_both_ends_is_called_thin() -> None:
    """The trachea in the top slice and bowel gas in the bottom one cut a full scan's air at both ends too."""
    lung = np.zeros((40, 20, 20), bool)
    lung[10:30, 5:15, 5:15] = True  # 2000 voxels of 1 mL: 2 L of lung-shaped air, but no lungs segmented
    air = lung.copy()
    air[:10, 9:11, 9:11] = air[30:, 2:4, 2:4] = True  # a trachea to the top, gas to the bottom
    few = np.zeros_like(lung)
    few[20, 10, 10] = True  # what the segmentation kept: 1 mL
    check_source_lungs(few, air, (10.0, 10.0, 10.0), CFG, "ct.nii.gz")  # a full scan: left to the layout check
    with pytest.raises(LayoutError, match=r"ct.nii.gz: lungs of 1.0 mL, under layout.min_lung_ml 500 mL; the scan's "
                       r"20 mm in z stop inside the chest"):  # fmt: skip
        check_source_lungs(few[19:21], air[19:21], (10.0, 10.0, 10.0), CFG, "ct.nii.gz")  # 2 slices: 200 mL of air
    with pytest.raises(LayoutError, match=r"from label 1 of seg.nrrd, which has no nodule label 2.*binary"):
        check_source_lungs(few, air, (10.0, 10.0, 10.0), CFG, "ct.nii.gz", "seg.nrrd", 0)
    with pytest.raises(LayoutError, match=r"from the lung label of seg.nrrd: label the whole lungs"):
        check_source_lungs(few, air, (10.0, 10.0, 10.0), CFG, "ct.nii.gz", "seg.nrrd", 2)


@pytest.mark.parametrize(("spacing", "margin"), [(1.2, 3.6), (0.8, 2.4), (1.1, 4.4), (1.25, 3.75), (0.6, 3.0)])
def test_a_float32_spacing_reaches_as_far_as_the_configured_one(tmp_path: Path, spacing: float, margin: float) -> None:
    """Insertion reads the ROI's spacing back from NIfTI (float32: 1.2 is 1.2000000477); training takes the config's.
    3.6 mm / 1.2000000477 mm fell short of 3 voxels: the generated region lost its outer shell (311 voxels, not 389)
    and the face border a voxel."""
    n = 16
    layout = np.ones((n, n, n), np.uint8)
    layout[7:9, 7:9, 7:9] = 2
    write_volume(tmp_path / "roi.nii.gz", layout, Geometry((spacing,) * 3, (0.0, 0.0, 0.0)))
    back = read_volume(tmp_path / "roi.nii.gz")[1].spacing[0]
    assert back != spacing or spacing in (1.25,)  # the float32 round trip (1.25 is exact)
    assert np.array_equal(dilate_mm(layout == 2, margin, back), dilate_mm(layout == 2, margin, spacing))
    assert face_border(margin, back) == face_border(margin, spacing) == round(margin / spacing) + 1
    assert ball(margin / back).sum() == ball(round(margin / spacing)).sum()
