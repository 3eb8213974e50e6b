"""The DICOM writer: a CT series with vendor storage quirks (signedness, rescale intercept, FOV padding)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ...atomic import atomic_folder
from ...errors import ConfigError, DicomError
from .spec import ScanGeometry, fov_mask

log = logging.getLogger(__name__)

_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["lungddpm phantom DICOM writer"])


@dataclass(frozen=True)
class DicomQuirks:
    """How the pixel data of a series is stored (vendor habits that a loader must cope with)."""

    signed: bool  # PixelRepresentation 1 (int16) or 0 (uint16, 12 bits stored)
    rescale_intercept: float  # -1024 or -1000
    padding_hu: float | None  # HU outside the circular FOV (signed only); None: unsigned stores 0 there

    def __post_init__(self) -> None:
        if self.padding_hu is not None and not self.signed:
            raise ConfigError("DicomQuirks: padding_hu needs signed pixels (unsigned series store 0 outside the FOV)")


_QUIRKS = (
    DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=-2000.0),
    DicomQuirks(signed=False, rescale_intercept=-1024.0, padding_hu=None),
    DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=-3024.0),
    DicomQuirks(signed=True, rescale_intercept=-1000.0, padding_hu=None),
    DicomQuirks(signed=False, rescale_intercept=-1000.0, padding_hu=None),
)


def quirks_for(index: int) -> DicomQuirks:
    """Storage quirks of the ``index``-th demo series: a fixed cycle over realistic combinations."""
    return _QUIRKS[index % len(_QUIRKS)]


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _stored_values(hu: np.ndarray, quirks: DicomQuirks, outside: np.ndarray) -> np.ndarray:
    """HU [Y, X] -> stored pixel values (int16 or uint16) under ``quirks``, padded outside the FOV."""
    lo, hi, dtype = (-32768, 32767, np.int16) if quirks.signed else (0, 4095, np.uint16)
    stored = np.rint(hu.astype(np.float64) - quirks.rescale_intercept)
    if quirks.padding_hu is not None:
        stored[outside] = round(quirks.padding_hu - quirks.rescale_intercept)
    elif not quirks.signed:
        stored[outside] = 0
    return np.clip(stored, lo, hi).astype(dtype)


def _slice_dataset(geom: ScanGeometry, quirks: DicomQuirks, k: int, pixels: np.ndarray, frame_uid: str) -> Dataset:
    z = float(geom.slice_zvals[k])
    instance = len(geom.slice_zvals) - k  # the top slice is instance 1, as in LIDC
    content = hashlib.sha256(pixels.tobytes() + repr(quirks).encode()).hexdigest()  # new content, new instance UID
    sop_uid = generate_uid(entropy_srcs=[geom.series_uid, "|", str(k), "|", content])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUNGDDPM_PHANTOM"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "lungddpm phantom"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = "lungddpm procedural phantom"
    ds.PatientName = geom.patient_id
    ds.PatientID = geom.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SliceThickness = _ds(geom.slice_thickness)
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = geom.study_uid
    ds.SeriesInstanceUID = geom.series_uid
    ds.StudyID = "1"  # (the DICOMDIR key dciodvfy asks for)
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "CHEST"  # an unpaired part: General Series' Type 2C Laterality is then absent
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(geom.x0), _ds(geom.y0), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geom.rows, geom.cols
    ds.PixelSpacing = [_ds(geom.pixel_spacing), _ds(geom.pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if quirks.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if quirks.signed else 0
    if quirks.padding_hu is not None:
        ds.PixelPaddingValue = round(quirks.padding_hu - quirks.rescale_intercept)
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _ds(quirks.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    return ds


def write_dicom_series(hu: np.ndarray, geom: ScanGeometry, out_dir: Path, quirks: DicomQuirks) -> list[Path]:
    """Write ``hu`` [Z, rows, cols] as a CT Image Storage series (one ``<InstanceNumber:04d>.dcm`` per slice,
    instance 1 = top slice) into ``out_dir``, atomically as a whole: the files are written into a temporary
    folder beside ``out_dir`` that then replaces it. Returns the paths in slice order (``paths[k]`` holds
    ``hu[k]``). Stored value = round(HU - intercept), clipped to the pixel type; outside the circular FOV the
    quirks' padding (or 0 for unsigned series without padding)."""
    hu = np.asarray(hu)
    if hu.shape != geom.shape:
        raise DicomError(
            f"{out_dir}: volume shape {hu.shape} does not match the geometry {geom.shape} (slices, rows, cols)"
        )
    out_dir = Path(out_dir)
    names = []
    with atomic_folder(out_dir, replace=True) as folder:
        outside = ~fov_mask(geom)
        frame_uid = generate_uid(entropy_srcs=[geom.series_uid, "frame of reference"])
        for k in range(hu.shape[0]):
            ds = _slice_dataset(geom, quirks, k, _stored_values(hu[k], quirks, outside), frame_uid)
            names.append(f"{ds.InstanceNumber:04d}.dcm")
            dcmwrite(folder.tmp / names[-1], ds, enforce_file_format=True)
    log.info("%s: wrote %d DICOM slices (%s)", out_dir, len(names), quirks)
    return [out_dir / n for n in names]
