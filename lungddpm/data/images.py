"""``data.source: images``: your own CT folders (NIfTI, NRRD, MHA/MHD, or one DICOM series per subfolder), found
and read with SimpleITK at their true geometry, with optional label maps matched by file stem (read in
:mod:`~lungddpm.data.labels`). Volumes are reoriented to LPS-aligned axes (``DICOMOrient``) so that they follow the
same ``[Z, Y, X]`` convention as DICOM.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ..io import nifti_forms, nifti_non_finite, volume_header_problem
from . import series_patient
from .dicom import DicomSeries, check_slice_geometry, mask_padding, series_count_error, slice_geometry

log = logging.getLogger(__name__)

# the volume suffixes, each with SimpleITK's reader, chosen by the lower-cased name (SimpleITK picks MetaImage by
# case: CASE1.MHA failed); .nii.gz before .nii
IMAGE_IOS = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
             ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}  # fmt: skip
SUFFIXES = tuple(IMAGE_IOS)
ORIENTATION_TOLERANCE = 1e-3  # direction cosines off an axis by less count as that axis; more is oblique
COMPANIONS = (".raw", ".zraw", ".raw.gz", ".img")  # data files of .mhd / .nhdr headers, never cases themselves
CHANNEL_SUFFIX = re.compile(r"_0000$")  # nnU-Net's raw image naming: <case>_0000.nii.gz
# a chest CT in HU holds both air or lung and soft tissue (the demo's: 39-69 % and 19-46 % of the voxels)
HU_AIR, HU_TISSUE, HU_MIN_FRACTION = (-1100.0, -700.0), (-200.0, 300.0), 0.02


@dataclass(frozen=True)
class ImageCase:
    """One CT of an image folder: its case id (the sanitised stem), files and patient."""

    case_id: str
    image: Path  # a volume file, or a folder holding one DICOM series
    label: Path | None
    patient_id: str


def case_id_of(path: Path) -> str:
    """File stem (every volume suffix and nnU-Net's ``_0000`` removed; a DICOM folder's name), sanitised to
    ``[A-Za-z0-9._-]``."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = CHANNEL_SUFFIX.sub("", name)
    case = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    if not case:
        raise ImageError(f"{path}: no usable case id in its name; rename it (letters, digits, . _ -)")
    if re.match(r"shard($|_)", case):  # items <case>_<k> would be named like the runs' shard_<i>.json manifests
        raise ImageError(f"{path}: case id {case!r}: names starting with 'shard' are the workflow's; rename it")
    return case


def _entries(folder: Path, what: str, dicom_dirs: bool, skip: Path | None = None) -> dict[str, Path]:
    """case id -> volume file (or DICOM folder) of ``folder`` but ``skip`` (the label folder inside it); other files
    are listed in a warning. Case ids may not differ in letter case only (one file on macOS and Windows)."""
    kind = "CT volumes" if dicom_dirs else "label maps"  # only the CT folder may hold DICOM series folders
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        where = "" if folder.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise ImageError(f"{folder}: {what} {state}{where}; point it at the folder holding your {kind}")
    found, ignored, cleaned = dict[str, Path](), list[str](), list[str]()
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == "__MACOSX" or (skip and entry.resolve() == skip.resolve()):
            continue  # hidden, a macOS archive's resource forks, or the label folder
        lower = entry.name.lower()
        if entry.is_dir():
            if not dicom_dirs or not any(entry.iterdir()):
                ignored.append(entry.name)
                continue
            volumes = [f.name for f in sorted(entry.iterdir()) if f.name.lower().endswith(SUFFIXES)]
            others = [f for f in entry.iterdir() if f.is_file() and not f.name.lower().endswith(SUFFIXES + COMPANIONS)]
            if volumes and not others:  # volume files only, nothing that could be DICOM beside them
                raise _volume_folder_error(entry, volumes, what)
        elif not lower.endswith(SUFFIXES):
            ignored += [] if lower.endswith(COMPANIONS) else [entry.name]  # a header's data file is no case
            continue
        case = case_id_of(entry)
        if (same := next((c for c in found if c.casefold() == case.casefold()), None)) is not None:
            clash = f"both give case id {case!r}" if same == case else f"case ids {same!r} and {case!r} differ in " \
                "letter case only (one file name on macOS and Windows)"  # fmt: skip
            raise ImageError(f"{found[same]} and {entry}: {clash}; rename one (case ids are sanitised stems)")
        found[case] = entry
        kept = rf"{re.escape(case)}(_0000)?({'|'.join(map(re.escape, SUFFIXES))})?"  # a file's stem, as it is
        if (case != entry.name) if entry.is_dir() else not re.fullmatch(kept, lower, re.I):
            cleaned.append(f"{entry.name!r} -> {case}")
    if cleaned:  # outputs are named by case id: say which file each cleaned-up one is
        shown = ", ".join(cleaned[:10]) + (" ..." if len(cleaned) > 10 else "")
        log.warning("%s: case ids cleaned up from file names (letters, digits, . _ - kept; rename the files to "
                    "silence this): %s", folder, shown)  # fmt: skip
    if ignored:
        log.warning("%s: not volumes, ignored: %s", folder,
                    ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))  # fmt: skip
    if not found:
        series = " or DICOM series folders" if dicom_dirs else ""
        dicom = " (DICOM files go one series per subfolder)" if any(n.lower().endswith(".dcm") for n in ignored) else ""
        raise ImageError(f"{folder}: no {kind} ({', '.join(SUFFIXES)} files{series}){dicom}; check {what}")
    return found


