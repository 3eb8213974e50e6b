"""data.source images: each format read at its true geometry, label conventions, stem matching, nodule components."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support import write_non_axial_series

from lungddpm.config import Config, ConfigError, validate_config
from lungddpm.data.demo import export_case
from lungddpm.data.dicom import DicomSeries, check_slice_positions, read_dicom_series
from lungddpm.data.images import ImageCase, case_id_of, discover, patient_of, read_ct, write_image
from lungddpm.data.labels import has_nodules, read_image_case, read_label
from lungddpm.data.nodules import UNKNOWN, axial_diameter_mm, components
from lungddpm.data.phantom import DicomQuirks, ScanGeometry, write_dicom_series
from lungddpm.data.sources import data_files, source_files, source_paths
from lungddpm.errors import DicomError, ImageError, LayoutError
from lungddpm.preprocessing.preprocess import preprocess_case

SPACING = (0.75, 0.8, 2.5)  # x, y, z mm
ORIGIN = (-12.0, 30.5, -101.25)
FORMATS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _ct(shape: tuple[int, int, int] = (10, 24, 20)) -> np.ndarray:
    """A small CT [Z, Y, X] in HU: air around a soft-tissue body with two lungs; all values distinct per voxel."""
    rng = np.random.default_rng(0)
    hu = np.full(shape, -1000, np.int16)
    hu[:, 2:-2, 2:-2] = 40
    hu[:, 5:-5, 4:9] = -850
    hu[:, 5:-5, 11:16] = -850
    return (hu + rng.integers(-20, 20, shape)).astype(np.int16)


def _series(hu: np.ndarray) -> DicomSeries:
    z = ORIGIN[2] + SPACING[2] * np.arange(hu.shape[0])
    return DicomSeries(hu.astype(np.float32), z, (SPACING[1], SPACING[0]), ORIGIN[:2], "s", Path("ct"))


@pytest.mark.parametrize("suffix", FORMATS)
def test_each_volume_format_reads_back_its_hu_and_geometry(tmp_path: Path, suffix: str) -> None:
    hu = _ct()
    path = tmp_path / f"case{suffix}"
    write_image(path, hu, _series(hu))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    if suffix in (".mhd", ".nhdr"):  # the header names its own data file (.nhdr named the temporary one's)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["case.raw", f"case{suffix}"])
        assert "case.raw" in path.read_text() and "tmp" not in path.read_text()
    # the files holding the voxels, which the workflow declares as inputs (a rewritten .raw reruns the case)
    assert data_files(path) == ([tmp_path / "case.raw"] if suffix in (".mhd", ".nhdr") else [])
    series = read_ct(path, padding_hu=-1024.0, max_hu=3071.0)
    assert np.array_equal(series.hu, hu.astype(np.float32))
    assert series.pixel_spacing == pytest.approx((SPACING[1], SPACING[0]))
    assert series.origin_xy == pytest.approx(ORIGIN[:2])
    assert series.z_positions == pytest.approx(ORIGIN[2] + SPACING[2] * np.arange(hu.shape[0]))


def test_the_data_files_of_multi_file_headers_and_dicom_folders(tmp_path: Path) -> None:
    """Detached headers may list their slices (LIST) or name them by a pattern; a DICOM folder's voxels are its
    files. source_files gives them beside the header, so that a rule declares every file a case is read from."""
    (tmp_path / "a.nhdr").write_text("NRRD0004\ntype: short\ndata file: LIST 2\ns1.raw\ns2.raw\n")
    (tmp_path / "b.mhd").write_text("NDims = 3\nElementDataFile = sl%02d.raw 1 5 2\n")
    (tmp_path / "c.mhd").write_text("NDims = 3\nElementDataFile = LOCAL\n")
    assert data_files(tmp_path / "a.nhdr") == [tmp_path / "s1.raw", tmp_path / "s2.raw"]
    assert data_files(tmp_path / "b.mhd") == [tmp_path / f"sl0{i}.raw" for i in (1, 3, 5)]
    assert data_files(tmp_path / "c.mhd") == []
    hu = _ct((6, 32, 32)).astype(np.float32)
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=32, cols=32)
    write_dicom_series(hu, geom, tmp_path / "CT" / "P1", DicomQuirks(True, -1024.0, None))
    files = sorted((tmp_path / "CT" / "P1").iterdir())
    assert len(files) == 6 and data_files(tmp_path / "CT" / "P1") == files
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": {"ct_dir": str(tmp_path / "CT")}}}))
    assert source_files(cfg, "P1") == {"image": str(tmp_path / "CT/P1"), "image_data": [str(f) for f in files]}
    assert source_paths(cfg, "P1") == files  # what the lesion run's digest hashes: the same files


def test_a_dicom_subfolder_reads_like_lungddpms_dicom_reader(tmp_path: Path) -> None:
    hu = _ct((6, 32, 32)).astype(np.float32)
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=32, cols=32)
    folder = tmp_path / "P1"
    write_dicom_series(hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None))
    ours = read_ct(folder, -1024.0, 3071.0)
    reference = read_dicom_series(folder, -1024.0, 3071.0)
    assert np.array_equal(ours.hu, reference.hu)
    assert ours.z_positions == pytest.approx(reference.z_positions)
    assert ours.origin_xy == pytest.approx(reference.origin_xy)
    assert ours.pixel_spacing == pytest.approx(reference.pixel_spacing)


def test_a_cut_or_empty_slice_file_and_a_slice_without_rescale_are_refused_by_name(tmp_path: Path) -> None:
    """GDCM leaves a corrupt, cut or empty file out of the series without a word: the volume lost that slice (an
    empty first file moved its origin); a slice without RescaleSlope / Intercept among slices with them was read as
    HU (air at +24). Both are refused, naming the file, at parse time too (header_grid)."""
    from lungddpm.data.labels import header_grid

    hu = _ct((6, 32, 32)).astype(np.float32)
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=32, cols=32)
    for damage in ("cut", "empty"):
        folder = tmp_path / damage
        paths = write_dicom_series(
            hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None)
        )
        paths[0].write_bytes(paths[0].read_bytes()[:200] if damage == "cut" else b"")
        message = (
            rf"{folder}: 1 DICOM file\(s\) not read as slices of its series, corrupt, cut or empty \({paths[0].name}\)"
        )
        for read in (lambda f: read_ct(f, -1024.0, 3071.0), header_grid):
            with pytest.raises(ImageError, match=message):
                read(folder)
    # an object without pixels (a dose report, a structure set) beside the slices: left out by GDCM, and read as before
    folder = tmp_path / "report"
    write_dicom_series(hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None))
    report = pydicom.dcmread(next(folder.glob("*.dcm")))
    del report.PixelData
    report.SOPClassUID, report.Modality = "1.2.840.10008.5.1.4.1.1.88.67", "SR"  # X-Ray Radiation Dose SR
    report.SeriesInstanceUID = "1.2.826.0.1.9"
    report.save_as(folder / "dose_report.dcm")
    assert read_ct(folder, -1024.0, 3071.0).hu.shape == hu.shape and header_grid(folder).size[2] == 6
    folder = tmp_path / "norescale"
    paths = write_dicom_series(hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None))
    ds = pydicom.dcmread(paths[2])
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.save_as(paths[2])
    with pytest.raises(ImageError, match=rf"{paths[2].name}: no RescaleSlope / RescaleIntercept, which the other"):
        read_ct(folder, -1024.0, 3071.0)


def test_a_volume_stored_in_ras_order_is_reoriented_to_lps(tmp_path: Path) -> None:
    hu = _ct()
    lps = tmp_path / "lps.nii.gz"
    write_image(lps, hu, _series(hu))
    image = sitk.ReadImage(str(lps))
    flipped = sitk.Flip(image, [True, True, False])  # x and y stored reversed, same world positions
    assert flipped.GetDirection() == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(flipped, str(tmp_path / "ras.nii.gz"))
    a, b = read_ct(lps, -1024, 3071), read_ct(tmp_path / "ras.nii.gz", -1024, 3071)
    assert np.array_equal(a.hu, b.hu)
    assert b.origin_xy == pytest.approx(a.origin_xy, abs=1e-4)


def test_an_oblique_volume_and_a_non_hu_volume_are_refused(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(_ct())
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "oblique.mha"))
    with pytest.raises(ImageError, match=r"oblique.mha: oblique orientation .*resample it onto axial"):
        read_ct(tmp_path / "oblique.mha", -1024, 3071)
    sitk.WriteImage(sitk.GetImageFromArray((_ct() + 1024).astype(np.uint16)), str(tmp_path / "raw.nrrd"))
    with pytest.raises(ImageError, match=r"raw.nrrd: 0.0% of the voxels at air or lung HU .* not a chest CT in Houns"):
        read_ct(tmp_path / "raw.nrrd", -1024, 3071)
    # stored values with LIDC's -2000 padding (a minimum below -200), and HU rescaled twice: each passed the
    # minimum-only check, to train on CTs 1024 HU off
    stored = np.where(np.arange(20) < 2, -2000, _ct() + 1024).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(stored), str(tmp_path / "stored.nrrd"))
    twice = np.clip(_ct() - 1024, -1024, None).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(twice), str(tmp_path / "twice.nrrd"))
    for name, which in (("stored", "0.0% of the voxels at air or lung"), ("twice", "0.0% at soft tissue")):
        with pytest.raises(ImageError, match=f"{name}.nrrd: .*{which}"):
            read_ct(tmp_path / f"{name}.nrrd", -1024, 3071)


def test_missing_slices_nan_voxels_and_a_folder_of_volumes_are_refused(tmp_path: Path) -> None:
    # a DICOM series with a slice missing: SimpleITK would stack the rest at one spacing, shifting all past the gap
    hu = _ct((6, 32, 32)).astype(np.float32)
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=32, cols=32)
    folder = tmp_path / "P1"
    write_dicom_series(hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None))
    assert read_ct(folder, -1024.0, 3071.0).z_positions == pytest.approx(np.arange(6) * 2.5 - 40.0)  # complete
    files = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    files[3].unlink()
    with pytest.raises(ImageError, match=r"P1: slices are not evenly spaced \(1 gap\(s\) unlike the usual 2.5 mm: "
                       r"-35.00 to -30.00 mm\); slices are missing"):  # fmt: skip
        read_ct(folder, -1024.0, 3071.0)
    shutil.copyfile(files[0], folder / "copy.dcm")  # a slice twice: said so, not "missing" (a gap of 0 mm)
    with pytest.raises(ImageError, match=r"P1: 1 slice\(s\) at the position of another \(first at -40.00 mm along "
                       r"the slice normal\): two series, or one exported twice"):  # fmt: skip
        read_ct(folder, -1024.0, 3071.0)
    # NaN voxels: NRRD keeps them, SimpleITK's NIfTI reader turns them into 0 HU silently; both refused
    nan = _ct().astype(np.float32)
    nan[3, 10, 10] = np.nan
    nan[4, 10, 10] = np.inf  # an infinite one was clipped to max_hu
    for name in ("nan.nrrd", "nan.nii.gz"):
        write_image(tmp_path / name, nan, _series(nan))
        with pytest.raises(ImageError, match=rf"{name}: 2 NaN or infinite voxel\(s\); fill them with the HU of air"):
            read_ct(tmp_path / name, -1024.0, 3071.0)
    # one NIfTI per case folder (TotalSegmentator's layout) is not a DICOM series: say how to lay it out
    (tmp_path / "s0001").mkdir()
    write_image(tmp_path / "s0001" / "ct.nii.gz", _ct(), _series(_ct()))
    with pytest.raises(ImageError, match=r"s0001: a folder of volume files \(ct.nii.gz\), not a DICOM series; put .*"
                       r"as <case>.nii.gz, named"):  # fmt: skip
        read_ct(tmp_path / "s0001", -1024.0, 3071.0)


def test_slices_unlike_the_first_and_tilted_stacks_are_refused_and_each_slice_rescaled(tmp_path: Path) -> None:
    """SimpleITK stacks a series by its first slice's header: other slices' orientation or spacing, a gantry tilt's
    drifting positions (stacked unsheared at the slanted distance) and each slice's rescale (cast to the first
    slice's integer type: -897.5 HU read as -897) must not pass unseen."""
    hu = _ct((6, 32, 32)).astype(np.float32)
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=32, cols=32)

    def edited(name: str, edit: object) -> Path:
        folder = tmp_path / name
        write_dicom_series(hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None))
        files = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            edit(k, ds)  # type: ignore[operator]
            ds.save_as(f)
        return folder

    def tilt(k: int, ds: pydicom.Dataset) -> None:  # 10 degrees: y moves by tan(10°) x 2.5 mm a slice
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + k * 2.5 * np.tan(np.radians(10))

    with pytest.raises(ImageError, match=r"tilt: the slices' in-plane positions move by up to 2.20 mm over the stack "
                       r"\(a gantry tilt of about 10.0 degrees\).*correct the tilt first"):  # fmt: skip
        read_ct(edited("tilt", tilt), -1024.0, 3071.0)

    def mirrored_first(k: int, ds: pydicom.Dataset) -> None:
        if k == 0:
            ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]

    with pytest.raises(ImageError, match=r"mirrored/.*: ImageOrientationPatient \[1.0, 0.0, 0.0, 0.0, 1.0, 0.0\] "
                       r"differs from that of .*, \[-1.0, 0.0, 0.0, 0.0, -1.0, 0.0\] \(5 of 6 slices\)"):  # fmt: skip
        read_ct(edited("mirrored", mirrored_first), -1024.0, 3071.0)

    def spacing(k: int, ds: pydicom.Dataset) -> None:
        if k == 3:
            ds.PixelSpacing = [0.9, 0.9]

    with pytest.raises(ImageError, match=r"spacing/.*: PixelSpacing \[0.9, 0.9\] differs from that of .*\[0.8, 0.8\] "
                       r"\(1 of 6 slices\)"):  # fmt: skip
        read_ct(edited("spacing", spacing), -1024.0, 3071.0)

    def halves(k: int, ds: pydicom.Dataset) -> None:  # the upper slices at slope 0.5: stored values doubled
        if k >= 3:
            ds.PixelData = (ds.pixel_array.astype(np.int16) * 2 + 1).tobytes()  # s = v + 1024 -> 2s + 1
            ds.RescaleSlope = 0.5  # 0.5 (2s + 1) - 1024 = v + 0.5

    ct = read_ct(edited("halves", halves), -1024.0, 3071.0)
    expected = hu.copy()
    expected[3:] += 0.5
    assert np.array_equal(ct.hu, np.clip(expected, -1024.0, 3071.0))


