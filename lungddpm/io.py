"""The only module that touches file formats: NIfTI volumes with their true affine, JSON, CSV (written through
:mod:`lungddpm.atomic`).

Arrays in memory are numpy ``[Z, Y, X]`` (slices first). A :class:`Geometry` holds the spacing ``(z, y, x)`` in
mm, the LPS world position ``(x, y, z)`` of voxel ``[0, 0, 0]`` and the direction cosines (SimpleITK's
convention: a row-major 3x3 matrix whose columns are the world directions of the x, y and z index axes).
On disk, SimpleITK converts this to a NIfTI RAS affine, so any NIfTI reader sees the true orientation.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import LungDDPMError

log = logging.getLogger(__name__)

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a ``[Z, Y, X]`` array in LPS world coordinates (mm)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION

    def index_to_world(self, index_zyx: np.ndarray) -> np.ndarray:
        """index_zyx: [N, 3] (z, y, x) voxel indices -> [N, 3] LPS (x, y, z) mm."""
        idx = np.asarray(index_zyx, dtype=np.float64).reshape(-1, 3)[:, ::-1]  # -> (x, y, z)
        scaled = idx * np.asarray(self.spacing[::-1])
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        return scaled @ d.T + np.asarray(self.origin)

    def world_to_index(self, world_xyz: np.ndarray) -> np.ndarray:
        """world_xyz: [N, 3] LPS (x, y, z) mm -> [N, 3] fractional (z, y, x) indices."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        rel = (np.asarray(world_xyz, dtype=np.float64).reshape(-1, 3) - np.asarray(self.origin)) @ d
        return (rel / np.asarray(self.spacing[::-1]))[:, ::-1]

    def same_grid(self, other: Geometry) -> bool:
        """Same spacing (1e-4 mm), origin (1e-3 mm) and direction (1e-5) as ``other``."""
        return (
            np.allclose(self.spacing, other.spacing, atol=1e-4)
            and np.allclose(self.origin, other.origin, atol=1e-3)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def to_json(self) -> dict[str, list[float]]:
        return {
            "spacing_zyx_mm": list(self.spacing),
            "origin_lps_xyz_mm": list(self.origin),
            "direction": list(self.direction),
        }


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header line, as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    digits: int = 6,
) -> None:
    """Rows of dicts → CSV, atomically. ``columns`` default to the union of the rows' keys in first-seen order;
    floats are written with ``digits`` significant digits (17: exactly, for a table read back into statistics) and
    NaN, or a column a row lacks, as an empty cell. A row key that is not a column is an error (a misspelt key would
    vanish from the table)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if extra := sorted({str(k) for r in rows for k in r} - set(columns)):
        raise ValueError(f"{path}: row keys {extra} are not columns of the table ({', '.join(columns)})")

    def cell(v: Any) -> Any:
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else f"{v:.{digits}g}"
        return v

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: cell(r.get(k)) for k in columns})


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def files_sha256(paths: Sequence[str | os.PathLike[str]]) -> str:
    """One SHA-256 of several files: of their names and :func:`file_sha256` digests, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def zip_damage(path: str | os.PathLike[str], expect_zip: bool = False) -> str | None:
    """What is wrong with the zip archive ``path`` (a torch checkpoint since torch 1.6): cut short, a broken
    directory, or the first member whose bytes fail their CRC-32; None where every member checks, or the file is no
    zip and ``expect_zip`` is False (torch's legacy format carries no checksum). torch itself reads a member without
    its CRC, so a flipped bit in the weights would load as other weights."""
    import zipfile

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":  # a zip's first member, but no directory at its end
            return "it is cut short (a zip archive without its directory at the end)"
        return f"it is not a zip archive ({f'starts {head!r}' if head else 'empty'})" if expect_zip else None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as exc:  # a cut or mangled archive
        return f"its zip structure is broken ({type(exc).__name__}: {exc})"
    return None if bad is None else f"its member {bad} fails its CRC-32 check"


class VolumeReadError(LungDDPMError):
    """A NIfTI file that cannot be read."""


class UnsafePathError(LungDDPMError):
    """A case id, run or model name that would put a file outside its folder."""


_UNSAFE = re.compile(r"[/\\\x00]")