def _volume_folder_error(folder: Path, volumes: Sequence[str], what: str) -> ImageError:
    """The error for a subfolder of volume files where a DICOM series folder was expected (one per case)."""
    suffix = next(x for x in SUFFIXES if volumes[0].lower().endswith(x))
    return ImageError(f"{folder}: a folder of volume files ({', '.join(volumes[:3])}), not a DICOM series; put each "
                      f"CT directly in {what} as <case>{suffix}, named by its case")  # fmt: skip


def patient_of(case_id: str, pattern: str | None) -> str:
    """The patient of a case: the first group of ``data.images.patient_regex`` matched at the start of the case
    id; without a regex the case id less a ``_s<n>`` series suffix (lungddpm's names of a patient's series, as
    ``lungddpm demo-images`` exports them), else the case id itself (one patient per volume)."""
    if not pattern:
        return series_patient(case_id)
    m = re.match(pattern, case_id)
    if not m or not m.groups() or not m.group(1):
        raise ImageError(
            f"case {case_id!r}: data.images.patient_regex {pattern!r} does not match it with a non-empty first group; "
            "make the patient part a required, non-empty first group, e.g. '(.+?)(?:_t\\d+)?$' for P1_t1, P1_t2, P2"
        )
    return m.group(1)


@functools.cache
def discover(ct_dir: str, label_dir: str | None, patient_regex: str | None) -> dict[str, ImageCase]:
    """Every case of an image folder, by case id (sorted); label maps are matched by stem, both ways."""
    images = _entries(Path(ct_dir), "data.images.ct_dir", dicom_dirs=True, skip=Path(label_dir) if label_dir else None)
    labels = _entries(Path(label_dir), "data.images.label_dir", dicom_dirs=False) if label_dir else {}
    if label_dir:
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        if no_label or no_image:
            parts = [f"CTs without a label map: {[images[c].name for c in no_label]}"] if no_label else []
            parts += [f"label maps without a CT: {[labels[c].name for c in no_image]}"] if no_image else []
            raise ImageError(
                f"{ct_dir} / {label_dir}: stems do not match ({'; '.join(parts)}); give every CT a label map of the "
                "same stem (all zeros for a CT without nodules), or set data.images.label_dir: null"
            )
    return {c: ImageCase(c, images[c], labels.get(c), patient_of(c, patient_regex)) for c in sorted(images)}