def test_the_nodule_flag_cache_sees_a_rewrite_of_a_detached_headers_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split's strata are cached by file stats: for a .mhd label map the voxels lie in its .raw, which an editor
    may rewrite alone (the header's stats unchanged: the cached 'has nodules' was kept)."""
    monkeypatch.setenv("LUNGDDPM_CACHE", str(tmp_path / "cache"))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[2, 2, 2] = 2
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "c1.mhd"))
    case = ImageCase("c1", tmp_path / "c1.mhd", tmp_path / "c1.mhd", "c1")
    assert has_nodules(case, "lung_nodule")
    header = (tmp_path / "c1.mhd").stat().st_mtime_ns
    (tmp_path / "c1.raw").write_bytes(np.zeros_like(labels).tobytes())  # the nodule erased in the data file only
    assert (tmp_path / "c1.mhd").stat().st_mtime_ns == header and not has_nodules(case, "lung_nodule")
    (tmp_path / "c1.raw").unlink()  # the header copied without its data file: said at parse time, not a traceback
    with pytest.raises(ImageError, match=r"c1.mhd: its voxels' file .*c1.raw is missing; copy it beside the header"):
        has_nodules(case, "lung_nodule")


@pytest.mark.parametrize(("step", "decimals"), [(0.625, 2), (0.625, 1), (1.25, 1), (0.7, 1)])
def test_slice_positions_stored_with_few_decimals_pass(step: float, decimals: int) -> None:
    """DICOM's DS may round ImagePositionPatient: 0.625 mm slices at 2 decimals are 0.62 / 0.63 mm apart, which the
    1 % gap tolerance refused as "not evenly spaced" though SimpleITK stacks them within 0.005 mm."""
    z = np.round(-100.0 + step * np.arange(40), decimals)
    positions = np.stack([np.full(40, 10.0), np.full(40, -20.0), z], axis=1)
    check_slice_positions(Path("P1"), positions, [1, 0, 0, 0, 1, 0])  # no error
    with pytest.raises(ImageError, match="P1: slices are not evenly spaced"):  # a missing slice still is refused
        check_slice_positions(Path("P1"), np.delete(positions, 20, axis=0), [1, 0, 0, 0, 1, 0])


