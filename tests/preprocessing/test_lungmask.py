from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from lungddpm.config import LungmaskConfig, validate_config
from lungddpm.data.phantom import NoduleSpec, ScanGeometry, synthesize_thorax
from lungddpm.preprocessing.lungmask import lungs_from_label, outside_air, segment_lungs

CFG = LungmaskConfig(**validate_config({})["lungmask"])
SPACING = (4.0, 4.0, 4.0)


def toy_thorax(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4 mm toy chest: body, two lungs with vessels, a trachea forking into both lungs, a table.
    Returns (hu [Z, Y, X], true lung, trachea+bronchi)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:60, 0:80, 0:96].astype(float)
    hu = np.full(z.shape, -1000.0)
    body = ((x - 48) / 42) ** 2 + ((y - 40) / 30) ** 2 <= 1
    hu[body] = 40.0
    hu[(y >= 74) & (y <= 76)] = 300.0  # table, separated from the body by air
    lung = np.zeros(z.shape, dtype=bool)
    for cx in (28, 68):
        lung |= (((x - cx) / 15) ** 2 + ((y - 40) / 20) ** 2 + ((z - 25) / 24) ** 2) <= 1
    hu[lung] = -850 + 30 * (y[lung] - 40) / 20
    vessels = lung & (rng.random(z.shape) < 0.01)
    from scipy import ndimage as ndi

    vessels = ndi.binary_dilation(vessels) & lung
    hu[vessels] = 40.0
    trachea = (((x - 48) / 3) ** 2 + ((y - 36) / 3) ** 2 <= 1) & (z >= 35)
    carina = np.zeros_like(trachea)
    for t in np.linspace(0, 1, 40):
        for side in (-1, 1):
            cx, cz = 48 + side * 18 * t, 35 - 6 * t
            carina |= ((x - cx) ** 2 + (y - 36) ** 2 + (z - cz) ** 2) <= 2.5**2
    airway = (trachea | carina) & ~lung
    hu[trachea | carina] = -1000.0
    hu += rng.normal(0, 10, hu.shape)
    return hu.astype(np.float32), lung, airway


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_outside_air_is_room_air_only() -> None:
    hu, lung, _ = toy_thorax()
    outside = outside_air(hu, CFG.threshold_hu)
    assert outside[0, 0, 0] and outside[30, 78, 48]  # corner and the gap below the table
    assert not (outside & lung).any()


def circular_fov(hu: np.ndarray, cx: float = 52, radius: float = 36) -> tuple[np.ndarray, np.ndarray]:
    """``hu`` seen through a circular field of view (centre column ``cx``, row 40) whose outside is padded as air:
    the left lung crosses its edge. Returns (hu, the field of view [Y, X])."""
    y, x = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
    fov = ((x - cx) ** 2 + (y - 40) ** 2) <= radius**2
    return np.where(fov[None], hu, -1000.0).astype(np.float32), fov