def read_image(path: Path, padding_hu: float | None = None) -> Any:
    """A SimpleITK image of a volume file or of the one DICOM series of a folder, reoriented to LPS axes; a series'
    PixelPaddingValue voxels set to ``padding_hu`` (when given)."""
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            volumes = [f.name for f in sorted(path.iterdir()) if f.name.lower().endswith(SUFFIXES)]
            if not series and volumes:
                raise _volume_folder_error(path, volumes, "data.images.ct_dir")
            if len(series) != 1:
                raise series_count_error(path, len(series))
            names = reader.GetGDCMSeriesFileNames(str(path), series[0])
            check_series_files(path, names)
            reader.SetFileNames(names)
            reader.MetaDataDictionaryArrayUpdateOn()  # each slice's header, read with its pixels
            reader.SetOutputPixelType(sitk.sitkFloat32)  # not the first slice's type: each slice's own rescale
            image = reader.Execute()
            check_slice_geometry(path, names, *slice_geometry(reader, names))
            rescaled = [reader.HasMetaDataKey(i, "0028|1053") for i in range(len(names))]
            if any(rescaled) and not all(rescaled):  # its stored values would be read as HU
                raise ImageError(
                    f"{names[rescaled.index(False)]}: no RescaleSlope / RescaleIntercept, which the other "
                    f"slices of {path} have (its stored values would be read as HU); re-export the series"
                )
            image = image if padding_hu is None else mask_padding(image, reader, names, padding_hu)
        else:
            io = next((v for k, v in IMAGE_IOS.items() if path.name.lower().endswith(k)), "")
            image = sitk.ReadImage(str(path), imageIO=io)
    except RuntimeError as exc:
        raise ImageError(f"{path}: unreadable ({str(exc).strip().splitlines()[-1]}); re-export the volume") from exc
    if not path.is_dir() and (problem := volume_header_problem(path)):
        raise ImageError(f"{path}: {problem}")
    refuse_shape(path, image.GetDimension(), image.GetNumberOfComponentsPerPixel())
    if not path.is_dir() and (forms := nifti_forms(path)) is not None:
        _check_forms(path, image, *forms)
    image = sitk.DICOMOrient(image, "LPS")
    if not np.allclose(np.asarray(image.GetDirection()), np.eye(3).ravel(), atol=ORIENTATION_TOLERANCE):
        raise oblique_error(path, image.GetDirection())
    return image


def check_series_files(folder: Path, names: Sequence[str]) -> None:
    """Refuse a DICOM ``folder`` with DICOM files (a ``.dcm`` name or the ``DICM`` preamble) not among its series'
    slices ``names`` that are unreadable, or of the slices' SOP class: GDCM leaves out a corrupt, cut or empty file
    without a word, and the volume then lacks that slice (its origin moved, or a gap said of the slices around it).
    Objects of another class (a dose report, a structure set) are left out by design, and pass."""
    import pydicom

    def sop_class(f: Path | str) -> str | None:
        try:
            return str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
        except Exception:  # cut or empty: unreadable, or a header cut before its SOP class
            return None

    kept, left, theirs = {Path(n).name for n in names}, [], sop_class(names[0]) if names else None
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR" and f.name not in kept:
            with open(f, "rb") as fh:
                if f.suffix.lower() != ".dcm" and fh.read(132)[128:132] != b"DICM":
                    continue
            if (cls := sop_class(f)) is None or cls == theirs:
                left.append(f.name)
    if left:
        raise ImageError(f"{folder}: {len(left)} DICOM file(s) not read as slices of its series, corrupt, cut or empty "
                         f"({', '.join(left[:5])}); copy them again, or re-export the series")  # fmt: skip


def refuse_shape(path: Path, dimension: int, components: int) -> None:
    """Refuse an image that is not one 3-D scalar volume."""
    if dimension != 3 or components != 1:
        raise ImageError(f"{path}: {dimension}-D image with {components} component(s); a CT must be one 3-D scalar "
                         "volume")  # fmt: skip


def oblique_error(path: Path, direction: Sequence[float]) -> ImageError:
    """The error for a volume whose axes are not along L, P and S (``direction``: 3 x 3 row-major)."""
    return ImageError(f"{path}: oblique orientation {(np.round(direction, 3) + 0.0).tolist()}; resample it onto "
                      "axial, axis-aligned slices first (only axial CT is supported)")  # fmt: skip


def _check_forms(path: Path, image: Any, qform: np.ndarray, sform: np.ndarray) -> None:
    """A NIfTI file whose qform and sform (RAS 4 x 4) differ: refused where they differ in voxel size or orientation
    (the volume's size or handedness is then unknown); a warning naming the one SimpleITK read where they differ in
    position alone (its label map is read the same way, so the two stay aligned)."""
    refuse_forms(path, qform, sform)
    origin = np.asarray(image.GetOrigin()) * (-1, -1, 1)  # SimpleITK's LPS -> the forms' RAS
    used = min((np.abs(f[:3, 3] - origin).max(), name) for f, name in ((qform, "qform"), (sform, "sform")))[1]
    log.warning("%s: its qform and sform place the volume %.1f mm apart; read at the %s's position, as SimpleITK "
                "chooses (its label map likewise); set both alike to silence this", path,
                float(np.linalg.norm(qform[:3, 3] - sform[:3, 3])), used)  # fmt: skip