def safe_component(name: str, what: str) -> str:
    """``name`` if it is one plain path component (no separator, not ``.``/``..``, no leading dot); else raise
    :class:`UnsafePathError`, so that ids from config, command line or DICOM cannot escape the results tree."""
    if not isinstance(name, str) or not name or name.startswith(".") or _UNSAFE.search(name):
        raise UnsafePathError(
            f"{what} {name!r}: not a plain file name (path separators, '..' and leading dots are refused so that "
            "no output lands outside results/); fix the id in the config or on the command line"
        )
    return name


def write_volume(path: str | os.PathLike[str], array: np.ndarray, geometry: Geometry) -> None:
    """Write ``array`` ``[Z, Y, X]`` as compressed NIfTI with the affine of ``geometry``, atomically."""
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a [Z, Y, X] array, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in geometry.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in geometry.origin))
    image.SetDirection(tuple(float(d) for d in geometry.direction))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        short = nifti_truncation(Path(tmp), no_header="no whole NIfTI header")
        if short is not None:  # the writer does not raise when the disk fills
            disk = os.statvfs(Path(tmp).parent)
            if disk.f_bavail * disk.f_frsize < DISK_NEARLY_FULL:  # said as DiskFullError, the old file kept
                raise OSError(errno.ENOSPC, f"the NIfTI writer stopped short: {short}")
            raise LungDDPMError(f"{path}: the NIfTI writer stopped short ({short}); check the disk and rerun")


DISK_NEARLY_FULL = 1 << 20  # bytes free below which a NIfTI write that stopped short is taken as a full disk


def _nifti_header(path: Path) -> Any | None:
    """``path``'s NIfTI-1 or -2 header, read by content as SimpleITK reads it (gzip or plain, whatever the name
    says; nibabel goes by the name, and a plain file named .nii.gz read as none), or None where there is none."""
    import gzip

    import nibabel as nib

    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    for kind in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with gzip.open(path, "rb") if gz else open(path, "rb") as fh:
                return kind.from_fileobj(fh)
        except Exception:  # not this kind of header (or none)
            continue
    return None