def test_lungs_cut_by_the_image_edge_are_repaired() -> None:
    """A CT cropped through the chest, or seen through a circular field of view padded as air: where a lung touches
    the edge its air joins the room air (or the padding), so that slice's lung left the body and the part below it was
    dropped as bowel gas (47 % of a lung lost here, measured and warned since 2026-12-07). That air lies over lung in
    the next slice, which room air never does, and is brighter than room air and padding: its lung-like voxels are
    taken back, slice by slice, and the lungs match the uncropped ones, with no padding or room air in them (a first
    version took whole components: a large patient's padding and room air became 8.8 L of lung). Cropped through a
    lung's middle (its air at the edge in every slice), the main bronchi joining it to the other lung seed it."""
    hu, lung, _ = toy_thorax()
    whole = segment_lungs(hu, SPACING, CFG)
    assert whole.edge_ml == 0.0 and whole.edge_slices == () and whole.edge_repaired_ml == 0.0
    for crop in (13, 28):
        cut = segment_lungs(np.ascontiguousarray(hu[:, :, crop:]), SPACING, CFG)
        assert cut.edge_repaired_ml > 50.0 and cut.edge_ml < 50.0, crop
        assert dice(cut.lung, lung[:, :, crop:]) > 0.97 and dice(cut.lung, whole.lung[:, :, crop:]) > 0.97, crop
    seen, fov = circular_fov(hu)
    cut = segment_lungs(seen, SPACING, CFG)
    assert cut.edge_repaired_ml > 50.0 and dice(cut.lung, lung & fov[None]) > 0.97
    assert not (cut.lung & ~fov[None]).any()  # no padding
    # a large patient: the body wider than the field of view, lungs reaching its circle at the sides, a table
    z, y, x = np.mgrid[0:60, 0:80, 0:80].astype(float)
    big = np.where(((x - 39.5) / 48) ** 2 + ((y - 40) / 30) ** 2 <= 1, 40.0, -1000.0)
    big[(y >= 74) & (y <= 76)] = 300.0
    lungs = np.zeros(z.shape, bool)
    for cx in (14.5, 64.5):
        lungs |= ((x - cx) / 15) ** 2 + ((y - 40) / 22) ** 2 + ((z - 25) / 24) ** 2 <= 1
    big[lungs] = -850.0
    big += np.random.default_rng(0).normal(0, 10, big.shape)
    circle = (x[0] - 39.5) ** 2 + (y[0] - 39.5) ** 2 <= 40**2
    cut = segment_lungs(np.where(circle[None], big, -1000.0).astype(np.float32), SPACING, CFG)
    assert dice(cut.lung, lungs & circle[None]) > 0.97 and not (cut.lung & ~circle[None]).any()
    assert (cut.lung & ~lungs).sum() * np.prod(SPACING) / 1000 < 100  # mL: no room air taken (a first try: 8.8 L)


def test_lungs_cut_in_their_middle_slices_by_a_front_crop_are_repaired_below_the_cut() -> None:
    """A chest cropped in front: the lungs reach the edge in their middle slices only, so the first pass keeps the
    lungs above the cut and drops those below it as bowel gas. The repair propagates past the kept lungs' slices
    (it stopped there: 755 of 3830 mL found, 91 mL said lost)."""
    hu, lung, _ = toy_thorax()
    for crop in (22, 25):
        cut = segment_lungs(np.ascontiguousarray(hu[:, crop:]), SPACING, CFG)
        assert dice(cut.lung, lung[:, crop:]) > 0.97 and cut.edge_ml < 50.0 and cut.edge_repaired_ml > 1000.0, crop


def test_a_lung_as_dark_as_room_air_where_the_edge_cuts_it_is_measured() -> None:
    """Air at room-air HU is never taken back (it may be room air or padding): a lung that dark where the edge cuts
    it (a bulla, say) stays lost, and the lung beside that outside air in the next slice measures the loss."""
    hu, lung, _ = toy_thorax()
    dark = np.where(lung & (np.arange(hu.shape[2]) < 48)[None, None], -1000.0, hu).astype(np.float32)  # the left lung
    cut = segment_lungs(np.ascontiguousarray(dark[:, :, 13:]), SPACING, CFG)
    assert cut.edge_repaired_ml == 0.0 and cut.edge_ml > 1.0 and cut.edge_slices
    assert cut.lung_ml < 0.8 * lung[:, :, 13:].sum() * np.prod(SPACING) / 1000  # what it cost