def test_slice_gaps_that_drift_are_refused() -> None:
    # every gap within GAP_TOLERANCE of the usual one, but 1.0 mm for 10 slices then 1.2 mm: SimpleITK stacks them
    # 1.1 mm apart, so the eleventh slice lands 1 mm off
    z = np.concatenate([np.arange(11) * 1.0, 10.0 + np.arange(1, 11) * 1.2])
    positions = np.stack([np.zeros(21), np.zeros(21), z], axis=1)
    with pytest.raises(ImageError, match=r"P1: slice positions drift .* at 10.00 mm .* stacked 1.00 mm away"):
        check_slice_positions(Path("P1"), positions, [1, 0, 0, 0, 1, 0])


@pytest.mark.parametrize("orientation", ["coronal", "sagittal"])
def test_a_non_axial_series_with_a_missing_slice_is_refused(tmp_path: Path, orientation: str) -> None:
    """The gap check read only ImagePositionPatient's z, which a coronal or sagittal series keeps constant: a missing
    slice passed and SimpleITK restacked the rest evenly, shifting every slice past the gap."""
    write_non_axial_series(tmp_path / "full", orientation, None)
    series = read_ct(tmp_path / "full", -1024.0, 3071.0)
    axis = 1 if orientation == "coronal" else 2  # the slice axis of the LPS [Z, Y, X] volume
    origin, spacing = series.origin_xy[2 - axis], series.pixel_spacing[axis - 1]
    slices = np.moveaxis(series.hu, axis, 0)
    assert slices.shape[0] == 12 and spacing == pytest.approx(2.0)
    assert [float(v) for v in slices.max(axis=(1, 2))] == [40.0 + n for n in range(12)]  # slice n ...
    assert origin + spacing * np.arange(12) == pytest.approx(-10.0 + 2.0 * np.arange(12))  # ... at -10 + 2n mm
    write_non_axial_series(tmp_path / "gap", orientation, 5)
    normal = "[0.0, 1.0, 0.0]" if orientation == "coronal" else "[-1.0, 0.0, 0.0]"
    message = rf"gap: slices are not evenly spaced along the slice normal {re.escape(normal)} \(1 gap\(s\) unlike "
    with pytest.raises(ImageError, match=message + r"the usual 2 mm: -2.00 to 2.00 mm\); slices are missing"):
        read_ct(tmp_path / "gap", -1024.0, 3071.0)


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[:, 5:-5, 4:9] = 1
    labels[:, 5:-5, 11:16] = 1
    labels[2:5, 7:10, 5:8] = 2  # a 3 x 3 x 3 cube
    labels[6:8, 12:14, 12:15] = 2  # a 2 x 2 x 3 box
    return labels