def nifti_truncation(path: Path, no_header: str | None = None) -> str | None:
    """Why a ``.nii`` / ``.nii.gz`` file holds fewer voxel bytes than its header promises (a cut copy or download,
    which SimpleITK reads without a word, the missing voxels 0), or None when it is whole; ``no_header`` where it
    holds no NIfTI-1 or -2 header that nibabel reads (a file of ours cut inside its header; None: not NIfTI, nothing to
    compare). A gzip stream whose trailer gives the promised size is taken as whole (the cheap case); any
    other is decompressed up to that size (trailing bytes after it, or several gzip members, are fine)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import gzip
    import zlib

    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"  # by content: SimpleITK reads a plain file named .nii.gz too
    try:
        header = _nifti_header(path)
        voxels = int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        expected = int(header.get_data_offset()) + voxels
    except Exception:  # not a NIfTI header nibabel reads (None has no shape): nothing to compare with
        return no_header
    if not gz:
        got = path.stat().st_size
        return f"{got} of the {expected} bytes its header promises" if got < expected else None
    with open(path, "rb") as raw:
        raw.seek(max(path.stat().st_size - 4, 0))
        if int.from_bytes(raw.read(4), "little") == expected % 2**32:  # the gzip trailer's uncompressed size
            return None
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            while got < expected and (chunk := fh.read(min(1 << 16, expected - got))):
                got += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        if got < expected:
            return f"its gzip stream ends after about {got} of the {expected} bytes its header promises ({exc})"
    return f"{got} of the {expected} bytes its header promises" if got < expected else None


def nifti_non_finite(path: Path) -> int:
    """NaN or infinite voxels of a float NIfTI file (SimpleITK's reader turns NaN into 0 without a word); 0
    otherwise."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return 0
    import gzip

    import nibabel as nib

    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"  # by content, as SimpleITK reads it (nibabel goes by the name)
    try:
        if gz == path.name.lower().endswith(".gz"):
            img = nib.load(str(path))  # memory-mapped where it can be
        else:  # plain bytes named .nii.gz, or gzip named .nii
            with gzip.open(path, "rb") if gz else open(path, "rb") as fh:
                img = nib.Nifti1Image.from_bytes(fh.read())
    except Exception:  # not NIfTI-1 that nibabel reads: nothing to count
        return 0
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        return 0
    return int((~np.isfinite(np.asanyarray(img.dataobj))).sum())


def nifti_forms(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A NIfTI file's qform and sform affines (RAS, 4 x 4) where both are set and differ beyond 0.01 mm (or 1e-4 in
    the direction cosines times spacing); None otherwise. SimpleITK then chooses one of them without a word (the
    qform where the sform is not orthonormal, by ITK's rules), nibabel the sform."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    if (header := _nifti_header(path)) is None:  # not a NIfTI header nibabel reads: nothing to compare
        return None
    (qform, qcode), (sform, scode) = header.get_qform(coded=True), header.get_sform(coded=True)
    if not (qcode and scode) or qform is None or sform is None:
        return None
    same = np.allclose(qform[:3, :3], sform[:3, :3], atol=1e-4) and np.allclose(qform[:3, 3], sform[:3, 3], atol=1e-2)
    return None if same else (qform, sform)


def unoriented(path: Path) -> str | None:
    """Why a volume file's header gives no orientation (a NIfTI file with qform_code and sform_code 0, an NRRD file
    without a ``space`` field), which SimpleITK reads as LPS without a word, mirroring a volume stored otherwise; None
    when it gives one, or for another format."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        if (header := _nifti_header(path)) is None:  # not a NIfTI header nibabel reads: SimpleITK's error says so
            return None
        return None if header["qform_code"] or header["sform_code"] else "no orientation (qform_code and sform_code 0)"
    if name.endswith((".nrrd", ".nhdr")):
        fields = set()
        with open(path, "rb") as f:  # the header: the lines before the first empty one
            for line in itertools.islice(iter(f.readline, b""), 1000):
                if not line.strip():
                    break
                fields.add(line.split(b":")[0].strip().lower())
        return None if b"space" in fields else "no space field (no orientation)"
    return None


def volume_header_problem(path: Path) -> str | None:
    """What makes a volume file unusable before its voxels are read (:func:`nifti_truncation`, :func:`unoriented`),
    with the fix; None when nothing does."""
    if cut := nifti_truncation(path):
        return f"truncated: {cut}; copy or export the volume again"
    if missing := unoriented(path):
        return (f"{missing}: left and right are unknown (it would be read as LPS); write it again with its true "
                "affine (nibabel: img.set_sform(affine, code=1); NRRD: a space field)")  # fmt: skip
    return None


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI file -> (array ``[Z, Y, X]``, geometry)."""
    p = Path(path)
    image = _read_image(p, sitk.ReadImage)
    cut = nifti_truncation(p)
    if cut:
        raise VolumeReadError(f"{p}: truncated: {cut}; delete it and rerun its stage (or copy it again)")
    return sitk.GetArrayFromImage(image), _geometry(image)


def read_header(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], Geometry]:
    """A NIfTI file's grid, from its header alone -> (shape (z, y, x), geometry); errors as :func:`read_volume`."""

    def information(name: str) -> sitk.ImageFileReader:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        return reader

    reader = _read_image(Path(path), information)
    return tuple(int(n) for n in reader.GetSize()[::-1]), _geometry(reader)  # type: ignore[return-value]


def _read_image(p: Path, read: Any) -> Any:
    """``read(str(p))`` (an image or a reader of its header), checked to be one 3-D scalar volume."""
    if not p.is_file():
        raise VolumeReadError(f"{p}: no such file; run the stage that produces it first")
    try:
        image = read(str(p))
    except RuntimeError as exc:
        raise VolumeReadError(f"{p}: not a readable NIfTI volume ({exc}); delete it and rerun its stage") from exc
    per_voxel = (
        image.GetNumberOfComponentsPerPixel() if isinstance(image, sitk.Image) else image.GetNumberOfComponents()
    )
    if image.GetDimension() != 3 or per_voxel != 1:
        raise VolumeReadError(f"{p}: a {image.GetDimension()}-D image of {per_voxel} value(s) per voxel, not a 3-D "
                              "volume; give a 3-D scalar volume")  # fmt: skip
    return image


def _geometry(image: Any) -> Geometry:
    """The geometry of a SimpleITK image or header reader (spacing reversed to (z, y, x); origin LPS (x, y, z))."""
    return Geometry(
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in image.GetDirection()),
    )


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise LungDDPMError(f"{p}: no such file; run the stage that produces it first") from exc
    except json.JSONDecodeError as exc:
        raise LungDDPMError(f"{p}: invalid JSON ({exc}); delete it and rerun its stage") from exc


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
