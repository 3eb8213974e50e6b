"""Reading a DICOM series (lungddpm.data.dicom): slices it cannot read as HU are refused, naming the file."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from lungddpm.data.dicom import read_dicom_series, same_bits
from lungddpm.data.images import read_ct
from lungddpm.data.phantom import ScanGeometry, quirks_for, write_dicom_series
from lungddpm.errors import DicomError


def _series(folder: Path, tissue: bool = False) -> list[Path]:
    """Four 32 x 32 slices of -800 HU inside the field of view (``tissue``: its right half +40 HU, so that it reads
    as a chest CT through ``read_ct``), written as the demo writes its phantoms (here unsigned, intercept -1024: 0
    stored outside the field of view, read as -1024)."""
    geom = ScanGeometry("LIDC-IDRI-9999", "1.2.826.0.1.1", "1.2.826.0.1.2", 0.7, np.arange(4) * 2.5, 2.5, 32, 32)
    volume = np.full((4, 32, 32), -800, np.int16)
    volume[..., 16:] = 40 if tissue else -800
    paths = write_dicom_series(volume, geom, folder, quirks_for(1))
    assert np.array_equal(np.unique(read_dicom_series(folder).hu), [-1024, -800, 40] if tissue else [-1024, -800])
    return paths


@pytest.mark.parametrize("tag", ["RescaleIntercept", "RescaleSlope"])
def test_a_slice_without_its_rescale_tags_is_refused(tmp_path: Path, tag: str) -> None:
    """Stored values are HU only through RescaleSlope / RescaleIntercept (required in CT images): without the
    intercept the -800 HU here read as +224 (before: intercept 0, silently)."""
    paths = _series(tmp_path / "s")
    ds = pydicom.dcmread(paths[2])
    delattr(ds, tag)
    ds.save_as(paths[2])
    with pytest.raises(DicomError, match=rf"{paths[2].name}: no {tag} \(maps its stored values to HU; required"):
        read_dicom_series(tmp_path / "s")


def test_pixel_data_no_decoder_reads_is_refused_naming_the_file(tmp_path: Path) -> None:
    """JPEG 2000 pixel data that no installed decoder reads: before, pydicom's bare RuntimeError named no file."""
    paths = _series(tmp_path / "s")
    ds = pydicom.dcmread(paths[1])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(50)])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[1], enforce_file_format=True)
    said = rf"{paths[1].name}: its pixel data \(JPEG 2000 Image Compression \(Lossless Only\)\) cannot be decoded"
    with pytest.raises(DicomError, match=said + r" .*; re-download this series, or install a pydicom decoder"):
        read_dicom_series(tmp_path / "s")


def test_a_demo_case_without_its_series_says_how_to_write_it(tmp_path: Path) -> None:
    """The demo's series are written by the workflow (or `lungddpm demo-dicom`); the TCIA download advice of a
    missing LIDC patient folder does not apply to it."""
    from lungddpm.config import load_config
    from lungddpm.data.sources import read_case

    cfg = load_config(Path(__file__).resolve().parents[2] / "config/config.yaml")
    advice = r"write it with `lungddpm demo-dicom --case LIDC-IDRI-0078` or `snakemake --cores all resources/demo/"
    with pytest.raises(DicomError, match=r"demo series of LIDC-IDRI-0078 is not written yet; " + advice):
        read_case(cfg, "LIDC-IDRI-0078", tmp_path)
    # its folder without the series (deleted files): no TCIA advice, and Snakemake forced (its manifest is intact)
    (tmp_path / "resources/demo/LIDC-IDRI/LIDC-IDRI-0078").mkdir(parents=True)
    with pytest.raises(DicomError) as err:
        read_case(cfg, "LIDC-IDRI-0078", tmp_path)
    assert re.fullmatch(
        r".*LIDC-IDRI-0078: no DICOM series with SeriesInstanceUID [\d.]+; the demo series of LIDC-IDRI-0078 is "
        r"damaged: write it again with `lungddpm demo-dicom --case LIDC-IDRI-0078` \(it replaces the series folder\) "
        r"or `snakemake --cores all --force resources/demo/series/LIDC-IDRI-0078.json`",
        str(err.value),
    )
    # a damaged file in the series' folder: the reader's problem kept whole, its advice replaced by the demo's
    uid = re.search(r"SeriesInstanceUID ([\d.]+)", str(err.value)).group(1)
    (tmp_path / "resources/demo/LIDC-IDRI/LIDC-IDRI-0078" / uid).mkdir()
    (tmp_path / "resources/demo/LIDC-IDRI/LIDC-IDRI-0078" / uid / "000001.dcm").write_bytes(b"not DICOM")
    with pytest.raises(DicomError) as err:
        read_case(cfg, "LIDC-IDRI-0078", tmp_path)
    said = str(err.value)
    assert "000001.dcm: corrupt or incomplete DICOM file (" in said and "download" not in said
    assert said.endswith("; the demo series of LIDC-IDRI-0078 is damaged: write it again with `lungddpm demo-dicom "
                         "--case LIDC-IDRI-0078` (it replaces the series folder) or `snakemake --cores all --force "
                         "resources/demo/series/LIDC-IDRI-0078.json`")  # fmt: skip
    again = pickle.loads(pickle.dumps(err.value))  # across processes: the problem and the fix travel whole
    assert (again.problem, again.fix, str(again)) == (err.value.problem, err.value.fix, said)