def test_preprocessing_a_ct_cut_through_the_chest_warns_and_records_the_loss(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from pathlib import Path

    from lungddpm.config import Config
    from lungddpm.data.dicom import DicomSeries
    from lungddpm.data.images import write_image
    from lungddpm.preprocessing.preprocess import _runs, preprocess_case

    hu, lung, _ = toy_thorax()
    dark = np.where(lung & (np.arange(hu.shape[2]) < 48)[None, None], -1000.0, hu)  # its left lung as dark as air
    cases = {"dark": dark[:, :, 13:], "cropped": hu[:, :, 13:]}
    for name, hu in cases.items():
        hu = np.round(hu).astype(np.int16)
        series = DicomSeries(hu.astype(np.float32), 4.0 * np.arange(hu.shape[0]), (4.0, 4.0), (0.0, 0.0), "s", Path())
        write_image(tmp_path / "CT" / f"{name}.nii.gz", hu, series)
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": {"ct_dir": str(tmp_path / "CT")}}}))
    with caplog.at_level("INFO"):
        dark = preprocess_case("dark", tmp_path / "dark", cfg)
        cropped = preprocess_case("cropped", tmp_path / "cropped", cfg)
    assert dark["lung_at_image_edge_ml"] > 1.0
    assert "dark: the lungs reach the edge of the image (or of its field of view) in" in caplog.text
    assert "give the CT uncropped (the chest wall inside the field of view) or with a lung label" in caplog.text
    assert cropped["lung_at_image_edge_ml"] == 0.0 and cropped["lung_edge_repaired_ml"] > 1.0
    assert "cropped: the lungs reach the edge of the image (or of its field of view): " in caplog.text
    assert (
        "was taken back as lung" in caplog.text
        and "cropped: the lungs reach the edge of the image (or of its field of view) in" not in caplog.text
    )
    assert _runs((3, 4, 5, 9)) == "3-5, 9" and _runs(()) == ""


def test_segments_lungs_with_vessels_and_without_airways() -> None:
    hu, lung, airway = toy_thorax()
    result = segment_lungs(hu, SPACING, CFG)
    assert dice(result.lung, lung) > 0.97
    assert not (result.lung & airway).any()
    assert result.airway_ml > 0 and result.n_components == 2
    expected_ml = lung.sum() * 64 / 1000
    assert abs(result.lung_ml - expected_ml) / expected_ml < 0.05


def test_a_bronchus_enclosed_by_the_lung_stays_out_of_its_holes() -> None:
    """The airway is removed, then the lung's in-plane holes are put back (vessels, nodules): a main bronchus that a
    lung encloses in-plane came back as lung with them; a vessel hole beside it still does."""
    from lungddpm.preprocessing.lungmask import _lung_holes

    lung = np.zeros((1, 20, 40), bool)
    lung[0, 4:16, 3:15] = True  # a lung on one side of the midline (x 20)
    airway = np.zeros_like(lung)
    airway[0, 9:11, 8:10] = True  # a bronchus inside it
    lung &= ~airway
    lung[0, 5, 5] = False  # a vessel hole
    holes = _lung_holes(lung, airway, 20.0, np.array([2.0, 2.0, 2.0]), 30.0)
    assert not (holes & airway).any() and holes[0, 5, 5] and int(holes.sum()) == 1


def test_a_label_lung_is_taken_as_is_with_its_own_components() -> None:
    """A source's lung label: nothing removed (its airway voxels stay), its components counted, our midline."""
    hu, lung, airway = toy_thorax()
    label = lung | airway  # a label that includes the airways: kept as given, not cut by our airway removal
    label[:, :, 90:] = False
    label[2:4, 10:12, 92:94] = True  # a third, detached piece
    result = lungs_from_label(hu, label, SPACING, CFG)
    assert result.lung is label and result.airway_ml == 0.0 and not result.airway.any()
    assert result.n_components == 2  # the two lungs joined by the airways + the detached piece
    assert result.lung_ml == pytest.approx(label.sum() * 64 / 1000)
    assert result.body_midline_x == segment_lungs(hu, SPACING, CFG).body_midline_x == pytest.approx(47.5, abs=1)


@pytest.mark.parametrize("shift", [-5, 0, 5])
def test_the_midline_follows_the_patient_not_the_table(shift: int) -> None:
    """A table across the whole field of view, touching the patient's back: the body mask keeps it, so the centre of
    the body's extent was the FOV centre (47.5) wherever the patient lay; the midline is the torso's centre."""
    hu, lung, _ = toy_thorax()
    hu, lung = np.roll(hu, shift, axis=2), np.roll(lung, shift, axis=2)  # body centre x = 48 + shift (index)
    hu[:, 70:73, :] = 300.0  # the table, right under the back, across the field of view
    result = segment_lungs(hu, SPACING, CFG)
    assert result.body_midline_x == pytest.approx(48 + shift, abs=0.5)
    assert lungs_from_label(hu, lung, SPACING, CFG).body_midline_x == result.body_midline_x
    assert dice(result.lung, lung) > 0.95


@pytest.mark.parametrize("gap", [True, False])
def test_a_tables_air_like_core_is_not_a_lung(gap: bool) -> None:
    """A table with a foam or hollow core (-900 HU inside a 300 HU shell) under the patient, apart or touching the
    back: the core is enclosed (not outside air), spans the scan and is large, so it was kept as a third lung (all
    its 4608 voxels)."""
    hu, lung, _ = toy_thorax()
    top = 71 if gap else 70  # the body's back is at y = 70
    hu[:, top : top + 5, 4:92] = 300.0
    hu[:, top + 1 : top + 4, 6:90] = -900.0
    core = np.zeros(hu.shape, bool)
    core[:, top + 1 : top + 4, 6:90] = True
    result = segment_lungs(hu, SPACING, CFG)
    assert not (result.lung & core).any() and result.n_components == 2
    assert dice(result.lung, lung) > 0.95


def arms_and_rails(hu: np.ndarray, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`toy_thorax`'s ``hu`` and ``lung`` widened by 96 mm each side, with (1) arms down at the sides (100 mm
    thick) joined to the flanks by folds in front and behind, enclosing 12-16 mm of room air against the chest wall in
    slices 8-55, and (2) instead a table under the back whose rails rise to the flanks, enclosing the air between
    them and the back in every slice. Returns (hu with arms, hu with rails, lung, the enclosed room air of both)."""
    hu, lung = (np.pad(a, ((0, 0), (0, 0), (24, 24)), constant_values=v) for a, v in ((hu, -1000.0), (lung, False)))
    y, x = np.mgrid[0:80, 0:144].astype(float)
    torso = ((x - 72) / 42) ** 2 + ((y - 40) / 30) ** 2 <= 1
    beyond = np.abs(x - 72) - 42 * np.sqrt(np.clip(1 - ((y - 40) / 30) ** 2, 0, 1))  # past the flank (voxels)
    gap = (beyond > 0) & (beyond < 4) & (np.abs(y - 40) <= 13)
    arms, rails = hu.copy(), hu.copy()
    arms[8:56, (beyond >= 0) & (beyond <= 25) & (np.abs(y - 40) <= 16) & ~gap & ~torso] = 40.0
    rails[:, 71:74] = rails[:, (np.abs(np.abs(x - 72) - 31) <= 1) & (y >= 60) & (y < 74)] = 300.0
    pocket = np.zeros(hu.shape, bool)
    pocket[8:56] |= gap
    pocket |= ((np.abs(x - 72) < 30) & (y >= 60) & (y < 71) & ~torso)[None]
    noise = np.random.default_rng(1).normal(0, 10, hu.shape)
    return (arms + noise).astype(np.float32), (rails + noise).astype(np.float32), lung, pocket


def test_room_air_enclosed_by_the_arms_or_a_tables_rails_is_not_a_lung() -> None:
    """Arms down at the sides, or a table's rails, enclose in-plane room air against the torso: the body's per-slice
    filling took it in, it reached the torso's core and held over 10 % of a lung, so it was kept as lung (arms: 2 x
    330 mL, 1044 mL of false lung, Dice 0.87; rails: 2 x 370 mL, 773 mL, Dice 0.90). It is as dark as room air and
    thin; lung parenchyma is brighter, and lungs as dark as room air (bullae) are thicker: they stay."""
    hu, lung, _ = toy_thorax()
    for dark in (False, True):
        if dark:
            hu[lung] = -1000.0  # lungs as dark as room air
        arms, rails, wide, pocket = arms_and_rails(hu, lung)
        for enclosed in (arms, rails):
            result = segment_lungs(enclosed, SPACING, CFG)
            assert not (result.lung & pocket).any() and dice(result.lung, wide) > 0.97
            assert result.edge_ml == 0.0  # the arms' pockets open at their ends: they were lung lost to the edge


def test_the_trachea_is_seeded_in_the_top_22_mm_at_any_slice_spacing() -> None:
    """1 mm slices with 15 mm of neck above the trachea's top: the seed search looked at the top 11 slices (11 mm
    here, 44 mm at 4 mm) and found no trachea; it looks at the top 22 mm (11 slices of the 2 mm fine grid)."""
    from lungddpm.preprocessing.lungmask import _airway, body_mask, body_midline

    hu, _, airway = toy_thorax()
    neck = np.where(body_mask(hu, CFG.threshold_hu)[-1:], 40.0, -1000.0).repeat(15, axis=0)
    volume = np.concatenate([hu, neck]).astype(np.float32)
    spacing = np.array([1.0, 4.0, 4.0])
    body = body_mask(volume, CFG.threshold_hu)
    found = _airway(volume, body, body_midline(body, tuple(spacing)), spacing, CFG)
    assert (found[: len(hu)] & airway).sum() == airway.sum()


def test_empty_scan_gives_empty_mask() -> None:
    result = segment_lungs(np.full((10, 20, 20), 40.0, dtype=np.float32), SPACING, CFG)
    assert not result.lung.any() and result.lung_ml == 0.0


def test_keeps_a_detached_upper_lobe_and_drops_bowel_gas() -> None:
    hu, lung, _ = toy_thorax()
    band = lung.copy()
    band[:33] = band[35:] = False
    band[..., 48:] = False
    hu[band] = 40.0  # a soft-tissue band cuts one lung's top off (a separate component)
    gas = np.zeros_like(lung)
    gas[1:5, 14:29, 35:60] = True  # 96 mL, below the lungs' mid-height, inside the body, apart from them
    hu[gas] = -1000.0
    result = segment_lungs(hu, SPACING, CFG)
    assert result.n_components == 3  # two lungs + the detached top piece, not the gas
    assert not (result.lung & gas).any()
    assert result.lung[40:45][lung[40:45]].mean() > 0.95


# ------------------------------------------------------------------- juxtapleural nodules on the demo's phantoms
PIXEL, SLICE = 0.8, 2.5  # mm: an LIDC-like 512 x 512 series


def _tangent_site(lung: np.ndarray, diameter: float, side: str) -> tuple[float, float, float]:
    """(k, i, j) of a sphere of ``diameter`` mm inside ``lung`` [Z, Y, X], one pixel from its costal surface on
    ``side`` (right / left: lateral wall, posterior / anterior: dorsal and ventral wall) in its widest slice."""
    k = int(np.argmax(lung.sum(axis=(1, 2))))
    mid, r = lung.shape[2] // 2, diameter / 2 / PIXEL + 1
    i = int(np.argwhere(lung[k])[:, 0].mean())
    cols = np.flatnonzero(lung[k, i])
    if side in ("right", "left"):
        return k, i, cols[cols < mid].min() + r if side == "right" else cols[cols >= mid].max() - r
    half = lung[k][:, :mid] if side == "posterior" else lung[k][:, mid:]
    j = int(np.argwhere(half)[:, 1].mean()) + (0 if side == "posterior" else mid)
    rows = np.flatnonzero(lung[k, :, j])
    return k, rows.max() - r if side == "posterior" else rows.min() + r, j


@functools.cache
def _nodule_free_lungs() -> tuple[ScanGeometry, np.ndarray]:
    """The LIDC-like series' geometry and its phantom's true lungs without nodules (shared by the sites)."""
    geom = ScanGeometry("P", "1.2.3", "1.2.3.4", PIXEL, np.arange(0, 300, SLICE), SLICE)
    return geom, synthesize_thorax(geom, [], seed=1)[1]


SITES = [((10, "right"), (20, "left")), ((30, "posterior"), (40, "anterior")), ((50, "left"),)]


@pytest.mark.parametrize("nodules", SITES)
def test_juxtapleural_nodules_of_10_to_50_mm_lie_inside_the_lung_mask(nodules: tuple[tuple[int, str], ...]) -> None:
    from lungddpm.preprocessing.grid import SliceGrid, fine_geometry, resample

    geom, lung0 = _nodule_free_lungs()
    kk, ii, jj = np.ogrid[: lung0.shape[0], : lung0.shape[1], : lung0.shape[2]]
    spheres = []
    for diameter, side in nodules:
        k, i, j = _tangent_site(lung0, diameter, side)
        d2 = ((kk - k) * SLICE) ** 2 + ((ii - i) * PIXEL) ** 2 + ((jj - j) * PIXEL) ** 2
        spheres.append(d2 <= (diameter / 2) ** 2)
    boxes = [ndi.find_objects(s.astype(np.uint8))[0] for s in spheres]
    specs = [NoduleSpec(s[b], tuple(a.start for a in b), 5) for s, b in zip(spheres, boxes)]
    hu, truth = synthesize_thorax(geom, specs, seed=1)
    grid = SliceGrid(geom.slice_zvals.astype(float), PIXEL, PIXEL, -PIXEL * 256, -PIXEL * 256)
    fine, size = fine_geometry(grid, hu.shape, 2.0)  # preprocessing's fine grid
    on_fine = [resample(m.astype(np.float32), grid, fine, size, order=1, fill=0.0) >= 0.5 for m in (truth, *spheres)]
    hu_fine = resample(hu, grid, fine, size, order=1, fill=-1024.0)
    ours = segment_lungs(hu_fine.copy(), fine.spacing, CFG).lung
    off = segment_lungs(hu_fine, fine.spacing, replace(CFG, pleural_max_diameter_mm=0)).lung
    for (diameter, side), nodule in zip(nodules, on_fine[1:]):
        assert hu[spheres[0]].mean() > -100  # solid: far above the lung threshold
        inside = (ours & nodule).sum() / nodule.sum()
        assert inside >= 0.95, f"{diameter} mm {side}: {inside:.3f} inside the lung mask"
        assert (off & nodule).sum() / nodule.sum() < 0.95  # without the correction they are cut out
    assert dice(ours, on_fine[0]) >= 0.985  # the mediastinum and chest wall stay out


def junction_thorax() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 2 mm chest whose lungs meet in front of the mediastinum (the anterior junction line) and behind it leave a
    gap of 8 mm, which the lungs' closing bridges; a trachea in the mediastinum. Returns (hu, lung, mediastinum,
    trachea)."""
    z, y, x = np.mgrid[0:40, 0:75, 0:90].astype(float) * 2.0
    hu = np.full(z.shape, -1000.0)
    body = ((x - 90) / 80) ** 2 + ((y - 75) / 55) ** 2 <= 1
    hu[body] = 40.0
    lung = np.zeros(z.shape, bool)
    for cx in (55.0, 125.0):
        lung |= (((x - cx) / 30) ** 2 + ((y - 75) / 42) ** 2 + ((z - 40) / 40) ** 2) <= 1
    medi = ((x - 90) / 18) ** 2 + ((y - 75) / 28) ** 2 <= 1  # 36 x 56 mm, the lungs shaped around it
    lung &= ~medi
    ant = (np.abs(x - 90) <= 35) & (np.abs(y - 42) <= 5) & (z >= 30) & (z <= 60)  # the lungs meet
    post = (np.abs(x - 90) <= 35) & (np.abs(y - 108) <= 4) & (z >= 30) & (z <= 60) & (np.abs(x - 90) >= 4)
    lung |= (ant | post) & body & ~medi
    hu[lung] = -850.0
    trachea = ((x - 90) ** 2 + (y - 75) ** 2 <= 5**2) & (z >= 45)
    hu[trachea] = -1000.0
    return hu.astype(np.float32), lung, medi, trachea


