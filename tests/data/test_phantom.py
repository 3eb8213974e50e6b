"""The procedural phantom: determinism, tissue HU, lung truth, nodules, and the DICOM round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lungddpm.data.dicom import find_series_dir, read_dicom_series
from lungddpm.data.phantom import (
    DicomQuirks,
    NoduleSpec,
    PhantomConfig,
    ScanGeometry,
    fov_mask,
    quirks_for,
    synthesize_thorax,
    thorax_landmarks,
    write_dicom_series,
)
from lungddpm.errors import ConfigError, DicomError

PS = 2.7
N = 128
ZVALS = -300.0 + 10.0 * np.arange(30)


def small_geometry(rows: int = N, cols: int = N, zvals: np.ndarray = ZVALS) -> ScanGeometry:
    return ScanGeometry(
        patient_id="LIDC-IDRI-9999",
        study_uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1",
        series_uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.2",
        pixel_spacing=PS,
        slice_zvals=zvals,
        slice_thickness=2.5,
        rows=rows,
        cols=cols,
    )


def pixel_of(geom: ScanGeometry, x: float, y: float) -> tuple[int, int]:
    return round((y - geom.y0) / geom.pixel_spacing), round((x - geom.x0) / geom.pixel_spacing)


def ball(radius_mm: float, dz: float, ps: float) -> np.ndarray:
    rz, rxy = int(radius_mm // dz), int(radius_mm // ps)
    zz, yy, xx = np.ogrid[-rz : rz + 1, -rxy : rxy + 1, -rxy : rxy + 1]
    return (zz * dz) ** 2 + (yy * ps) ** 2 + (xx * ps) ** 2 <= radius_mm**2


@pytest.fixture(scope="module")
def geom() -> ScanGeometry:
    return small_geometry()


@pytest.fixture(scope="module")
def plain(geom: ScanGeometry) -> tuple[np.ndarray, np.ndarray]:
    return synthesize_thorax(geom, [], seed=3)


def deepest_lung_voxel(lung: np.ndarray, geom: ScanGeometry, side: int) -> tuple[int, int, int]:
    """(k, i, j) deepest inside the lung on one side (-1 patient right = low x, +1 left)."""
    x = geom.x0 + geom.pixel_spacing * np.arange(geom.cols)
    half = lung & ((x * side) > 0)[None, None, :]
    depth = ndimage.distance_transform_edt(half, sampling=(10.0, PS, PS))
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape))


def test_shapes_types_and_determinism(geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]) -> None:
    hu, lung = plain
    assert hu.shape == lung.shape == (30, N, N)
    assert hu.dtype == np.float32 and lung.dtype == np.bool_
    hu2, lung2 = synthesize_thorax(geom, [], seed=3)
    assert np.array_equal(hu, hu2) and np.array_equal(lung, lung2)
    hu3, _ = synthesize_thorax(geom, [], seed=4)
    assert not np.array_equal(hu, hu3)


def test_tissue_hu_and_lung_truth(geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]) -> None:
    hu, lung = plain
    voxel_ml = PS * PS * 10.0 / 1000
    assert 1500 < lung.sum() * voxel_ml < 8000
    x = geom.x0 + PS * np.arange(N)
    right, left = lung[..., x < 0].sum(), lung[..., x > 0].sum()
    assert min(right, left) / max(right, left) > 0.5  # two lungs, the left one smaller (heart)
    parenchyma = hu[lung & (hu < -500)]  # without vessels
    assert -900 <= np.median(parenchyma) <= -780
    assert -900 <= np.median(hu[lung]) <= -750
    assert not lung[-1].any() and not lung[0].any()  # above the apex, below the lung bases
    # outside the field of view: exactly air, no lung
    outside = ~fov_mask(geom)
    assert np.all(hu[:, outside] == -1000.0) and not lung[:, outside].any()
    # correlated noise of about noise_hu in the air between body and FOV edge (top corner of the FOV)
    air = hu[:, 2:12, N // 2 - 10 : N // 2 + 10]
    assert abs(np.median(air) + 1000) < 5 and 10 < air.std() < 30
    assert hu.max() > 300  # bone
    # below the back, along the midline: skin, an air gap, then the dense table
    profile = hu[15, :, N // 2]
    table = np.nonzero(profile > 100)[0][-1]
    body = np.nonzero(profile > -300)[0]
    back = body[body < table - 2][-1]
    assert (profile[back + 2 : table - 1] < -900).any()


def test_trachea_is_air_and_not_lung(geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]) -> None:
    hu, lung = plain
    marks = thorax_landmarks(geom)
    i, j = pixel_of(geom, *marks["trachea_xy"])
    assert hu[-1, i, j] < -900
    assert not lung[-1, i - 2 : i + 3, j - 2 : j + 3].any()
    carina_z = marks["carina"][2]
    for k in np.nonzero(ZVALS > carina_z + 5)[0]:
        assert hu[k, i - 1 : i + 2, j - 1 : j + 2].min() < -900  # the lumen runs down to the carina
        assert not lung[k, i, j]
    # the hila (ends of the main bronchi) are not lung either
    for key in ("hilum_right", "hilum_left"):
        x, y, z = marks[key]
        k = int(np.argmin(np.abs(ZVALS - z)))
        i, j = pixel_of(geom, x, y)
        if abs(ZVALS[k] - z) < 2.0:
            assert not lung[k, i, j]


def test_nodules_are_painted_inside_lung(geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]) -> None:
    _, lung0 = plain
    solid = ball(12.0, 10.0, PS)
    k, i, j = deepest_lung_voxel(lung0, geom, -1)
    c = np.array(solid.shape) // 2
    inside = NoduleSpec(mask=solid, offset=(k - c[0], i - c[1], j - c[2]), texture=5)
    # a ground-glass nodule in the liver: the phantom must make lung around it
    ggo = ball(10.0, 10.0, PS)
    c2 = np.array(ggo.shape) // 2
    x_liver, y_liver = -60.0, 0.0
    k2 = int(np.argmin(np.abs(ZVALS - (ZVALS[0] + 0.12 * (ZVALS[-1] - ZVALS[0])))))
    i2, j2 = pixel_of(geom, x_liver, y_liver)
    assert not lung0[k2, i2, j2]
    outside = NoduleSpec(mask=ggo, offset=(k2 - c2[0], i2 - c2[1], j2 - c2[2]), texture=1)
    hu, lung = synthesize_thorax(geom, [inside, outside], seed=3)
    cfg = PhantomConfig()
    for spec in (inside, outside):
        full = np.zeros(hu.shape, dtype=bool)
        sl = tuple(slice(o, o + s) for o, s in zip(spec.offset, spec.mask.shape))
        full[sl] = spec.mask
        assert lung[full].all()
        # the nodule is surrounded by lung (its in-plane neighbourhood within the margin)
        ring = ndimage.binary_dilation(full, ndimage.generate_binary_structure(3, 1)[1][None], iterations=1) & ~full
        assert lung[ring].all()
        core = ndimage.binary_erosion(full, ndimage.generate_binary_structure(3, 1)[1][None], iterations=1)
        expected = cfg.nodule_texture_hu[spec.texture - 1]
        assert abs(np.median(hu[core]) - expected) < 40, (spec.texture, np.median(hu[core]))
    # part-solid: a solid core inside a ground-glass rim
    part = NoduleSpec(mask=solid, offset=inside.offset, texture=3)
    hu3, _ = synthesize_thorax(geom, [part], seed=3)
    centre = hu3[k, i - 1 : i + 2, j - 1 : j + 2]
    assert np.median(centre) > -150
    rim = hu3[k, i, j - int(9 / PS)]
    assert rim < -300


def _lung_around(lung: np.ndarray, spec: NoduleSpec, geom: ScanGeometry) -> tuple[float, bool]:
    """(lung fraction of the nodule's 3 mm shell, whether the nodule's lung component is one of the two lungs')."""
    full = np.zeros(lung.shape, dtype=bool)
    full[tuple(slice(o, o + s) for o, s in zip(spec.offset, spec.mask.shape))] = spec.mask
    dist = ndimage.distance_transform_edt(~full, sampling=(10.0, PS, PS))
    shell = (dist > 0) & (dist <= 3.0)
    labels, _ = ndimage.label(lung)
    lungs = {labels[deepest_lung_voxel(lung, geom, side)] for side in (-1, 1)}
    centre = tuple(int(v) for v in np.round(np.argwhere(full).mean(0)))
    return float(lung[shell].mean()), int(labels[centre]) in lungs


@pytest.mark.parametrize("where", ["mediastinum", "behind the rib cage"])
def test_the_thorax_is_fitted_to_hold_every_nodule_in_its_lungs(
    geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray], where: str
) -> None:
    """A nodule the default anatomy puts in the mediastinum or in the back's muscle sits in lung connected to a
    lung, as the radiologists' nodules do (before: an isolated air pocket in soft tissue, which the lung mask
    drops, so the layout put the nodule outside the lung)."""
    _, lung0 = plain
    k, i, _ = deepest_lung_voxel(lung0, geom, -1)
    if where == "mediastinum":
        j = pixel_of(geom, 0.0, 0.0)[1]
    else:
        j = pixel_of(geom, -60.0, 0.0)[1]
        i = int(np.nonzero(lung0[k, :, j])[0].max()) + round(15.0 / PS)  # 15 mm behind the lung's back
    assert not lung0[k, i - 2 : i + 3, j - 2 : j + 3].any()
    solid = ball(6.0, 10.0, PS)
    c = np.array(solid.shape) // 2
    spec = NoduleSpec(mask=solid, offset=(k - c[0], i - c[1], j - c[2]), texture=5)
    hu, lung = synthesize_thorax(geom, [spec], seed=3)
    shell, connected = _lung_around(lung, spec, geom)
    # behind the rib cage the body moves until the centre is 4 mm inside the lung: the nodule stays juxtapleural
    assert shell > (0.9 if where == "mediastinum" else 0.6) and connected, (shell, connected)
    assert hu[k, i, j] > -200  # the nodule itself is painted