def test_label_conventions_give_lungs_and_nodule_components(tmp_path: Path) -> None:
    hu = _ct()
    series = _series(hu)
    write_image(tmp_path / "ct.nrrd", hu, series)
    write_image(tmp_path / "seg.nrrd", _labels(hu.shape), series)
    case = ImageCase("c", tmp_path / "ct.nrrd", tmp_path / "seg.nrrd", "c")
    scan = read_image_case(case, "lung_nodule", -1024, 3071, 100.0)
    assert scan.lung is not None and np.array_equal(scan.lung, _labels(hu.shape) > 0)
    assert [n.offset for n in scan.nodules] == [(2, 7, 5), (6, 12, 12)]
    voxel_ml = np.prod(SPACING) / 1000
    assert [n.volume_ml for n in scan.nodules] == pytest.approx([27 * voxel_ml, 12 * voxel_ml])
    assert all(n.texture == n.malignancy == n.n_readers == UNKNOWN for n in scan.nodules)
    row = scan.nodules[0].table_row(np.zeros(3))
    assert row["texture"] is None and row["malignancy"] is None and row["consensus_voxels"] == 27
    binary = (_labels(hu.shape) == 2).astype(np.uint8)
    write_image(tmp_path / "bin.nrrd", binary, series)
    lung, nodule = read_label(tmp_path / "bin.nrrd", read_ct(tmp_path / "ct.nrrd", -1024, 3071), "binary")
    assert lung is None and np.array_equal(nodule, binary > 0)
    with pytest.raises(ImageError, match=r"seg.nrrd: labels \[0, 1, 2\], .*'binary' allows \[0, 1\]; set label_conv"):
        read_label(tmp_path / "seg.nrrd", series, "binary")
    write_image(tmp_path / "mask255.nrrd", (binary * 255).astype(np.uint8), series)  # fits neither convention
    with pytest.raises(ImageError, match=r"labels \[0, 255\], .*'lung_nodule' allows \[0, 1, 2\]; recode the map"):
        read_label(tmp_path / "mask255.nrrd", series, "lung_nodule")
    # a CT in the label folder: one line saying so (every HU value was listed, 1,500 of them on one line)
    write_image(tmp_path / "ct_as_label.nrrd", np.round(hu).astype(np.int16), series)
    with pytest.raises(ImageError, match=r"ct_as_label.nrrd: negative labels \(\d+ distinct values from -\d+ to \d+\): "
                       r"this looks like a CT, not a label map; check data.images.label_dir"):  # fmt: skip
        read_label(tmp_path / "ct_as_label.nrrd", series, "lung_nodule")
    case = ImageCase("c", tmp_path / "ct.nrrd", tmp_path / "ct_as_label.nrrd", "c")
    with pytest.raises(ImageError, match=r"ct_as_label.nrrd: negative labels"):  # at parse time: the split's strata
        has_nodules(case, "lung_nodule")
    speckled = np.zeros(hu.shape, np.uint8)
    speckled[::2, ::2, ::2] = 2  # 5 x 12 x 10 = 600 one-voxel nodules: more than the model grid's uint8 index holds
    write_image(tmp_path / "speckled.nrrd", speckled, series)
    with pytest.raises(ImageError, match=r"speckled.nrrd: 600 separate nodule pieces \(at most 255\)"):
        read_image_case(
            ImageCase("c", tmp_path / "ct.nrrd", tmp_path / "speckled.nrrd", "c"), "lung_nodule", -1024, 3071, 100.0
        )
    # a lung read as a nodule: a lung mask given as a binary nodule map, or lung_nodule codes swapped; both passed
    # every check and trained as lung-sized "nodules" (the demo-sized lungs here are 1.05 mL, so the limit is 1 mL)
    swapped = np.where(_labels(hu.shape) == 1, 2, np.where(_labels(hu.shape) == 2, 1, 0)).astype(np.uint8)
    lung_mask = (_labels(hu.shape) > 0).astype(np.uint8)
    for name, volume, convention in (("swapped", swapped, "lung_nodule"), ("lungmask", lung_mask, "binary")):
        write_image(tmp_path / f"{name}.nrrd", volume, series)
        case = ImageCase("c", tmp_path / "ct.nrrd", tmp_path / f"{name}.nrrd", "c")
        with pytest.raises(ImageError, match=rf"{name}.nrrd: a nodule of 1 mL at mean -8[45]\d HU \(air-filled\) is "
                           r"lung, not a nodule: a lung mask under label_convention: binary, or lung_nodule codes "
                           r"swapped .* raise data.images.max_air_nodule_ml"):  # fmt: skip
            read_image_case(case, convention, -1024, 3071, 1.0)
        assert len(read_image_case(case, convention, -1024, 3071, 1.1).nodules) == 2  # a limit above the lungs
    dense = np.round(hu + 900 * (swapped == 2)).astype(np.int16)  # as large, but soft tissue: a mass, kept
    write_image(tmp_path / "dense.nrrd", dense, series)
    case = ImageCase("c", tmp_path / "dense.nrrd", tmp_path / "swapped.nrrd", "c")
    assert [n.volume_ml > 1.0 for n in read_image_case(case, "lung_nodule", -1024, 3071, 1.0).nodules] == [True] * 2