def test_lungs_meeting_around_the_mediastinum_leave_it_and_the_trachea_out() -> None:
    """Where the lungs touch in front of the mediastinum and the closing bridges the gap behind it, the mediastinum
    is a hole of the joined lungs: filling holes across the midline labelled it (and the trachea) lung."""
    hu, lung, medi, trachea = junction_thorax()
    result = segment_lungs(hu, (2.0, 2.0, 2.0), CFG)
    assert (result.lung & medi).sum() < 0.02 * medi.sum() and not (result.lung & trachea).any()  # before: 35 %, 154
    assert dice(result.lung, lung) > 0.97


def test_a_nodule_on_the_midline_of_a_lung_reaching_past_it_is_lung() -> None:
    """Holes across the midline are filled up to lungmask.midline_hole_max_mm: a 16 mm nodule of a shifted lung."""
    z, y, x = np.mgrid[0:40, 0:75, 0:90].astype(float) * 2.0
    hu = np.where(((x - 90) / 80) ** 2 + ((y - 75) / 55) ** 2 <= 1, 40.0, -1000.0)
    lung = (((x - 75) / 40) ** 2 + ((y - 75) / 42) ** 2 + ((z - 40) / 40) ** 2) <= 1  # reaches x = 115 mm
    lung |= (((x - 145) / 12) ** 2 + ((y - 75) / 30) ** 2 + ((z - 40) / 40) ** 2) <= 1
    hu[lung] = -850.0
    nodule = ((x - 90) ** 2 + (y - 75) ** 2 + (z - 40) ** 2) <= 8**2
    hu[nodule] = 30.0
    result = segment_lungs(hu.astype(np.float32), (2.0, 2.0, 2.0), CFG)
    assert result.body_midline_x == 45.0 and (result.lung & nodule).sum() == nodule.sum()
    small = segment_lungs(hu.astype(np.float32), (2.0, 2.0, 2.0), replace(CFG, midline_hole_max_mm=10.0))
    assert (small.lung & nodule).sum() < nodule.sum() // 2  # larger than 10 mm: left out (split at the midline)


