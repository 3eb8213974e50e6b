"""Reading an axial CT series of DICOM files into HU (LIDC-IDRI's downloads and the demo's phantoms): its folder
under a patient's, the slices sorted by position, rescaled to HU with the padding masked; and the check of the slice
geometry of a series that ``data.source: images`` reads through SimpleITK (any orientation)."""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DicomError, ImageError
from ..io import safe_component

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomSeries:
    """An axial CT series in HU, slices sorted by ascending z."""

    hu: np.ndarray  # float32 [Z, Y, X]
    z_positions: np.ndarray  # [Z] mm, ascending
    pixel_spacing: tuple[float, float]  # (row, column) mm
    origin_xy: tuple[float, float]  # LPS (x, y) of pixel [0, 0]
    series_uid: str
    directory: Path


def find_series_dir(patient_dir: Path, series_uid: str) -> Path:
    """Find the folder under ``patient_dir`` whose DICOM files belong to ``series_uid`` (any folder layout)."""
    import pydicom

    if not patient_dir.is_dir():
        raise DicomError(
            f"{patient_dir}: patient folder not found",
            "put the TCIA LIDC-IDRI download under data.dicom_root (<root>/<patient id>/...) or remove the patient "
            "from data.cases",
        )
    fast = [d for d in patient_dir.rglob(glob.escape(safe_component(series_uid, "SeriesInstanceUID"))) if d.is_dir()]
    if fast and dicom_files(fast[0]):  # a folder named by the UID without *.dcm files: the search below says why
        return fast[0]

    def uid(path: Path) -> str | None:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        except Exception:  # unreadable, or no such tag: not this series' file
            return None

    for folder in sorted({p.parent for p in dicom_files(patient_dir, recursive=True)}):
        # the folder where any file (headers only; a few may be unreadable) is the series': one that mixes series (a
        # flattened download) too, so that reading it names the mix
        if any(uid(f) == series_uid for f in dicom_files(folder)):
            return folder
    unread = (p for p in patient_dir.rglob("*") if p.is_file() and p.suffix != ".dcm" and not p.name.startswith("."))
    others = sorted(str(p.relative_to(patient_dir)) for p in unread if p.suffix.lower() in (".dcm", ".zip", ""))
    hint = f"; files not read (only *.dcm files are, unpacked): {others[:5]}" if others else ""
    raise DicomError(
        f"{patient_dir}: no DICOM series with SeriesInstanceUID {series_uid}{hint}",
        f"{'rename or unpack them, or, if the download is incomplete, ' if hint else ''}re-download this patient "
        "from TCIA",
    )


SLICE_TAGS = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
RESCALE_TAGS = ("RescaleSlope", "RescaleIntercept")
XY_DRIFT_MM = 0.01  # slices whose x/y positions differ more are a sheared (gantry-tilted) stack


def same_bits(value: int, dtype: np.dtype) -> int | None:
    """The stored value whose bits ``value`` has in the integer pixel ``dtype`` (any byte order): -2000 in uint16 is
    63536, 63536 in int16 is -2000; None where it fits neither signedness of those bits (it matches no pixel)."""
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        return value
    bits = dt.itemsize * 8
    if not -(1 << (bits - 1)) <= value < 1 << bits:
        return None
    stored = value % (1 << bits)
    return stored - (1 << bits) if dt.kind == "i" and stored >= 1 << (bits - 1) else stored


def padding_value(value: int, dtype: np.dtype, bits_stored: int | None) -> tuple[int | None, bool]:
    """(the value readers give PixelPaddingValue ``value``'s pixels of ``dtype``, kept to ``bits_stored`` bits as
    pydicom and GDCM keep them (:func:`same_bits`), whether it lay beyond them): 63536 in 12 unsigned bits reads
    2096 (+1072 HU), a value tissue may hold, so it is padding only where it joins the edge (:func:`edge_joined`)."""
    stored = same_bits(value, dtype)
    width = np.dtype(dtype).itemsize * 8
    if stored is None or not bits_stored or bits_stored >= width or np.dtype(dtype).kind not in "iu":
        return stored, False
    low = stored % (1 << bits_stored)
    low = low - (1 << bits_stored) if np.dtype(dtype).kind == "i" and low >= 1 << (bits_stored - 1) else low
    return low, low != stored