@pytest.mark.parametrize("big_endian", [False, True])
def test_padding_is_matched_by_its_bits_in_either_signedness_and_byte_order(tmp_path: Path, big_endian: bool) -> None:
    """Unsigned pixels with PixelPaddingValue 63536: written as SS -2000 (the same bits), or big-endian (pydicom
    reads '>u2'). Matched by value the first, or by a native-order reinterpretation the second, the padding read as
    63536 - 1024 HU: a bright 3071 HU border round the field of view."""
    from pydicom.dataelem import DataElement
    from pydicom.uid import ExplicitVRBigEndian

    paths = _series(tmp_path / "s", tissue=True)  # unsigned pixels, no padding tag yet
    before = read_dicom_series(tmp_path / "s", padding_hu=-1024.0, max_hu=3071.0).hu  # air round its round field
    for f in paths:
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array.copy()
        pixels[0, :] = 63536
        ds.BitsStored, ds.HighBit = 16, 15
        if big_endian:
            ds.PixelPaddingValue = 63536
            ds.PixelData = pixels.astype(">u2").tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            pydicom.dcmwrite(f, ds, little_endian=False, implicit_vr=False, force_encoding=True)
        else:
            ds.add(DataElement(0x00280120, "SS", -2000))
            ds.PixelData = pixels.tobytes()
            ds.save_as(f)
    assert pydicom.dcmread(f).pixel_array.dtype.byteorder == (">" if big_endian else "=")
    hu = read_dicom_series(tmp_path / "s", padding_hu=-1024.0, max_hu=3071.0).hu
    assert set(np.unique(hu[:, 0, :])) == {-1024.0} and np.array_equal(hu[:, 1:], before[:, 1:])
    # the same folder as `data.source: images` reads it (SimpleITK rescales the padding as HU: 62512 before the fix)
    assert np.array_equal(read_ct(tmp_path / "s", padding_hu=-1024.0, max_hu=3071.0).hu, hu)
    # a value no pixel of that width can hold matches none (wrapped round, -2000 would be uint8's 48)
    assert [same_bits(v, np.dtype(t)) for v, t in ((-2000, "u1"), (70000, ">u2"), (3000, "i1"))] == [None] * 3


@pytest.mark.parametrize("source", ["lidc", "images"])
def test_padding_beyond_the_stored_bits_is_matched_outside_the_field_of_view_only(tmp_path: Path, source: str) -> None:
    """Unsigned 12-bit pixels (BitsStored 12, as the demo writes them) padded with 63536: pydicom and GDCM keep the
    12 stored bits, 2096, so no pixel matched 63536 and the border read +1072 HU (a bright ring round the body). The
    same 2096 in tissue inside the field of view is bone, kept: only padding joined to the slice's edge is padding."""
    from pydicom.dataelem import DataElement

    paths = _series(tmp_path / "s", tissue=True)
    before = read_dicom_series(tmp_path / "s").hu
    for f in paths:
        ds = pydicom.dcmread(f)
        assert (ds.BitsStored, ds.PixelRepresentation) == (12, 0)
        pixels = ds.pixel_array.copy()
        pixels[0, :] = 63536  # the padding rows, written whole (16 bits)
        pixels[20, 20] = 2096  # +1072 HU of bone inside the field of view: its 12 bits are the padding's
        ds.add(DataElement(0x00280120, "US", 63536))  # PixelPaddingValue
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.save_as(f)
    read = read_dicom_series if source == "lidc" else read_ct
    hu = read(tmp_path / "s", -1024.0, 3071.0).hu
    assert set(np.unique(hu[:, 0, :]).tolist()) == {-1024.0}  # was 1072
    assert (hu[:, 20, 20] == 1072.0).all()  # the bone pixel kept
    rest = np.ones(hu.shape[1:], bool)
    rest[0, :] = rest[20, 20] = False
    assert np.array_equal(hu[:, rest], before[:, rest])