def test_a_nodule_in_the_lung_leaves_the_default_anatomy(
    geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]
) -> None:
    """The fit moves the body only as far as the nodules need: none for a nodule deep in the default lung."""
    _, lung0 = plain
    k, i, j = deepest_lung_voxel(lung0, geom, 1)
    solid = ball(6.0, 10.0, PS)
    c = np.array(solid.shape) // 2
    spec = NoduleSpec(mask=solid, offset=(k - c[0], i - c[1], j - c[2]), texture=5)
    hu, lung = synthesize_thorax(geom, [spec], seed=3)
    outside = np.ones(hu.shape, dtype=bool)
    outside[tuple(slice(max(o - 4, 0), o + s + 4) for o, s in zip(spec.offset, solid.shape))] = False
    assert np.array_equal(lung[outside], lung0[outside])


def test_nodule_outside_the_volume_is_skipped(geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]) -> None:
    spec = NoduleSpec(mask=np.ones((2, 3, 3), dtype=bool), offset=(500, 0, 0), texture=4)
    hu, lung = synthesize_thorax(geom, [spec], seed=3)
    assert np.array_equal(hu, plain[0]) and np.array_equal(lung, plain[1])


def test_any_matrix_irregular_and_fine_slices() -> None:
    zvals = np.concatenate([-200.0 + 2.0 * np.arange(40), -115.0 + 2.5 * np.arange(30)])  # a gap, mixed steps
    g = small_geometry(rows=96, cols=112, zvals=zvals)
    hu, lung = synthesize_thorax(g, [], seed=0)
    assert hu.shape == lung.shape == (70, 96, 112)
    assert lung.sum() > 0 and np.isfinite(hu).all()