def test_label_lungs_that_vanish_on_the_fine_grid_are_an_error_naming_the_ct(tmp_path: Path) -> None:
    hu = _ct()
    labels = np.zeros(hu.shape, np.uint8)
    labels[4, 10, 6] = 1  # one lung voxel: less than half a voxel of the 2 mm fine grid
    for folder, volume in (("CT", hu), ("SEG", labels)):
        write_image(tmp_path / folder / "case0.nii.gz", volume, _series(hu))
    images = {"ct_dir": str(tmp_path / "CT"), "label_dir": str(tmp_path / "SEG")}
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": images}}))
    vanish = r"CT/case0.nii.gz: the label map's lungs \(1 voxel\(s\)\) vanish on the 2.0 mm fine grid"
    with pytest.raises(DicomError, match=vanish):
        preprocess_case("case0", tmp_path / "out", cfg)
    assert not (tmp_path / "out" / "meta.json").exists()


def _chest(slices: int) -> np.ndarray:
    """A 120 x 100 CT [Z, Y, X] of ``slices`` slices: a body with two air-filled lungs running its whole length."""
    hu = np.full((slices, 120, 100), -1000, np.int16)
    hu[:, 10:-10, 10:-10] = 40
    hu[:, 25:-25, 20:45] = hu[:, 25:-25, 55:80] = -850
    return hu


@pytest.mark.parametrize("thin", [True, False])
def test_a_thin_scan_and_a_nodule_mask_read_as_lungs_are_refused_naming_the_cause(tmp_path: Path, thin: bool) -> None:
    hu = _chest(2 if thin else 12)
    write_image(tmp_path / "CT" / "case0.nii.gz", hu, _series(hu))
    images = {"ct_dir": str(tmp_path / "CT")}
    if not thin:  # a 0/1 nodule mask under the default lung_nodule convention: its nodule reads as "lung"
        mask = np.zeros(hu.shape, np.uint8)
        mask[4:8, 50:56, 30:36] = 1
        write_image(tmp_path / "SEG" / "case0.nii.gz", mask, _series(hu))
        images["label_dir"] = str(tmp_path / "SEG")
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": images}}))
    expected = (
        r"CT/case0.nii.gz: lungs of 0.0 mL, under layout.min_lung_ml 500 mL; the scan's 4 mm in z stop inside the chest"
        if thin
        else r"CT/case0.nii.gz: lungs of [0-9.]+ mL, .* from label 1 of \S*SEG/case0.nii.gz, which has no nodule label "
        r"2: if that map is a 0/1 nodule mask, set data.images.label_convention: binary"
    )
    with pytest.raises(LayoutError, match=expected):
        preprocess_case("case0", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()
    if not thin:  # read as what it is, it gives one nodule and lungddpm's own lungs: the scan then fails only as thin
        cfg = Config.from_dict(
            validate_config({"data": {"source": "images", "images": {**images, "label_convention": "binary"}}})
        )
        with pytest.raises(LayoutError, match=r"lungs of [0-9.]+ mL.*the scan's 28 mm in z stop inside the chest"):
            preprocess_case("case0", tmp_path / "out", cfg)


def test_a_label_map_on_another_grid_is_refused_naming_both_files(tmp_path: Path) -> None:
    hu = _ct()
    write_image(tmp_path / "ct.mha", hu, _series(hu))
    write_image(tmp_path / "seg.mha", _labels(hu.shape)[:, :, :-1], _series(hu[:, :, :-1]))
    with pytest.raises(ImageError, match=r"seg.mha: its grid does not match its CT .*ct.mha"):
        read_label(tmp_path / "seg.mha", read_ct(tmp_path / "ct.mha", -1024, 3071), "lung_nodule")


def test_label_nan_upper_case_meta_and_nested_dicom(tmp_path: Path) -> None:
    hu = _ct()
    series = _series(hu)
    # an upper-case MetaImage name is discovered as a case and read (SimpleITK picked its reader by case: unreadable)
    write_image(tmp_path / "ct.mha", hu, series)
    (tmp_path / "ct.mha").rename(tmp_path / "CASE1.MHA")
    ct = read_ct(tmp_path / "CASE1.MHA", -1024, 3071)
    assert np.array_equal(ct.hu, hu) and case_id_of(tmp_path / "CASE1.MHA") == "CASE1"
    # a NaN in a float NIfTI label map: SimpleITK reads it as 0, a hole in the nodule; refused, naming the file
    labels = _labels(hu.shape).astype(np.float32)
    labels[3, 8, 6] = np.nan  # inside the 3 x 3 x 3 nodule
    write_image(tmp_path / "seg.nii.gz", labels, series)
    with pytest.raises(ImageError, match=r"seg.nii.gz: 1 NaN or infinite voxel\(s\); fill them with their class"):
        read_label(tmp_path / "seg.nii.gz", ct, "lung_nodule")
    # a DICOM series one folder too deep (ct_dir/P1/<series>/*.dcm): the message says where it is and what to do
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=32, cols=32)
    quirks = DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None)
    write_dicom_series(_ct((6, 32, 32)).astype(np.float32), geom, tmp_path / "P1" / "series1", quirks)
    with pytest.raises(ImageError, match=r"P1: 0 DICOM series in this folder \(found one level down, in series1: "
                       r"move each series folder directly into data.images.ct_dir"):  # fmt: skip
        read_ct(tmp_path / "P1", -1024, 3071)


