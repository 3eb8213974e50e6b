from __future__ import annotations

import numpy as np
import pytest

from lungddpm.app.views import CURSOR_RGB, click_to_index, display_rows, render_plane, roi_panel, window_rgb


def toy() -> tuple[np.ndarray, np.ndarray]:
    ct = np.full((10, 40, 40), -1000, np.int16)
    labels = np.zeros((10, 40, 40), np.uint8)
    labels[2:8, 5:35, 5:35] = 1
    labels[4:6, 18:22, 18:22] = 2
    ct[labels == 1] = -850
    ct[labels == 2] = 20
    return ct, labels


def test_rows_are_stretched_to_true_proportions() -> None:
    rows = display_rows(10, 2.5, 0.7)
    assert rows.size == round(10 * 2.5 / 0.7) and rows[0] == 0 and rows[-1] == 9
    assert np.all(np.diff(rows) >= 0) and set(rows) == set(range(10))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_a_click_maps_back_to_the_voxel_under_the_cursor(plane: str) -> None:
    ct, labels = toy()
    spacing = (2.5, 0.7, 0.7)
    cursor = (4, 20, 19)
    img = render_plane(ct, labels, plane, cursor, spacing)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    # the cursor's row and column are drawn in the cursor colour away from the site itself
    yellow = np.all(img == CURSOR_RGB, axis=-1)
    ys, xs = np.nonzero(yellow)
    col = int(np.bincount(xs).argmax())
    row = int(np.bincount(ys).argmax())
    assert click_to_index(plane, col, row, cursor, ct.shape, spacing) == cursor
    expected_h = {"axial": 40, "coronal": round(10 * 2.5 / 0.7), "sagittal": round(10 * 2.5 / 0.7)}[plane]
    assert img.shape[:2] == (expected_h, 40)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_every_pixel_clicks_the_voxel_it_draws(plane: str) -> None:
    """An off-centre nodule (the toy's own sits on its symmetry centre, where a flipped or rotated plane looks the
    same): every pixel drawn red is a nodule voxel by click_to_index, and every other one is not."""
    ct, labels = toy()
    labels[labels == 2] = 1
    labels[3:5, 6:9, 27:31] = 2  # low, anterior, left (high j)
    ct[labels == 1], ct[labels == 2] = -850, 20
    spacing, cursor = (2.5, 0.7, 0.7), (3, 7, 28)  # through the nodule
    img = render_plane(ct, labels, plane, cursor, spacing)
    red = (img[..., 0].astype(int) > img[..., 1].astype(int) + 50) & ~np.all(img == CURSOR_RGB, axis=-1)
    drawn = np.zeros(red.shape, bool)
    for y, x in np.ndindex(red.shape):
        drawn[y, x] = labels[click_to_index(plane, x, y, cursor, ct.shape, spacing)] == 2
    cursor_px = np.all(img == CURSOR_RGB, axis=-1)
    assert red.sum() > 10 and np.array_equal(red, drawn & ~cursor_px)


def test_superior_is_up_and_labels_are_tinted() -> None:
    ct, labels = toy()
    labels[9, :, :] = 0
    ct[9] = 500  # a bright top slice
    img = render_plane(ct, labels, "coronal", (4, 20, 20), (1.0, 1.0, 1.0), show_lung=False)
    assert img[0, 0].tolist() == [255, 255, 255]  # the top row is the last (most superior) slice
    nodule_px = render_plane(ct, labels, "axial", (4, 20, 20), (1.0, 1.0, 1.0))[19, 19]
    assert nodule_px[0] > nodule_px[1] + 50  # nodules red
    lung_px = render_plane(ct, labels, "axial", (4, 20, 20), (1.0, 1.0, 1.0))[10, 10]
    assert lung_px[2] > lung_px[0]  # lung blue


def test_roi_panel_magnifies_before_after_and_layout() -> None:
    before = np.full((8, 8, 8), -850, np.int16)
    after = before.copy()
    after[3:5, 3:5, 3:5] = 30
    layout = np.ones((8, 8, 8), np.uint8)
    layout[3:5, 3:5, 3:5] = 2
    panel = roi_panel(before, after, layout, zoom=3)
    assert panel.shape == ((8 * 2 + 2) * 3, (8 * 3 + 4) * 3, 3)
    tile = 8 * 3
    assert panel[4 * 3, 4 * 3, 0] < panel[4 * 3, (tile + 2 * 3) + 4 * 3, 0]  # the nodule appears only after


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_every_slice_is_drawn_and_clickable_when_slices_are_finer_than_pixels(plane: str) -> None:
    """300 slices of 0.625 mm under 0.8 mm pixels: no slice dropped from the display, proportions kept."""
    shape, spacing = (300, 20, 24), (0.625, 0.8, 0.8)
    ct, labels = np.full(shape, -850, np.int16), np.ones(shape, np.uint8)
    assert set(display_rows(300, 0.625, 0.8)) == set(range(300))
    for k in range(300):
        cursor = (k, 10, 12)
        img = render_plane(ct, labels, plane, cursor, spacing)
        yellow = np.all(img == CURSOR_RGB, axis=-1)
        row, col = int(np.bincount(np.nonzero(yellow)[0]).argmax()), int(np.bincount(np.nonzero(yellow)[1]).argmax())
        assert click_to_index(plane, col, row, cursor, shape, spacing) == cursor
    height_mm, width_mm = 300 * 0.625, {"coronal": 24, "sagittal": 20}[plane] * 0.8
    assert img.shape[0] == 300 and abs(img.shape[1] - img.shape[0] * width_mm / height_mm) <= 1


def test_roi_panel_centres_on_the_new_nodule_not_on_every_nodule() -> None:
    n = 32
    before = np.full((n,) * 3, -850, np.int16)
    layout = np.ones((n,) * 3, np.uint8)
    layout[4:9, 4:9, 4:9] = 2  # a real nodule kept in the ROI
    before[4:9, 4:9, 4:9] = 30
    after = before.copy()
    new = np.zeros((n,) * 3, bool)
    new[22:27, 22:27, 22:27] = True
    layout[new], after[new] = 2, 40
    panel = roi_panel(before, after, layout, new, zoom=1)
    # the axial row goes through z = 24: the new nodule at (y, x) = (24, 24) in the after tile, not in the before
    assert panel[24, (n + 2) + 24].tolist() == window_rgb(np.array([[40]]))[0, 0].round().astype(int).tolist()
    assert panel[24, 24].tolist() == window_rgb(np.array([[-850]]))[0, 0].round().astype(int).tolist()
    # and the coronal row through y = 24 shows it at (z, x) = (24, 24), superior up
    assert panel[(n + 2) + (n - 1 - 24), (n + 2) + 24].tolist() == panel[24, (n + 2) + 24].tolist()