def test_swallowed_air_on_the_midline_is_not_taken_for_the_trachea() -> None:
    """The trachea seed was the air spot of the top slices nearest the midline: a small column of air in the
    oesophagus on the midline, with the trachea 12 mm to one side, was grown instead (13 mL), and the trachea and
    main bronchi were kept as lung. Each spot is grown now, and the trachea grows furthest."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:60, 0:80, 0:96].astype(float)
    hu = np.full(z.shape, -1000.0)
    hu[((x - 48) / 42) ** 2 + ((y - 40) / 30) ** 2 <= 1] = 40.0
    hu[(y >= 74) & (y <= 76)] = 300.0
    lung = np.zeros(z.shape, dtype=bool)
    for cx in (28, 68):
        lung |= (((x - cx) / 15) ** 2 + ((y - 40) / 20) ** 2 + ((z - 25) / 24) ** 2) <= 1
    hu[lung] = -850.0
    airway = (((x - 51) / 3) ** 2 + ((y - 36) / 3) ** 2 <= 1) & (z >= 35)  # the trachea, 3 voxels off the midline
    for t in np.linspace(0, 1, 40):
        for side in (-1, 1):
            airway |= ((x - 51 - side * (20 - side * 3) * t) ** 2 + (y - 36) ** 2 + (z - 35 + 6 * t) ** 2) <= 2.5**2
    hu[airway] = -1000.0
    hu[(((x - 48) / 1.2) ** 2 + ((y - 42) / 1.2) ** 2 <= 1) & (z >= 45)] = -1000.0  # air in the oesophagus
    hu += rng.normal(0, 10, hu.shape)
    result = segment_lungs(hu.astype(np.float32), SPACING, CFG)
    airway &= ~lung
    assert (result.lung & airway).sum() == 0 and result.airway[airway].all()  # 930 of 930 airway voxels were lung
    assert dice(result.lung, lung) > 0.97