def test_invalid_inputs() -> None:
    with pytest.raises(ConfigError, match="strictly ascending"):
        small_geometry(zvals=np.array([0.0, 0.0, 1.0]))
    with pytest.raises(ConfigError, match="texture 6 outside 1..5"):
        NoduleSpec(mask=np.ones((2, 2, 2), dtype=bool), offset=(0, 0, 0), texture=6)
    with pytest.raises(ConfigError, match="padding_hu needs signed pixels"):
        DicomQuirks(signed=False, rescale_intercept=-1024.0, padding_hu=-2000.0)
    with pytest.raises(ConfigError, match="coarse_factor 0 < 1"):
        synthesize_thorax(small_geometry(), [], seed=0, cfg=PhantomConfig(coarse_factor=0))


def test_quirks_cycle() -> None:
    seen = {quirks_for(i) for i in range(10)}
    assert quirks_for(0) == quirks_for(len(seen))
    assert any(q.signed for q in seen) and any(not q.signed for q in seen)
    assert {q.rescale_intercept for q in seen} == {-1024.0, -1000.0}
    assert {q.padding_hu for q in seen} >= {None, -2000.0, -3024.0}


@pytest.mark.parametrize(
    "quirks", [quirks_for(0), quirks_for(1), quirks_for(3)], ids=["signed-padded", "unsigned", "signed"]
)
def test_dicom_round_trip(
    tmp_path: Path, geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray], quirks: DicomQuirks
) -> None:
    hu = plain[0].copy()
    hu[5, 60, 60] = 5000.0  # beyond every pixel type: clipped
    hu[5, 60, 61] = -1500.0
    out = tmp_path / "series"
    paths = write_dicom_series(hu, geom, out, quirks)
    assert [p.name for p in paths][:2] == ["0030.dcm", "0029.dcm"] and len(paths) == 30
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert [p.name for p in tmp_path.iterdir()] == ["series"]  # no temporary folder left behind
    inside = fov_mask(geom)
    lo, hi = (-32768, 32767) if quirks.signed else (0, 4095)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.SeriesInstanceUID == geom.series_uid and ds.StudyInstanceUID == geom.study_uid
        assert ds.PatientID == geom.patient_id and str(ds.PatientName) == geom.patient_id
        assert ds.InstanceNumber == 30 - k
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(ZVALS[k])
        assert float(ds.ImagePositionPatient[0]) == pytest.approx(geom.x0)
        assert float(ds.SliceLocation) == pytest.approx(ZVALS[k])
        assert ds.PixelRepresentation == int(quirks.signed)
        values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = np.clip(np.rint(hu[k].astype(np.float64) - quirks.rescale_intercept), lo, hi)
        expected += quirks.rescale_intercept
        assert np.array_equal(values[inside], expected[inside])
        if quirks.padding_hu is not None:
            assert np.all(values[~inside] == quirks.padding_hu)
        elif not quirks.signed:
            assert np.all(ds.pixel_array[~inside] == 0)
        else:
            assert np.all(values[~inside] == -1000.0)
    # deterministic UIDs; a rewrite replaces the folder
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    (out / "stale.dcm").write_bytes(b"")
    paths2 = write_dicom_series(hu, geom, out, quirks)
    assert [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths2] == uids
    assert len(set(uids)) == 30 and not (out / "stale.dcm").exists()
    other = write_dicom_series(hu + 1.0, geom, tmp_path / "brighter", quirks)  # other content: other instances
    assert not {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in other} & set(uids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brighter", "series"]


def test_dicom_read_by_simpleitk(tmp_path: Path, geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]) -> None:
    hu = plain[0]
    write_dicom_series(hu, geom, tmp_path / "s", quirks_for(2))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    image = reader.Execute()
    arr = sitk.GetArrayFromImage(image)
    assert image.GetOrigin()[2] == pytest.approx(ZVALS[0]) and image.GetSpacing()[0] == pytest.approx(PS)
    assert arr.shape == hu.shape
    inside = fov_mask(geom)
    assert np.array_equal(arr[:, inside], np.rint(hu[:, inside]))