def edge_joined(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` [H, W] in 4-connected components touching the slice's edge (outside the field of view)."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def dicom_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The ``*.dcm`` files of ``folder`` (and below, outside hidden folders, if ``recursive``), sorted, without hidden
    ones: macOS writes ``._<name>.dcm`` beside each file copied to a FAT or network drive (pylidc skips them too)."""
    found = Path(folder).rglob("*.dcm") if recursive else Path(folder).glob("*.dcm")
    return sorted(p for p in found if not any(c.startswith(".") for c in p.relative_to(folder).parts))


def _slice_order(directory: Path, files: list[Path], slices: list[Any]) -> tuple[list[int], np.ndarray]:
    """The slices to stack, by ascending z, and their z (mm). Of slices at the same z (within 1 um) the one with the
    lowest InstanceNumber is kept, as pylidc keeps (its slice positions, and so the annotations' slice indices, count
    each z once); the others are named in a warning. Without InstanceNumbers to choose by, :class:`DicomError`."""
    z = [float(ds.ImagePositionPatient[2]) for ds, _ in slices]
    groups: list[list[int]] = []
    for i in sorted(range(len(z)), key=z.__getitem__):  # runs of positions less than 1 um apart
        if groups and z[i] - z[groups[-1][-1]] < 1e-3:
            groups[-1].append(i)
        else:
            groups.append([i])
    order, dropped = [], []
    for members in groups:
        if len(members) > 1:
            names = " and ".join(files[i].name for i in members)
            try:
                ranked = sorted((int(slices[i][0].InstanceNumber), files[i].name, i) for i in members)
            except (AttributeError, TypeError, ValueError) as exc:
                raise DicomError(f"{directory}: {names}: same slice position z={z[members[0]]} and no InstanceNumber "
                                 f"to choose by ({exc})", "remove the duplicate file") from exc  # fmt: skip
            members = [ranked[0][2]]
            dropped += [i for *_, i in ranked[1:]]
        order.append(members[0])
    if dropped:
        log.warning("%s: %d slice(s) at the z of another slice left out, keeping the lower InstanceNumber as pylidc "
                    "does: %s", directory, len(dropped), ", ".join(files[i].name for i in sorted(dropped)))  # fmt: skip
    return order, np.asarray([z[i] for i in order])


def read_dicom_series(directory: Path, padding_hu: float = -1024.0, max_hu: float = 3071.0) -> DicomSeries:
    """Read every ``*.dcm`` of one axial CT series -> HU volume; padding outside the field of view -> ``padding_hu``.

    Refuses (naming the file): an empty folder, unreadable files, a slice without the tags that place it, several
    series mixed in one folder, a non-axial slice, inconsistent pixel spacing or size; warns of slices whose x/y
    move (a gantry tilt), stacked as pylidc stacks them. Of two slices at one position the one with the lower
    InstanceNumber is kept, as pylidc does (a warning names the other).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = dicom_files(directory)
    if not files:
        raise DicomError(f"{directory}: no *.dcm files", "check data.dicom_root or re-download the series")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
        except (InvalidDicomError, AttributeError, ValueError, OSError, KeyError) as exc:
            raise DicomError(f"{f}: corrupt or incomplete DICOM file ({exc})", "re-download this series") from exc
        except (RuntimeError, NotImplementedError) as exc:  # pydicom: no decoder (plugin) could decode the pixels
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", syntax)
            raise DicomError(
                f"{f}: its pixel data ({name}) cannot be decoded ({str(exc).splitlines()[0]})",
                "re-download this series, or install a pydicom decoder for that transfer syntax (pylibjpeg, "
                "python-gdcm)",
            ) from exc
        missing = [tag for tag in SLICE_TAGS if getattr(ds, tag, None) in (None, "")]
        if missing:
            raise DicomError(f"{f}: no {', '.join(missing)} (needed to place the slice)", "re-download this series")
        unmapped = [tag for tag in RESCALE_TAGS if getattr(ds, tag, None) in (None, "")]
        if unmapped:  # required in a CT image: without them stored values are not HU (unsigned air would be +1024)
            raise DicomError(
                f"{f}: no {', '.join(unmapped)} (maps its stored values to HU; required in CT images)",
                "re-download this series or re-export it with them",
            )
        slices.append((ds, pixels))
    uids = {ds.SeriesInstanceUID for ds, _ in slices}
    if len(uids) > 1:
        counts = {u: [f.name for f, (d, _) in zip(files, slices) if d.SeriesInstanceUID == u][:3] for u in uids}
        raise DicomError(f"{directory}: files of {len(uids)} series are mixed ({counts})", "keep one series per folder")
    ref = slices[0][0]
    spacing = tuple(float(v) for v in ref.PixelSpacing)
    shape = (int(ref.Rows), int(ref.Columns))
    for f, (ds, _) in zip(files, slices):
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(orientation, [1, 0, 0, 0, 1, 0], atol=1e-3):
            raise DicomError(
                f"{f}: ImageOrientationPatient {orientation.tolist()} is not [1, 0, 0, 0, 1, 0] (axial, rows along "
                "+x, columns along +y), which data.source lidc reads",
                "a flipped series reads as a volume through data.source: images (reoriented there), an oblique one "
                "after resampling it onto axial",
            )
        if tuple(float(v) for v in ds.PixelSpacing) != spacing or (int(ds.Rows), int(ds.Columns)) != shape:
            raise DicomError(f"{f}: pixel spacing or size differs from {files[0].name}", "keep one series per folder")
    order, z = _slice_order(directory, files, slices)
    first = slices[order[0]][0]  # the lowest slice: the volume's origin
    xy = np.asarray([[float(v) for v in slices[k][0].ImagePositionPatient[:2]] for k in order])
    drift = float(np.abs(xy - xy[0]).max())
    if drift > XY_DRIFT_MM:  # a gantry tilt: stacked unsheared, as pylidc stacks it (its contours are per slice)
        log.warning("%s: the slices' x/y positions move by up to %.2f mm (gantry tilt?); stacked as if axial, as "
                    "pylidc does, so the annotations stay on their pixels, but world positions are off by up to that",
                    directory, drift)  # fmt: skip
    hu = np.empty((len(order), *shape), dtype=np.float32)
    for out_k, k in enumerate(order):
        ds, pixels = slices[k]
        raw = pixels.astype(np.float32)
        pad = getattr(ds, "PixelPaddingValue", None)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        values = raw * slope + intercept
        try:  # matched by its bits: a file may write it in the other signedness (SS -2000 = US 63536)
            bits = getattr(ds, "BitsStored", None)
            stored, beyond = (None, False) if pad is None else padding_value(int(pad), pixels.dtype, bits)
        except (TypeError, ValueError) as exc:
            raise DicomError(f"{files[k]}: PixelPaddingValue {pad!r} is not one whole number",
                             "re-export the series with a valid one, or without it") from exc  # fmt: skip
        if stored is not None:
            values[edge_joined(pixels == stored) if beyond else pixels == stored] = padding_hu
        hu[out_k] = values
    np.clip(hu, padding_hu, max_hu, out=hu)
    x0, y0 = (float(v) for v in first.ImagePositionPatient[:2])
    return DicomSeries(
        hu=hu,
        z_positions=z,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        origin_xy=(x0, y0),
        series_uid=str(ref.SeriesInstanceUID),
        directory=directory,
    )


SLICE_TAG_NAMES = {"0020|0032": "ImagePositionPatient", "0020|0037": "ImageOrientationPatient",
                   "0028|0030": "PixelSpacing"}  # fmt: skip


def slice_geometry(reader: Any, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each slice's ImagePositionPatient [n, 3], ImageOrientationPatient [n, 6] (axial where absent) and
    PixelSpacing [n, 2] of a series that SimpleITK's ``reader`` read with its per-slice headers from the files
    ``names`` (``data.source: images``)."""

    def floats(i: int, tag: str) -> list[float]:
        if reader.HasMetaDataKey(i, tag):
            return [float(v) for v in reader.GetMetaData(i, tag).split("\\")]
        if tag == "0020|0037":
            return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # axial
        raise ImageError(
            f"{names[i]}: no {SLICE_TAG_NAMES[tag]} (needed for the slice's geometry); re-export the series"
        )

    n = len(names)
    positions = np.array([floats(i, "0020|0032") for i in range(n)], dtype=np.float64)
    orientations = np.array([floats(i, "0020|0037") for i in range(n)], dtype=np.float64)
    spacings = np.array([floats(i, "0028|0030") for i in range(n)], dtype=np.float64)
    return positions, orientations, spacings


def mask_padding(image: Any, reader: Any, names: Sequence[str], padding_hu: float) -> Any:
    """``image`` (SimpleITK, float HU [Z, Y, X] in the order of ``names``, as ``reader`` read it with its per-slice
    headers) with each slice's PixelPaddingValue voxels set to ``padding_hu``, as :func:`read_dicom_series` does
    (matched by its bits: a file may write it in the other signedness, SS -2000 = US 63536); SimpleITK rescales
    padding as HU (unsigned 63536 at intercept -1024: a 62512 HU border round the field of view)."""
    import SimpleITK as sitk

    def tag(i: int, key: str, default: str | None) -> str | None:
        return reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else default

    hu = None
    for i, name in enumerate(names):
        if (pad := tag(i, "0028|0120", None)) in (None, ""):
            continue
        signed, bits = tag(i, "0028|0103", "0") == "1", int(tag(i, "0028|0100", "16") or 16)
        try:
            dtype = np.dtype(f"{'i' if signed else 'u'}{max(bits // 8, 1)}")
            stored, beyond = padding_value(int(float(pad)), dtype, int(tag(i, "0028|0101", "0") or 0) or None)
            slope, intercept = (float(tag(i, k, d) or d) for k, d in (("0028|1053", "1"), ("0028|1052", "0")))
        except (TypeError, ValueError) as exc:
            raise ImageError(f"{name}: PixelPaddingValue {pad!r} or its rescale is not a number; re-export the series "
                             "with valid ones, or without PixelPaddingValue") from exc  # fmt: skip
        if stored is None:
            continue
        hu = sitk.GetArrayFromImage(image) if hu is None else hu
        # stored values are whole numbers, so rescaled ones lie |slope| apart: half of that matches the padding alone
        match = np.abs(hu[i] - (stored * slope + intercept)) <= abs(slope) / 2
        hu[i][edge_joined(match) if beyond else match] = padding_hu
    if hu is None:
        return image
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(image)
    return out


HEADER_TOLERANCE = 1e-4  # orientation cosines and pixel spacings (mm) of one series' slices agree to this
TILT_MAX_PIXELS = 0.1  # in-plane drift of the slice positions, in pixels, below which a stack counts as unsheared
# slice positions, as fractions of the slice step: a gap off the usual one by more is a missing or irregular slice;
# a slice off the evenly spaced stack SimpleITK builds ((last - first) / (n - 1) apart) by more is misplaced. Loose
# enough for positions stored with few decimals (DICOM's DS: 0.625 mm slices at 0.1 mm are 0.6 / 0.7 mm apart),
# and never below POSITION_ROUNDING_MM (positions written at one decimal: up to 0.05 mm off at either end)
GAP_TOLERANCE = 0.25
STACK_TOLERANCE = 0.1
POSITION_ROUNDING_MM = 0.1


def check_slice_geometry(
    folder: Path, names: Sequence[str], positions: np.ndarray, orientations: np.ndarray, spacings: np.ndarray
) -> None:
    """Refuse a series (:func:`slice_geometry`) that SimpleITK would stack wrongly from its first slice's header:
    slices of another orientation or pixel spacing (mirrored or stretched silently), slices whose in-plane
    positions drift (a gantry tilt: stacked unsheared at the slanted distance between slices), and the slice
    positions :func:`check_slice_positions` refuses."""
    for values, tag in ((orientations, "ImageOrientationPatient"), (spacings, "PixelSpacing")):
        odd = np.flatnonzero(np.abs(values - values[0]).max(axis=1) > HEADER_TOLERANCE)
        if odd.size:
            raise ImageError(
                f"{names[odd[0]]}: {tag} {values[odd[0]].round(4).tolist()} differs from that of {names[0]}, "
                f"{values[0].round(4).tolist()} ({odd.size} of {len(names)} slices): one series must have one; keep "
                "one series per folder, or re-export it"
            )
    cosines = orientations[0]
    rel = positions - positions[0]
    in_plane = float(np.abs(rel @ np.stack([cosines[:3], cosines[3:6]]).T).max()) if len(rel) else 0.0
    if in_plane > max(XY_DRIFT_MM, TILT_MAX_PIXELS * float(spacings[0].min())):
        normal = np.cross(cosines[:3], cosines[3:6])
        extent = float(np.ptp(rel @ normal)) or 1.0
        raise ImageError(
            f"{folder}: the slices' in-plane positions move by up to {in_plane:.2f} mm over the stack (a gantry tilt "
            f"of about {np.degrees(np.arctan(in_plane / extent)):.1f} degrees), which would be stacked unsheared at "
            "the slanted distance between slices; correct the tilt first (dcm2niix writes a tilt-corrected volume, "
            "*_Tilt_1.nii) and give that volume instead"
        )
    check_slice_positions(folder, positions, cosines)


def series_count_error(path: Path, count: int) -> ImageError:
    """The error for a case folder holding ``count`` != 1 DICOM series; with none, it names the subfolders that hold
    one (a series one folder too deep, as PACS exports nest them)."""
    import SimpleITK as sitk

    def holds_series(folder: Path) -> bool:
        try:
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        except RuntimeError:  # an unreadable subfolder: not named, and the count's message kept
            return False

    deeper = [] if count else [d.name for d in sorted(path.iterdir()) if d.is_dir() and holds_series(d)]
    where = (f" (found one level down, in {', '.join(deeper[:5])}: move each series folder directly into "
             "data.images.ct_dir, named by its case)") if deeper else ""  # fmt: skip
    return ImageError(f"{path}: {count} DICOM series in this folder{where}; keep exactly one series per subfolder")


def check_slice_positions(folder: Path, positions: np.ndarray, orientation: Sequence[float]) -> None:
    """Refuse a DICOM series whose slices (ImagePositionPatient [n, 3]) are not evenly spaced along the slice normal
    (row x column cosines of ImageOrientationPatient): a missing slice of an axial, coronal or sagittal series, or
    two slices at one position, or gaps that drift from one another. SimpleITK would stack them at one spacing and
    shift everything past the gap. Positions rounded to a few decimals pass (``GAP_TOLERANCE``, ``STACK_TOLERANCE``)."""
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:6])
    if np.linalg.norm(normal) < 1e-6:
        raise ImageError(
            f"{folder}: ImageOrientationPatient {cosines.round(4).tolist()} has parallel row and column cosines; "
            "re-export the series with a valid orientation"
        )
    along = np.sort(np.asarray(positions, dtype=np.float64).reshape(-1, 3) @ (normal / np.linalg.norm(normal)))
    gaps = np.diff(along)
    step = float(np.median(gaps)) if gaps.size else 0.0
    tolerance = max(1e-3, 0.01 * step)
    same = np.flatnonzero(gaps <= tolerance)
    if same.size:
        raise ImageError(
            f"{folder}: {same.size} slice(s) at the position of another (first at {along[same[0]]:.2f} mm along the "
            "slice normal): two series, or one exported twice, in one folder; keep one copy of each slice"
        )

    def allowed(fraction: float) -> float:  # the rounding floor capped at half a step: a missing slice (a gap off
        return min(0.5 * step, max(POSITION_ROUNDING_MM, fraction * step)) + 1e-6  # by a whole step) is always seen

    odd = np.flatnonzero(np.abs(gaps - step) > allowed(GAP_TOLERANCE))
    if gaps.size >= 2 and not odd.size:  # each gap near the usual one, yet they may add up to a drift
        stacked = along[0] + np.arange(along.size) * (along[-1] - along[0]) / (along.size - 1)
        off = np.abs(along - stacked)
        if off.max() > allowed(STACK_TOLERANCE):
            worst = int(np.argmax(off))
            raise ImageError(
                f"{folder}: slice positions drift from an even spacing (the slice at {along[worst]:.2f} mm along the "
                f"slice normal would be stacked {off[worst]:.2f} mm away: the gaps change along the series); "
                "re-export the series with regular slices, or resample it and give it as a volume file"
            )
    if gaps.size >= 2 and odd.size:
        where = ", ".join(f"{along[i]:.2f} to {along[i + 1]:.2f} mm" for i in odd[:3])
        axis = "" if abs(normal[2]) > 0.99 else f" along the slice normal {(normal.round(3) + 0.0).tolist()}"
        raise ImageError(
            f"{folder}: slices are not evenly spaced{axis} ({odd.size} gap(s) unlike the usual {step:.3g} mm: "
            f"{where}); slices are missing or the series is irregular. Re-export the complete series, or resample it "
            "onto regular slices and give it as a volume file"
        )
