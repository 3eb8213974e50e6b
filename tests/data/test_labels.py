"""Own label maps checked when the workflow is parsed: the CT's grid from its header alone, the map's values, and
every failing map named in one error."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support import write_non_axial_series

from lungddpm.config import Config, validate_config
from lungddpm.data.dicom import DicomSeries
from lungddpm.data.images import ImageCase, discover, read_ct, read_image, write_image
from lungddpm.data.labels import Grid, ct_grid, grid_problems, has_nodules, header_grid, image_grid, read_label
from lungddpm.data.phantom import DicomQuirks, ScanGeometry, write_dicom_series
from lungddpm.data.sources import known_nodules
from lungddpm.errors import ImageError
from lungddpm.preprocessing.cases import case_strata, list_cases

SHAPE = (8, 20, 16)  # z, y, x


def _series(shape: tuple[int, ...] = SHAPE, origin: tuple[float, float, float] = (-12.0, 30.5, -101.25)) -> DicomSeries:
    z = origin[2] + 2.5 * np.arange(shape[0])
    return DicomSeries(np.zeros(shape, np.float32), z, (0.8, 0.75), origin[:2], "s", Path("ct"))


def _ct(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    hu = np.full(shape, -1000, np.int16)
    hu[:, 2:-2, 2:-2] = 40
    hu[:, 4:-4, 3:7] = hu[:, 4:-4, 9:13] = -850
    return hu


def _labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:-4, 3:7] = labels[:, 4:-4, 9:13] = 1
    labels[2:5, 6:9, 4:6] = 2
    return labels


def _same(a: Grid | None, b: Grid) -> bool:
    return a is not None and a.size == b.size and np.allclose(a.spacing, b.spacing) and np.allclose(a.origin, b.origin)


def test_header_grids_in_lps_order_are_the_grids_read(tmp_path: Path) -> None:
    """The parse-time check reads headers only; its LPS grid must be the one read_image's DICOMOrient gives, for
    volumes stored with flipped and permuted axes and for DICOM series (axial, coronal, sagittal)."""
    write_image(tmp_path / "lps.nii.gz", _ct(), _series())
    image = sitk.ReadImage(str(tmp_path / "lps.nii.gz"))
    stored = {
        "lps.nii.gz": image,
        "ras.nrrd": sitk.Flip(image, [True, True, False]),
        "permuted.mha": sitk.PermuteAxes(sitk.Flip(image, [False, True, True]), [2, 0, 1]),
    }
    for name, volume in stored.items():
        sitk.WriteImage(volume, str(tmp_path / name))
        grid = header_grid(tmp_path / name)
        assert grid is not None and grid.direction == pytest.approx(volume.GetDirection())
        assert _same(grid.lps(), image_grid(read_image(tmp_path / name)))
    assert header_grid(tmp_path / "permuted.mha").size == (8, 16, 20)  # as stored: z, x, y
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.8, np.arange(6) * 2.5 - 40.0, 2.5, rows=24, cols=20)
    write_dicom_series(_ct((6, 24, 20)).astype(np.float32), geom, tmp_path / "axial", DicomQuirks(True, -1024.0, None))
    for orientation in ("coronal", "sagittal"):
        write_non_axial_series(tmp_path / orientation, orientation, None)
    for folder in ("axial", "coronal", "sagittal"):
        read = image_grid(read_image(tmp_path / folder))
        assert _same(header_grid(tmp_path / folder).lps(), read), folder  # type: ignore[union-attr]
    assert header_grid(tmp_path / "axial").lps().size == (20, 24, 6)  # type: ignore[union-attr]
    oblique = sitk.GetImageFromArray(_ct())
    oblique.SetDirection((np.cos(0.3), -np.sin(0.3), 0, np.sin(0.3), np.cos(0.3), 0, 0, 0, 1))
    sitk.WriteImage(oblique, str(tmp_path / "oblique.mha"))
    assert header_grid(tmp_path / "oblique.mha").lps() is None  # type: ignore[union-attr]  # refused when read


def test_a_feet_first_series_drifting_in_plane_is_not_refused(tmp_path: Path) -> None:
    """Feet first (normal against S), 0.625 mm slices drifting 0.068 mm in x over the stack (under the 0.1 pixel the
    read accepts): the header grid took the slice step for the normal, so its LPS origin lay 0.07 mm off the read's,
    over the 0.0625 mm tolerance, and the parse refused a label map drawn on the CT."""
    geom = ScanGeometry("P1", "1.2.826.0.1.1", "1.2.826.0.1.5", 0.7, np.arange(10) * 0.625, 0.625, rows=20, cols=16)
    paths = write_dicom_series(
        _ct((10, 20, 16)).astype(np.float32), geom, tmp_path / "CT" / "c", DicomQuirks(True, -1024.0, None)
    )
    for n, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [175.0 - 0.0076 * n, -160.0, -50.0 - 0.625 * n]
        ds.save_as(path)
    image = read_image(tmp_path / "CT" / "c")
    assert grid_problems(header_grid(tmp_path / "CT" / "c").lps(), image_grid(image)) == []  # type: ignore[arg-type]
    label = sitk.GetImageFromArray(_labels((10, 20, 16)))
    label.CopyInformation(image)
    (tmp_path / "SEG").mkdir()
    sitk.WriteImage(label, str(tmp_path / "SEG" / "c.nii.gz"))
    assert has_nodules(discover(str(tmp_path / "CT"), str(tmp_path / "SEG"), None)["c"], "lung_nodule")


def test_a_plain_label_map_named_nii_gz_is_checked_not_a_traceback(tmp_path: Path) -> None:
    """SimpleITK reads plain NIfTI bytes under a .nii.gz name; nibabel, counting NaN voxels by the name, raised its
    own error at parse time (a traceback through the workflow). Counted by content, the NaN is named."""
    labels = _labels().astype(np.float32)
    labels[3, 7, 5] = np.nan
    cfg = _folders(tmp_path, {"a": labels})
    (tmp_path / "SEG" / "a.nrrd").unlink()
    path = tmp_path / "SEG" / "a.nii.gz"
    write_image(path, labels, _series())
    path.write_bytes(gzip.decompress(path.read_bytes()))
    with pytest.raises(ImageError, match=r"SEG/a.nii.gz: 1 NaN or infinite voxel\(s\); fill them with their class"):
        case_strata(cfg, list_cases(cfg))


def _folders(tmp_path: Path, labels: dict[str, np.ndarray], shifted: str = "") -> Config:
    """A CT of the shared grid for each case, and its label map (``shifted``'s 5 mm along x); the config."""
    for case, volume in labels.items():
        write_image(tmp_path / "CT" / f"{case}.nii.gz", _ct(), _series())
        origin = (-7.0 if case == shifted else -12.0, 30.5, -101.25)
        write_image(tmp_path / "SEG" / f"{case}.nrrd", volume, _series(origin=origin))
    images = {"ct_dir": str(tmp_path / "CT"), "label_dir": str(tmp_path / "SEG")}
    discover.cache_clear()
    return Config.from_dict(validate_config({"data": {"source": "images", "images": images}}))


def test_every_bad_label_map_is_named_when_the_workflow_is_parsed(tmp_path: Path) -> None:
    """A label map off its CT's grid, or with classes the convention lacks, failed one at a time in the first
    preprocess job of its case; now the parse (the split's strata) names every one, with what differs."""
    recoded = _labels() * 2  # lung 2, nodule 4
    cfg = _folders(tmp_path, {"a": _labels(), "b": _labels(), "c": recoded, "d": _labels()}, shifted="b")
    with pytest.raises(ImageError) as err:
        case_strata(cfg, list_cases(cfg))
    text = str(err.value)
    assert text.startswith("2 of 4 cases cannot be read; fix each:\n") and len(text.splitlines()) == 3
    assert "SEG/b.nrrd: its grid does not match its CT " in text and "CT/b.nii.gz (x, y, z in LPS order: " in text
    assert "origin [-7.0, 30.5, -101.25] against [-12.0, 30.5, -101.25]; as stored: the label map 16 x 20 x 8 " in text
    assert "SEG/c.nrrd: labels [0, 2, 4], data.images.label_convention 'lung_nodule' allows [0, 1, 2]" in text
    assert "a.nrrd" not in text and "d.nrrd" not in text
    # the same voxels stored with x and y reversed (a RAS map of an LPS CT) lie on the CT's grid: accepted
    flipped = sitk.Flip(sitk.ReadImage(str(tmp_path / "SEG" / "a.nrrd")), [True, True, False])
    for case in ("b", "c"):
        sitk.WriteImage(flipped, str(tmp_path / "SEG" / f"{case}.nrrd"))
    assert case_strata(cfg, list_cases(cfg)) == {"a": True, "b": True, "c": True, "d": True}
    # the flag is cached by both files: a CT rewritten on another grid is seen at the next parse
    write_image(tmp_path / "CT" / "d.nii.gz", _ct(), _series(origin=(-12.0, 30.5, -90.0)))
    with pytest.raises(ImageError, match=r"^\S*SEG/d.nrrd: its grid does not match its CT .*origin \[-12.0, 30.5, "
                       r"-101.25\] against \[-12.0, 30.5, -90.0\]"):  # fmt: skip
        case_strata(cfg, list_cases(cfg))


def test_a_label_map_off_its_ct_names_both_headers_as_stored(tmp_path: Path) -> None:
    """Read on the CT's grid (the preprocess job), the message names what differs in LPS order and both headers as
    stored, directions included: a map saved with a flipped axis is seen as such (it named the reoriented origin)."""
    write_image(tmp_path / "CT" / "c.nii.gz", _ct(), _series())
    image = sitk.GetImageFromArray(_labels()[:, :, ::-1].copy())  # stored right to left, from the wrong corner
    image.SetSpacing((0.75, 0.8, 2.5))
    image.SetOrigin((-12.0, 30.5, -101.25))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    (tmp_path / "SEG").mkdir()
    sitk.WriteImage(image, str(tmp_path / "SEG" / "c.nrrd"))
    ct = read_ct(tmp_path / "CT" / "c.nii.gz", -1024, 3071)
    with pytest.raises(ImageError) as err:
        read_label(tmp_path / "SEG" / "c.nrrd", ct, "lung_nodule")
    assert "SEG/c.nrrd: its grid does not match its CT " in str(err.value)
    stored = (
        "(x, y, z in LPS order: origin [-23.25, 30.5, -101.25] against [-12.0, 30.5, -101.25]; as stored: the label "
        "map 16 x 20 x 8 voxels of [0.75, 0.8, 2.5] mm, origin [-12.0, 30.5, -101.25], direction [-1.0, 0.0, 0.0, "
        "0.0, 1.0, 0.0, 0.0, 0.0, 1.0]; the CT 16 x 20 x 8 voxels of [0.75, 0.8, 2.5] mm, origin [-12.0, 30.5, "
        "-101.25], direction [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])"
    )
    assert stored in str(err.value)
    case = discover(str(tmp_path / "CT"), str(tmp_path / "SEG"), None)["c"]  # at parse time: the same message
    with pytest.raises(ImageError, match=r"SEG/c.nrrd: its grid does not match its CT .*CT/c.nii.gz \(x, y, z in LPS"):
        has_nodules(case, "lung_nodule")


def test_cleaned_up_file_names_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("patient 0886 (copy).nii.gz", "LIDC-IDRI-0001_0000.nii.gz", "ok.NRRD"):
        (tmp_path / name).write_bytes(b"")
    for folder in ("P10_0000", "P11"):  # DICOM series folders: a folder's name is taken as it is, or said
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.dcm").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lungddpm"):
        ids = list(discover(str(tmp_path), None, None))
    assert ids == ["LIDC-IDRI-0001", "P10", "P11", "ok", "patient_0886_copy"]
    assert "case ids cleaned up from file names" in caplog.text
    assert "'P10_0000' -> P10, 'patient 0886 (copy).nii.gz' -> patient_0886_copy" in caplog.text
    assert "ok.NRRD" not in caplog.text and "LIDC-IDRI-0001_0000" not in caplog.text and "P11" not in caplog.text