def refuse_forms(path: Path, qform: np.ndarray, sform: np.ndarray) -> None:
    """Refuse a NIfTI file whose qform and sform (RAS 4 x 4) differ in voxel size or orientation."""
    if not np.allclose(qform[:3, :3], sform[:3, :3], atol=1e-4):
        q, s = (np.round(f[:3, :3], 4).tolist() for f in (qform, sform))
        raise ImageError(
            f"{path}: its qform and sform disagree on voxel size or orientation (qform {q}, sform {s}); SimpleITK "
            "reads one, nibabel the other: export it again with both set to the true one (nibabel: "
            "img.set_qform(img.get_sform()))"
        )


def refuse_non_finite(path: Path, values: np.ndarray, fill: str) -> None:
    """Refuse NaN or infinite voxels of ``path`` (SimpleITK's NIfTI reader turns NaN into 0 without a word)."""
    bad = int((~np.isfinite(values)).sum()) or (0 if path.is_dir() else nifti_non_finite(path))
    if bad:
        raise ImageError(f"{path}: {bad} NaN or infinite voxel(s); fill them with {fill} and export again")


def read_ct(path: Path, padding_hu: float, max_hu: float) -> DicomSeries:
    """A CT volume -> axial series in HU [Z, Y, X] (z ascending), clipped to [``padding_hu``, ``max_hu``]."""
    import SimpleITK as sitk

    image = read_image(Path(path), padding_hu)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    refuse_non_finite(Path(path), hu, "the HU of air outside the body (e.g. -1024)")
    air, tissue = (float(np.mean((hu >= lo) & (hu <= hi))) if hu.size else 0.0 for lo, hi in (HU_AIR, HU_TISSUE))
    if min(air, tissue) < HU_MIN_FRACTION:  # e.g. stored values (HU + 1024) as exported, or the rescale done twice
        span = f"{hu.min():.0f} to {hu.max():.0f}" if hu.size else "none"
        raise ImageError(
            f"{path}: {air:.1%} of the voxels at air or lung HU {HU_AIR}, {tissue:.1%} at soft tissue {HU_TISSUE} "
            f"(values {span}): not a chest CT in Hounsfield units (each holds far more); export it in HU, the rescale "
            "slope and intercept applied once"
        )
    if hu.shape[0] < 2:
        raise ImageError(f"{path}: {hu.shape[0]} axial slice(s) of {hu.shape[1]} x {hu.shape[2]}; a CT must be a "
                         "volume of at least 2 slices (one has no slice spacing): give the whole series")  # fmt: skip
    np.clip(hu, padding_hu, max_hu, out=hu)
    sx, sy, sz = image.GetSpacing()
    x0, y0, z0 = image.GetOrigin()
    return DicomSeries(
        hu=hu,
        z_positions=z0 + sz * np.arange(hu.shape[0], dtype=np.float64),
        pixel_spacing=(float(sy), float(sx)),
        origin_xy=(float(x0), float(y0)),
        series_uid=f"{Path(path).name}",
        directory=Path(path),
    )


def sitk_grid(series: DicomSeries) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """SimpleITK (x, y, z) spacing and origin of a series with regular slices (else :class:`ImageError`)."""
    dz = np.diff(series.z_positions)
    if dz.size and not np.allclose(dz, dz[0], atol=1e-3):
        raise ImageError(f"{series.directory}: irregular slice spacing; a volume file needs regular slices")
    spacing = (series.pixel_spacing[1], series.pixel_spacing[0], float(dz[0]) if dz.size else 1.0)
    return spacing, (*series.origin_xy, float(series.z_positions[0]))


def write_image(path: Path, array: np.ndarray, series: DicomSeries) -> None:
    """Write ``array`` [Z, Y, X] on the grid of ``series`` (regular slices) to ``path`` in the format its suffix
    names (NIfTI, NRRD, MHA, MHD or NHDR + raw), atomically (a temporary name of the same format, then renamed)."""
    import SimpleITK as sitk

    spacing, origin = sitk_grid(series)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path = Path(path)
    suffix = next((s for s in SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ImageError(f"{path}: unknown volume format; use one of {', '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.{os.getpid()}.tmp{suffix}")
    raw = tmp.with_suffix(".raw")  # a detached header's data file (.mhd, .nhdr)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=suffix in (".nii.gz", ".nrrd", ".mha"))
        if suffix in (".mhd", ".nhdr"):  # the header names its data file: keep the pair's names consistent
            header = tmp.read_text().replace(raw.name, path.with_suffix(".raw").name)
            os.replace(raw, path.with_suffix(".raw"))
            tmp.write_text(header)
        os.replace(tmp, path)
    finally:
        for left in (tmp, raw):
            left.unlink(missing_ok=True)