def test_dicom_shape_mismatch(tmp_path: Path, geom: ScanGeometry) -> None:
    with pytest.raises(DicomError, match=r"x: volume shape \(3, .*does not match the geometry"):
        write_dicom_series(np.zeros((3, N, N), np.float32), geom, tmp_path / "x", quirks_for(0))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("index", [0, 1])
def test_dicom_passes_dciodvfy(
    tmp_path: Path, geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray], index: int
) -> None:
    """Debian's dicom3tools validates a demo slice against the CT Image IOD: no Error lines (signed and unsigned)."""
    import shutil
    import subprocess

    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("no dciodvfy: apt-get install --no-install-recommends dicom3tools (the README's test command does)")
    paths = write_dicom_series(plain[0], geom, tmp_path / "s", quirks_for(index))
    proc = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True)
    report = (proc.stdout + proc.stderr).splitlines()
    assert report and not [line for line in report if line.startswith("Error")], "\n".join(report)


def test_a_duplicate_slice_and_hidden_macos_files_are_handled_as_pylidc_does(
    tmp_path: Path, geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    series = tmp_path / "LIDC-IDRI-0001" / "01-01-2000-NA-30178" / "3000566.000000-NA-03192"  # NBIA's newer names
    paths = write_dicom_series(plain[0], geom, series, quirks_for(3))
    before = read_dicom_series(series)
    for p in paths[:2]:  # macOS metadata beside each file copied to a FAT or network drive: sorted first
        (series / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    dup = pydicom.dcmread(paths[3])
    dup.InstanceNumber = 999  # the copy pylidc leaves out: the higher InstanceNumber
    dup.PixelData = np.zeros_like(dup.pixel_array).tobytes()
    dup.save_as(series / "zz_dup.dcm")
    caplog.set_level("WARNING", logger="lungddpm.data.dicom")
    after = read_dicom_series(series)
    assert np.array_equal(after.hu, before.hu) and np.array_equal(after.z_positions, before.z_positions)
    assert "1 slice(s) at the z of another slice left out" in caplog.text and "zz_dup.dcm" in caplog.text
    assert find_series_dir(tmp_path / "LIDC-IDRI-0001", geom.series_uid) == series  # not named by its UID
    first = pydicom.dcmread(paths[3])
    first.InstanceNumber = 0  # now the copy has the lower number: it is the one kept
    first.PixelData = np.zeros_like(first.pixel_array).tobytes()
    first.save_as(series / "zz_dup.dcm")
    k = int(np.flatnonzero(np.isclose(before.z_positions, float(first.ImagePositionPatient[2])))[0])
    assert not np.array_equal(read_dicom_series(series).hu[k], before.hu[k])
    del first.InstanceNumber
    first.save_as(series / "zz_dup.dcm")
    with pytest.raises(DicomError, match=r"zz_dup.dcm: same slice position z=.* no InstanceNumber to choose by"):
        read_dicom_series(series)


def test_every_slice_is_checked_for_the_tags_and_orientation_that_place_it(
    tmp_path: Path, geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """A slice without ImagePositionPatient, or tilted while the first file is axial, is refused naming that file
    (before: a bare AttributeError, and a wrong volume); slices whose x/y move (a gantry tilt) are stacked as pylidc
    stacks them, with a warning, the origin the lowest slice's."""
    series = tmp_path / "s"
    paths = write_dicom_series(plain[0], geom, series, quirks_for(0))
    before = read_dicom_series(series)
    k = len(paths) // 2
    original = pydicom.dcmread(paths[k])
    broken = pydicom.dcmread(paths[k])
    del broken.ImagePositionPatient
    broken.save_as(paths[k])
    with pytest.raises(DicomError, match=rf"{paths[k].name}: no ImagePositionPatient .*re-download"):
        read_dicom_series(series)
    tilted = pydicom.dcmread(paths[-1])
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.966, -0.259]
    original.save_as(paths[k])
    saved = pydicom.dcmread(paths[-1])
    tilted.save_as(paths[-1])
    with pytest.raises(
        DicomError,
        match=rf"{paths[-1].name}: ImageOrientationPatient .* is not \[1, 0, 0, 0, 1, 0\] \(axial.*data.source: images",
    ):
        read_dicom_series(series)
    saved.save_as(paths[-1])
    for p in paths:  # a gantry tilt: y moves 0.5 mm per mm of z
        ds = pydicom.dcmread(p)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * (z - float(geom.slice_zvals[0])), z]
        ds.save_as(p)
    caplog.set_level("WARNING", logger="lungddpm.data.dicom")
    sheared = read_dicom_series(series)
    assert np.array_equal(sheared.hu, before.hu) and "gantry tilt" in caplog.text
    assert sheared.origin_xy == pytest.approx(before.origin_xy)  # the lowest slice's, whichever file is first


def test_a_flattened_or_zipped_download_is_named_as_such(
    tmp_path: Path, geom: ScanGeometry, plain: tuple[np.ndarray, np.ndarray]
) -> None:
    """A patient folder holding two series' files in one folder is found and refused as a mix (it was "the download
    is incomplete"); a series only as a zip or with other suffixes is named among the files not read."""
    flat = tmp_path / "LIDC-IDRI-0001"
    write_dicom_series(plain[0][:3], replace(geom, slice_zvals=geom.slice_zvals[:3]), flat, quirks_for(0))
    other = replace(geom, series_uid=geom.series_uid + ".9", slice_zvals=geom.slice_zvals[:3])
    for p in write_dicom_series(plain[0][:3], other, tmp_path / "o", quirks_for(0)):
        p.rename(flat / f"z{p.name}")  # sorted after the first series' files
    assert find_series_dir(flat, other.series_uid) == flat
    with pytest.raises(DicomError, match=r"LIDC-IDRI-0001: files of 2 series are mixed .* keep one series per"):
        read_dicom_series(flat)
    zipped = tmp_path / "LIDC-IDRI-0002"
    zipped.mkdir()
    (zipped / "series.zip").write_bytes(b"PK\x03\x04")
    (zipped / "1-001.DCM").write_bytes(b"")
    with pytest.raises(DicomError, match=r"no DICOM series with .*files not read \(only \*.dcm files are, unpacked\): "
                       r"\['1-001.DCM', 'series.zip'\]; rename or unpack"):  # fmt: skip
        find_series_dir(zipped, geom.series_uid)
    # in a folder named by the series' UID (NBIA's classic layout) the same files were "no *.dcm files; ...
    # re-download the series": the folder was taken by its name alone
    by_uid = tmp_path / "LIDC-IDRI-0003" / "study" / geom.series_uid
    by_uid.mkdir(parents=True)
    (by_uid / "1-001.DCM").write_bytes(b"")
    with pytest.raises(DicomError, match=r"files not read \(only \*.dcm .*: \['study/.*/1-001.DCM'\]; rename"):
        find_series_dir(tmp_path / "LIDC-IDRI-0003", geom.series_uid)


def test_a_demo_cases_draws_come_from_the_seed_and_its_id_and_cover_every_quirk() -> None:
    """A demo case's phantom seed and DICOM quirks were its index in the sorted case list, so one more case
    (n_scans 13 adds LIDC-IDRI-0098, second in the list) rewrote 11 of the 12 phantoms. Now they come from
    data.demo.seed and the case id; the default demo still stores its series in every quirk."""
    from lungddpm.data.demo import case_draws
    from lungddpm.data.lidc import select_demo_cases
    from lungddpm.data.phantom.dicom import _QUIRKS

    twelve, thirteen = sorted(select_demo_cases(12, 10, 3, 200)), sorted(select_demo_cases(13, 10, 3, 200))
    (new,) = set(thirteen) - set(twelve)
    assert thirteen.index(new) < len(twelve) - 1  # it sorts among them: every case after it had moved
    draws = {c: case_draws(0, c) for c in twelve}
    assert len({d[0] for d in draws.values()}) == 12 and case_draws(1, twelve[0]) != draws[twelve[0]]
    assert {quirks_for(d[1]) for d in draws.values()} == set(_QUIRKS)