def test_label_maps_read_at_parse_time_show_progress_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A first parse reads every label map (a minute or more for hundreds of CTs): a progress bar says so; the next
    parse reads none (the checks are cached by file) and shows nothing."""
    cfg = _folders(tmp_path, {f"c{i:02d}": _labels() for i in range(10)})
    cases = list_cases(cfg)
    assert all(known_nodules(cfg, c) is None for c in cases)
    assert case_strata(cfg, cases) == dict.fromkeys(cases, True)
    assert "checking the files of 10 cases: 100%" in capsys.readouterr().err
    assert all(known_nodules(cfg, c) is True for c in cases)
    assert case_strata(cfg, cases) == dict.fromkeys(cases, True) and capsys.readouterr().err == ""


def test_every_ct_refused_by_its_header_is_named_when_the_workflow_is_parsed(tmp_path: Path) -> None:
    """What reading a CT refuses from its header alone (no orientation, oblique, two series in a folder, an RGB
    volume) failed one case a run, in its preprocess job, also without label maps; now the parse names every one."""
    import nibabel as nib

    ct = tmp_path / "CT"
    write_image(ct / "good.nii.gz", _ct(), _series())
    nib.save(nib.Nifti1Image(np.transpose(_ct(), (2, 1, 0)), None), ct / "bare.nii.gz")  # qform and sform codes 0
    oblique = sitk.GetImageFromArray(_ct())
    oblique.SetDirection((np.cos(0.01), -np.sin(0.01), 0, np.sin(0.01), np.cos(0.01), 0, 0, 0, 1))  # 0.6 degrees
    sitk.WriteImage(oblique, str(ct / "tilted.mha"))
    sitk.WriteImage(sitk.Compose(*[sitk.GetImageFromArray(_ct())] * 3), str(ct / "rgb.nrrd"))
    for uid in ("1.2.826.0.1.7", "1.2.826.0.1.8"):  # two series in one case folder
        geom = ScanGeometry("P1", "1.2.826.0.1.1", uid, 0.8, np.arange(4) * 2.5, 2.5, rows=20, cols=16)
        write_dicom_series(
            _ct((4, 20, 16)).astype(np.float32), geom, ct / "two" / uid, DicomQuirks(True, -1024.0, None)
        )
        for f in (ct / "two" / uid).iterdir():
            f.rename(ct / "two" / f"{uid}_{f.name}")
        (ct / "two" / uid).rmdir()
    discover.cache_clear()
    cfg = Config.from_dict(validate_config({"data": {"source": "images", "images": {"ct_dir": str(ct)}}}))
    cases = list_cases(cfg)
    with pytest.raises(ImageError) as err:
        case_strata(cfg, cases)
    lines = str(err.value).splitlines()
    assert lines[0] == "4 of 5 cases cannot be read; fix each:" and len(lines) == 5
    assert "CT/bare.nii.gz: no orientation (qform_code and sform_code 0)" in lines[1]
    assert "CT/rgb.nrrd: 3-D image with 3 component(s); a CT must be one 3-D scalar volume" in lines[2]
    assert "CT/tilted.mha: oblique orientation [1.0, -0.01, 0.0, 0.01, 1.0, 0.0, 0.0, 0.0, 1.0]" in lines[3]
    assert "CT/two: 2 DICOM series in this folder; keep exactly one series per subfolder" in lines[4]
    for name in ("bare.nii.gz", "rgb.nrrd", "tilted.mha"):  # each refused by the read too (the preprocess job)
        with pytest.raises(ImageError, match=name):
            read_ct(ct / name, -1024, 3071)
    slight = sitk.GetImageFromArray(_ct())  # 0.03 degrees: within the read's tolerance, read as axial
    slight.SetDirection((np.cos(5e-4), -np.sin(5e-4), 0, np.sin(5e-4), np.cos(5e-4), 0, 0, 0, 1))
    sitk.WriteImage(slight, str(tmp_path / "slight.mha"))
    assert ct_grid(tmp_path / "slight.mha").size == (16, 20, 8) and read_ct(tmp_path / "slight.mha", -1024, 3071)


def test_header_only_reads_follow_the_reader_on_negative_spacing_forms_and_unreadable_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MetaImage with a negative spacing (read with that axis reversed) on one grid with its label map was refused
    at parse time (spacing -2.5 against 2.5); a NIfTI whose qform and sform differ in voxel size passed it (the read
    refuses it); a file this user may not read raised an OSError traceback through the parse."""
    import nibabel as nib

    for name, element, values in (("ct", "MET_SHORT", _ct((6, 16, 16))), ("lab", "MET_UCHAR", _labels((6, 16, 16)))):
        values.tofile(tmp_path / f"{name}.raw")
        (tmp_path / f"{name}.mhd").write_text(
            "ObjectType = Image\nNDims = 3\nDimSize = 16 16 6\nElementSpacing = 0.8 0.8 -2.5\nOffset = 0 0 10\n"
            f"ElementType = {element}\nElementDataFile = {name}.raw\n"
        )
    assert _same(ct_grid(tmp_path / "ct.mhd"), image_grid(read_image(tmp_path / "ct.mhd")))
    assert has_nodules(ImageCase("ct", tmp_path / "ct.mhd", tmp_path / "lab.mhd", "ct"), "lung_nodule")
    qform = np.diag([-0.8, -0.8, 2.5, 1.0])
    img = nib.Nifti1Image(np.transpose(_ct(), (2, 1, 0)), None)
    img.set_qform(qform, code=1)
    img.set_sform(np.diag([-0.9, -0.8, 2.5, 1.0]), code=1)  # another voxel size
    nib.save(img, tmp_path / "forms.nii.gz")
    with pytest.raises(ImageError, match=r"forms.nii.gz: its qform and sform disagree on voxel size"):
        ct_grid(tmp_path / "forms.nii.gz")

    def locked(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("lungddpm.data.labels.volume_header_problem", locked)
    with pytest.raises(ImageError, match=r"ct.mhd: unreadable \(.*Permission denied.*\); re-export the volume"):
        ct_grid(tmp_path / "ct.mhd")