def test_case_ids_are_sanitised_stems_and_stems_must_match(tmp_path: Path) -> None:
    assert case_id_of(Path("LIDC-IDRI-0001.nii.gz")) == "LIDC-IDRI-0001"
    assert case_id_of(Path("lung 003_0000.nii.gz")) == "lung_003"  # nnU-Net's channel suffix removed
    assert case_id_of(Path("scan.MHD")) == "scan" and case_id_of(Path("shards.nii")) == "shards"
    for name in ("shard.nii.gz", "shard_1.nrrd"):  # its item shard_0 would be the runs' manifest shard_0.json
        with pytest.raises(ImageError, match=f"{name}: case id .*: names starting with 'shard' are the workflow's"):
            case_id_of(Path(name))
    ct, seg = tmp_path / "CT", tmp_path / "SEG"
    ct.mkdir(), seg.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "notes.txt"):
        (ct / name).write_bytes(b"")
    for name in ("a.nii.gz", "c.nii.gz"):
        (seg / name).write_bytes(b"")
    with pytest.raises(ImageError, match=r"CTs without a label map: \['b.nii.gz'\]; label maps without a CT: \['c.nii"):
        discover(str(ct), str(seg), None)
    (seg / "c.nii.gz").rename(seg / "b.nii.gz")
    cases = discover(str(ct), str(seg), None)
    assert list(cases) == ["a", "b"] and cases["b"].label == seg / "b.nii.gz"
    (ct / "a.nrrd").write_bytes(b"")
    with pytest.raises(ImageError, match=r"a.nii.gz and .*a.nrrd: both give case id 'a'; rename one"):
        discover(str(ct), None, None)
    (ct / "a.nrrd").unlink()
    (ct / "sub").mkdir()  # a NIfTI in a subfolder was a DICOM case named 'sub' until its job refused it
    (ct / "sub" / "LIDC-IDRI-0078.nii.gz").write_bytes(b"")
    with pytest.raises(ImageError, match=r"sub: a folder of volume files \(LIDC-IDRI-0078.nii.gz\), not a DICOM "
                       r"series; put each CT directly in data.images.ct_dir as <case>.nii.gz"):  # fmt: skip
        discover(str(ct), None, None)
    (ct / "sub" / "0001.dcm").write_bytes(b"")  # beside DICOM files: a series folder, read (and checked) as one
    assert list(discover(str(ct), None, None)) == ["a", "b", "sub"]
    (tmp_path / "flat").mkdir()  # a series' files straight in ct_dir; an empty label folder
    (tmp_path / "flat" / "0001.dcm").write_bytes(b"")
    with pytest.raises(ImageError, match=r"flat: no CT volumes \(.* or DICOM series folders\) \(DICOM files go one "
                       r"series per subfolder\); check data.images.ct_dir"):  # fmt: skip
        discover(str(tmp_path / "flat"), None, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"empty: no label maps \(.nii.gz, .*.mhd files\); check data.images.label_d"):
        discover(str(ct), str(tmp_path / "empty"), None)
    # ids that differ in letter case only are one file on macOS and Windows, so their outputs would overwrite
    (ct / "A.nii.gz").write_bytes(b"")
    discover.cache_clear()  # a parse's answers are cached: this folder's changed
    with pytest.raises(ImageError, match=r"A.nii.gz and .*a.nii.gz: case ids 'A' and 'a' differ in letter case only"):
        discover(str(ct), None, None)
    (ct / "A.nii.gz").unlink()
    # the label folder inside the CT folder, and a macOS archive's __MACOSX folder of ._ files, are no CT cases
    # (they were taken for DICOM folders and refused as "a folder of volume files")
    shutil.rmtree(ct / "sub")
    (ct / "labels").mkdir()
    for name in ("a", "b"):
        (ct / "labels" / f"{name}.nii.gz").write_bytes(b"")
    (ct / "__MACOSX").mkdir()
    (ct / "__MACOSX" / "._a.nii.gz").write_bytes(b"")
    cases = discover(str(ct), str(ct / "labels"), None)
    assert list(cases) == ["a", "b"] and cases["a"].label == ct / "labels" / "a.nii.gz"


def test_patient_regex_groups_series_and_is_checked_at_parse_time(tmp_path: Path) -> None:
    ct = tmp_path / "CT"
    ct.mkdir()
    for name in ("p01_t0.mha", "p01_t1.mha", "p02_t0.mha"):
        (ct / name).write_bytes(b"")
    cases = discover(str(ct), None, r"(p\d+)_")
    assert {c: k.patient_id for c, k in cases.items()} == {"p01_t0": "p01", "p01_t1": "p01", "p02_t0": "p02"}
    with pytest.raises(ImageError, match=r"case 'p01_t0': data.images.patient_regex .* a non-empty first group"):
        patient_of("p01_t0", r"(?:(q\d+)_)?")  # an optional group that matched nothing: no patient, not None
    with pytest.raises(ConfigError, match=r"data.images.patient_regex: 'p.*' has no group; put the patient part in"):
        validate_config({"data": {"source": "images", "images": {"ct_dir": str(ct), "patient_regex": r"p\d+"}}})
    with pytest.raises(ConfigError, match=r"data.images.ct_dir: required when data.source is 'images'"):
        validate_config({"data": {"source": "images"}})


def test_without_a_regex_a_patients_series_are_one_patient_in_every_split() -> None:
    """The export names a patient's series <patient>_s<n>; without a regex each file was its own patient, and seeds
    3 and 4 of the demo's export split LIDC-IDRI-0365's two series between train and test."""
    from lungddpm.preprocessing.split import SplitConfig, split_cases

    names = [f"LIDC-IDRI-{i:04d}" for i in range(1, 11)] + ["LIDC-IDRI-0365_s1", "LIDC-IDRI-0365_s2", "x_s"]
    patients = {c: patient_of(c, None) for c in names}
    assert patients["LIDC-IDRI-0365_s2"] == patients["LIDC-IDRI-0365_s1"] == "LIDC-IDRI-0365"
    assert patients["LIDC-IDRI-0001"] == "LIDC-IDRI-0001" and patients["x_s"] == "x_s"
    for seed in range(8):
        split = split_cases(patients, {c: True for c in names}, SplitConfig(0.7, 0.1, 0.2, seed))
        assert split["LIDC-IDRI-0365_s1"] == split["LIDC-IDRI-0365_s2"], seed


def test_axial_diameter_and_components_of_known_shapes() -> None:
    yy, xx = np.mgrid[:41, :41]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2)[None]  # 31 voxels across
    assert axial_diameter_mm(disc, (0.5, 0.5)) == pytest.approx(31 * 0.5, rel=0.03)
    line = np.zeros((1, 5, 9), bool)
    line[0, 2, 1:8] = True
    assert axial_diameter_mm(line, (1.0, 2.0)) == pytest.approx(np.hypot(14.0, 1.0))
    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal neighbours: one 26-connected component
    mask[4:6, 4:6, 4:6] = True
    found = components(mask, (2.0, 1.0, 1.0))
    assert [n.mask.sum() for n in found] == [2, 8] and found[1].centroid_index == (4.5, 4.5, 4.5)


def test_export_writes_lung_ddpm_labels(tmp_path: Path) -> None:
    hu = _ct()
    lung = _labels(hu.shape) == 1
    scan_nodules = components(_labels(hu.shape) == 2, (SPACING[2], SPACING[1], SPACING[0]))
    export_case(_series(hu), lung, scan_nodules, tmp_path / "CT/x.nii.gz", tmp_path / "SEG/x.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "SEG/x.nii.gz")))
    assert np.array_equal(labels, _labels(hu.shape))


def test_a_model_grid_that_cuts_the_lungs_or_a_nodule_off_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model grid is centred on the lungs; where it is smaller than they are, what falls outside (here most of
    a 100 mm chest and its one nodule, near the top) is not in the layout: a warning says how much."""
    hu = _chest(40)
    labels = np.where(hu == -850, 1, 0).astype(np.uint8)
    labels[2:5, 50:56, 30:36] = 2
    for folder, volume in (("CT", hu), ("SEG", labels)):
        write_image(tmp_path / folder / "case0.nii.gz", volume, _series(hu))
    images = {"ct_dir": str(tmp_path / "CT"), "label_dir": str(tmp_path / "SEG")}
    small = {"size": [16, 16, 16], "spacing_mm": [2.0, 2.0, 2.0]}
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": images}, "preprocess": small,
                                            "layout": {"min_lung_ml": 1}}))  # fmt: skip
    caplog.set_level("WARNING", logger="lungddpm.preprocessing.preprocess")
    preprocess_case("case0", tmp_path / "out", cfg)
    kept = re.search(r"case0: the model grid \(preprocess.size x spacing_mm\) holds (\d+) % of the lungs and 0 of 1 "
                     r"nodules", caplog.text)  # fmt: skip
    assert kept and 8 < int(kept.group(1)) < 16, caplog.text  # a 32 mm cube of the 100 x 56 x 45 mm lungs: 12 %


def test_an_image_folder_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(ImageError, match=r"ct.nii.gz: data.images.ct_dir is a file, not a folder; point it at"):
        discover(str(tmp_path / "ct.nii.gz"), None, None)
    with pytest.raises(ImageError, match=r"none: data.images.ct_dir does not exist; point it at"):
        discover(str(tmp_path / "none"), None, None)


def test_a_relative_image_folder_that_is_missing_is_named_with_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snakemake reads a relative ct_dir under its working directory (-d), not where the user typed the command: the
    message said only "data/CT does not exist" while that folder lay in front of them."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageError, match=rf"data/CT: data.images.ct_dir does not exist \(relative to the working "
                       rf"directory {re.escape(str(tmp_path))}\); point it at"):  # fmt: skip
        discover("data/CT", None, None)


def test_disagreeing_nifti_forms_and_a_single_slice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A qform and sform 40 mm apart were read as SimpleITK chose, without a word (nibabel takes the other); ones
    of other voxel sizes left the volume's size unknown; a one-slice volume lost its slice thickness."""
    import logging

    import nibabel as nib

    hu = np.transpose(_ct(), (2, 1, 0))  # nibabel's [X, Y, Z]
    qform = np.diag([-0.7, -0.7, 2.5, 1.0])
    qform[:3, 3] = (10.0, 20.0, -30.0)
    img = nib.Nifti1Image(hu, None)
    sform = qform.copy()
    sform[2, 3] += 40.0
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=1)
    nib.save(img, tmp_path / "apart.nii.gz")
    with caplog.at_level(logging.WARNING, logger="lungddpm.data.images"):
        series = read_ct(tmp_path / "apart.nii.gz", -1024.0, 3071.0)
    used = "qform" if series.z_positions[0] == pytest.approx(-30.0) else "sform"
    assert series.z_positions[0] == pytest.approx({"qform": -30.0, "sform": 10.0}[used])
    assert re.search(
        rf"apart.nii.gz: its qform and sform place the volume 40.0 mm apart; read at the {used}'s", caplog.text
    )
    sizes = qform.copy()
    sizes[0, 0] = -0.8
    img.set_sform(sizes, code=1)
    nib.save(img, tmp_path / "sizes.nii.gz")
    with pytest.raises(ImageError, match=r"sizes.nii.gz: its qform and sform disagree on voxel size or orientation "
                       r"\(qform \[\[-0.7, .*sform \[\[-0.8, .*img.set_qform\(img.get_sform\(\)\)"):  # fmt: skip
        read_ct(tmp_path / "sizes.nii.gz", -1024.0, 3071.0)
    caplog.clear()
    img.set_sform(qform, code=1)  # alike: read silently
    nib.save(img, tmp_path / "alike.nii.gz")
    with caplog.at_level(logging.WARNING, logger="lungddpm.data.images"):
        assert read_ct(tmp_path / "alike.nii.gz", -1024.0, 3071.0).z_positions[0] == pytest.approx(-30.0)
    assert "qform" not in caplog.text
    write_image(tmp_path / "slice.nii.gz", _ct((1, 24, 20)), _series(_ct((1, 24, 20))))
    with pytest.raises(ImageError, match=r"slice.nii.gz: 1 axial slice\(s\) of 24 x 20; a CT must be a volume of at "
                       r"least 2 slices"):  # fmt: skip
        read_ct(tmp_path / "slice.nii.gz", -1024.0, 3071.0)


def test_a_volume_whose_header_gives_no_orientation_is_refused(tmp_path: Path) -> None:
    """A NIfTI file with qform_code and sform_code 0 (nibabel's Nifti1Image(data, None), Analyze conversions) and an
    NRRD file without a space field were read as LPS without a word: a volume stored right-anterior first came out
    mirrored left-right and front-back. A qform alone, or an NRRD space, orients it."""
    import nibabel as nib

    hu = np.transpose(_ct(), (2, 1, 0))  # nibabel's [X, Y, Z]
    nib.save(nib.Nifti1Image(hu, None), tmp_path / "bare.nii.gz")
    with pytest.raises(ImageError, match=r"bare.nii.gz: no orientation \(qform_code and sform_code 0\): left and "
                       r"right are unknown .*img.set_sform\(affine, code=1\)"):  # fmt: skip
        read_ct(tmp_path / "bare.nii.gz", -1024.0, 3071.0)
    # the same bytes uncompressed but named .nii.gz: SimpleITK reads them (by content); nibabel, by the name, read no
    # header, so the check said nothing and the volume came out as LPS
    nib.save(nib.Nifti1Image(hu, None), tmp_path / "plain.nii")
    (tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    with pytest.raises(ImageError, match=r"plain.nii.gz: no orientation \(qform_code and sform_code 0\)"):
        read_ct(tmp_path / "plain.nii.gz", -1024.0, 3071.0)
    img = nib.Nifti1Image(hu, None)
    img.set_qform(np.diag([-0.7, -0.7, 2.5, 1.0]), code=1)
    nib.save(img, tmp_path / "qform.nii.gz")
    assert read_ct(tmp_path / "qform.nii.gz", -1024.0, 3071.0).hu.shape == (10, 24, 20)
    sitk.WriteImage(sitk.GetImageFromArray(_ct()), str(tmp_path / "lps.nrrd"))
    assert read_ct(tmp_path / "lps.nrrd", -1024.0, 3071.0).hu.shape == (10, 24, 20)
    header, data = (tmp_path / "lps.nrrd").read_bytes().split(b"\n\n", 1)
    kept = [
        line for line in header.split(b"\n") if not line.startswith((b"space:", b"space directions", b"space origin"))
    ]
    (tmp_path / "bare.nrrd").write_bytes(b"\n".join(kept) + b"\n\n" + data)
    with pytest.raises(ImageError, match=r"bare.nrrd: no space field \(no orientation\): left and right are unknown"):
        read_ct(tmp_path / "bare.nrrd", -1024.0, 3071.0)


def test_relative_image_folders_are_read_under_the_given_workflow_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The studio lists a workflow's cases from another folder: the patients and the split of relative
    data.images folders come from that workflow folder too, as its case list does."""
    from lungddpm.config import config_from_mapping
    from lungddpm.preprocessing.cases import case_patients, case_split, list_cases

    ct = tmp_path / "work" / "CT"
    ct.mkdir(parents=True)
    for name in ("p01_t0.mha", "p01_t1.mha", "p02_t0.mha"):
        (ct / name).write_bytes(b"")
    cfg = config_from_mapping(validate_config({"data": {"source": "images", "images": {
        "ct_dir": "CT", "patient_regex": r"(p\d+)_"}}}))  # fmt: skip
    monkeypatch.chdir(tmp_path)  # not the workflow folder: "CT" is not here
    cases = list_cases(cfg, tmp_path / "work")
    assert case_patients(cfg, cases, tmp_path / "work") == {"p01_t0": "p01", "p01_t1": "p01", "p02_t0": "p02"}
    split = case_split(cfg, cases, {c: False for c in cases}, tmp_path / "work")
    assert set(split) == set(cases) and split["p01_t0"] == split["p01_t1"]
    with pytest.raises(ImageError, match="CT"):
        case_patients(cfg, cases)


def test_the_lidc_patient_named_in_an_id_is_found_in_any_case() -> None:
    """One reading of "which LIDC patient": the bank's exclusion of held-out patients and the leak check share it."""
    from lungddpm.preprocessing.cases import lidc_patient_in

    assert lidc_patient_in("lidc-idri-0365_s2") == "LIDC-IDRI-0365" == lidc_patient_in("p_LIDC-IDRI-0365_t0")
    assert lidc_patient_in("patient_12") is None and lidc_patient_in("LIDC-IDRI-36") is None
    # underscores (or a space, cleaned up to one) between the parts: the val and test patients' nodules stayed in
    # the bank, without a word
    assert lidc_patient_in("LIDC_IDRI_0719") == "LIDC-IDRI-0719" == lidc_patient_in("lidcidri0719_ct")
    assert lidc_patient_in("LIDC-IDRI-07190") is None


def test_the_model_grid_lung_lies_where_the_fine_lung_does_at_a_half_voxel_offset(tmp_path: Path) -> None:
    """A model grid half a 2 mm fine voxel off the fine grid in y and z: nearest-neighbour took the upper fine voxel
    at every tie, and lung.nii.gz lay 1 mm towards -y and -z of lung_fine.nii.gz and the CT (a reviewer's case)."""
    import nibabel as nib

    from lungddpm.io import read_volume

    affine = np.diag([1.6, 1.8, 4.0, 1.0])
    affine[:3, 3] = [-88.0, -95.0, -80.0]
    i, j, k = np.meshgrid(np.arange(110), np.arange(100), np.arange(45), indexing="ij")  # RAS-stored, (x, y, z)
    x, y, z = 1.6 * i - 88.0, 1.8 * j - 95.0, 4.0 * k - 80.0
    lungs = (((x - 40) / 28) ** 2 + ((y - 5) / 40) ** 2 + ((z - 10) / 60) ** 2 < 1) | (
        ((x + 40) / 28) ** 2 + ((y - 5) / 40) ** 2 + ((z - 10) / 60) ** 2 < 1
    )
    ct = np.where((x / 80) ** 2 + (y / 70) ** 2 < 1, 40, -1000).astype(np.int16)
    ct[lungs] = -850
    for volume, folder in ((ct, "CT"), (lungs.astype(np.uint8), "SEG")):
        (tmp_path / folder).mkdir()
        image = nib.Nifti1Image(volume, affine)
        image.set_qform(affine, 1)
        nib.save(image, str(tmp_path / folder / "c1.nii.gz"))
    images = {"ct_dir": str(tmp_path / "CT"), "label_dir": str(tmp_path / "SEG")}
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": images},
                                            "preprocess": {"spacing_mm": [2.0, 2.0, 2.0], "size": [64, 96, 96]},
                                            "model": {"attention_resolutions": [12]}}))  # fmt: skip
    preprocess_case("c1", tmp_path / "out", cfg)
    (model, grid), (fine, fine_grid) = (read_volume(tmp_path / "out" / f) for f in ("lung.nii.gz", "lung_fine.nii.gz"))
    offset = (np.asarray(grid.origin) - np.asarray(fine_grid.origin)) / 2.0  # in fine voxels (x, y, z)
    assert np.isclose(offset[1:] % 1, 0.5).all()  # the ties this case is about
    centre = [g.index_to_world(np.argwhere(m > 0).mean(0)[None])[0] for m, g in ((model, grid), (fine, fine_grid))]
    assert np.abs(centre[0] - centre[1]).max() < 0.1  # mm; it was 1.0 in y and z
