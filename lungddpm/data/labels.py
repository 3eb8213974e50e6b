"""Label maps of ``data.source: images``: checked when the workflow is parsed (their values, and their grid against
the CT's header alone), and read on their CT's grid when a case is preprocessed.

Label conventions: ``lung_nodule`` (Lung-DDPM's 0 background, 1 lung, 2 nodule) or ``binary`` (0, 1 = nodule).
The lungs come from the label map when it has lung voxels, otherwise from lungddpm's lung mask; nodules are the
connected components of the nodule label (their texture, malignancy and readers are unknown).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ..io import nifti_forms, volume_header_problem
from .cache import cached, store
from .dicom import DicomSeries, series_count_error
from .images import (
    IMAGE_IOS,
    ORIENTATION_TOLERANCE,
    ImageCase,
    check_series_files,
    oblique_error,
    read_ct,
    read_image,
    refuse_forms,
    refuse_non_finite,
    refuse_shape,
    sitk_grid,
)
from .nodules import Nodule, components, lung_like

log = logging.getLogger(__name__)

MAX_NODULES = 255  # nodule indices are stored as uint8 on the model grid
CONVENTIONS = {"lung_nodule": {"lung": 1, "nodule": 2}, "binary": {"lung": None, "nodule": 1}}
SPACING_RTOL = 1e-3  # a label map's voxel size may differ from its CT's by this fraction
ORIGIN_TOLERANCE = 0.1  # ... and its first voxel lie this many of the CT's smallest voxel sizes away


@dataclass(frozen=True)
class ImageScan:
    """A CT read from an image folder, as an axial series, with what its label map says."""

    series: DicomSeries
    lung: np.ndarray | None  # bool [Z, Y, X] on the CT's grid, when the label map has lung voxels
    nodules: list[Nodule]


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid in SimpleITK's terms: (x, y, z) size, spacing (mm) and origin (mm, LPS), and the
    direction (3 x 3 row-major; column i is axis i's direction)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...] = tuple(np.eye(3).ravel())

    def lps(self) -> Grid | None:
        """The grid ``DICOMOrient(image, "LPS")`` makes of it (axes along L, P, S, the origin at the new first
        voxel); None when it is oblique, as :func:`~lungddpm.data.images.read_image` judges it (refused)."""
        d = np.asarray(self.direction, np.float64).reshape(3, 3)
        axis = np.abs(d).argmax(axis=1)  # for each of L, P, S, the stored axis nearest to it
        flip = np.sign(d[[0, 1, 2], axis])
        if sorted(axis) != [0, 1, 2] or not np.allclose(d[:, axis] * flip, np.eye(3), atol=ORIENTATION_TOLERANCE):
            return None
        origin = np.asarray(self.origin, np.float64)
        for j, i in enumerate(axis):
            if flip[j] < 0:  # stored against L, P or S: the first voxel becomes the far one
                origin = origin + d[:, i] * self.spacing[i] * (self.size[i] - 1)
        return Grid(tuple(self.size[i] for i in axis), tuple(self.spacing[i] for i in axis), tuple(origin.tolist()))

    def __str__(self) -> str:
        spacing, origin = (np.round(v, 4).tolist() for v in (self.spacing, self.origin))
        return f"{' x '.join(map(str, self.size))} voxels of {spacing} mm, origin {origin}, direction " \
               f"{(np.round(self.direction, 3) + 0.0).tolist()}"  # fmt: skip


def image_grid(image: Any) -> Grid:
    """The grid of a SimpleITK image (or of the information an ``ImageFileReader`` read)."""
    get = (image.GetSize, image.GetSpacing, image.GetOrigin, image.GetDirection)
    return Grid(*(tuple(f()) for f in get))


def header_grid(path: Path) -> Grid:
    """The grid a volume file or a DICOM series folder is stored on, from its headers alone (no voxels read),
    refusing what reading it would refuse from them: unreadable, no orientation (NIfTI, NRRD), not one 3-D scalar
    volume, a folder not holding one series of at least 2 slices at distinct positions."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        if not path.is_dir():
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.SetImageIO(next((v for k, v in IMAGE_IOS.items() if path.name.lower().endswith(k)), ""))
            reader.ReadImageInformation()
            if problem := volume_header_problem(path):
                raise ImageError(f"{path}: {problem}")
            refuse_shape(path, reader.GetDimension(), reader.GetNumberOfComponents())
            if (forms := nifti_forms(path)) is not None:
                refuse_forms(path, *forms)
            grid = image_grid(reader)  # a negative spacing (MetaImage) read as ReadImage does: its axis reversed
            sign = np.where(np.asarray(grid.spacing) < 0, -1.0, 1.0)
            d = np.asarray(grid.direction).reshape(3, 3) * sign
            return Grid(grid.size, tuple(np.abs(grid.spacing).tolist()), grid.origin, tuple(d.ravel().tolist()))
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            raise series_count_error(path, len(series))
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        check_series_files(path, names)  # at parse time, before a left-out slice moves the grid
        first, last = (sitk.ImageFileReader() for _ in range(2))
        for reader, name in ((first, names[0]), (last, names[-1])):
            reader.SetFileName(name)
            reader.ReadImageInformation()
    except (RuntimeError, OSError) as exc:  # OSError: a file this user may not read
        raise ImageError(f"{path}: unreadable ({str(exc).strip().splitlines()[-1]}); re-export the volume") from exc
    refuse_shape(path, 3, first.GetNumberOfComponents())
    if len(names) == 1:
        raise ImageError(f"{path}: one DICOM file (one slice, or a multi-frame file, which is not read); give the "
                         "series as one file per slice")  # fmt: skip
    step = (np.asarray(last.GetOrigin()) - np.asarray(first.GetOrigin())) / max(len(names) - 1, 1)  # mm a slice
    if float(np.linalg.norm(step)) < 1e-6:  # one slice, or all at one position: no slice spacing
        raise ImageError(f"{path}: {len(names)} DICOM slice(s) at one position; a CT must be a volume of at least 2 "
                         "slices at their own positions: give the whole series")  # fmt: skip
    # as ImageSeriesReader's: the first slice's row, column and normal, not the step (off the normal by a drift the
    # read accepts; with the normal against S, DICOMOrient's origin moves along the normal)
    d = np.asarray(first.GetDirection()).reshape(3, 3)
    size, spacing = first.GetSize(), first.GetSpacing()
    return Grid((size[0], size[1], len(names)), (spacing[0], spacing[1], float(np.linalg.norm(step))),
                first.GetOrigin(), tuple(d.ravel().tolist()))  # fmt: skip


def ct_grid(path: Path) -> Grid:
    """The LPS grid of a CT from its headers alone (:func:`header_grid`), refusing an oblique one as reading it
    would: what the workflow checks of every CT when it is parsed."""
    stored = header_grid(path)
    if (grid := stored.lps()) is None:
        raise oblique_error(Path(path), stored.direction)
    return grid


def grid_problems(label: Grid, ct: Grid) -> list[str]:
    """How the LPS-oriented grid of a label map differs from its CT's: [] when it lies on it."""
    problems = []
    if label.size != ct.size:
        problems.append(f"size {label.size} against the CT's {ct.size}")
    if not np.allclose(label.spacing, ct.spacing, rtol=SPACING_RTOL):
        problems.append(f"spacing {np.round(label.spacing, 4).tolist()} against {np.round(ct.spacing, 4).tolist()}")
    if not np.allclose(label.origin, ct.origin, atol=ORIGIN_TOLERANCE * min(ct.spacing)):
        problems.append(f"origin {np.round(label.origin, 2).tolist()} against {np.round(ct.origin, 2).tolist()}")
    return problems


def grid_error(path: Path, ct_path: Path, problems: list[str]) -> ImageError:
    """The error for a label map ``path`` off its CT's grid: what differs once both are in LPS axis order, and both
    headers as stored (where their directions may differ, e.g. a map saved with a flipped axis)."""
    stored = []
    for what, file in (("the label map", path), ("the CT", ct_path)):
        try:
            stored.append(f"{what} {header_grid(file)}")
        except ImageError:
            stored.append(f"{what} (unreadable header)")
    return ImageError(
        f"{path}: its grid does not match its CT {ct_path} (x, y, z in LPS order: {'; '.join(problems)}; as stored: "
        f"{'; '.join(stored)}); a label map must lie on its CT's voxel grid: resample it onto the CT (nearest "
        "neighbour, e.g. SimpleITK's Resample with the CT as reference) or give the CT it was drawn on"
    )


def looks_like_ct(path: Path, found: set[int]) -> ImageError:
    """A label map with negative values: HU, not classes (a CT in the label folder, or the two folders swapped)."""
    return ImageError(f"{path}: negative labels ({len(found)} distinct values from {min(found)} to {max(found)}): "
                      "this looks like a CT, not a label map; check data.images.label_dir")  # fmt: skip


def check_values(path: Path, labels: np.ndarray, convention: str) -> None:
    """Refuse a label map [Z, Y, X] with NaN, non-integer or negative values, or classes ``convention`` lacks."""
    refuse_non_finite(Path(path), labels, "their class (0 where background)")  # NaN read as 0: a hole in a nodule
    if not np.array_equal(labels, np.round(labels)):
        raise ImageError(f"{path}: non-integer labels; a label map holds integer classes")
    codes = CONVENTIONS[convention]
    allowed = {0} | {v for v in codes.values() if v is not None}
    found = {int(v) for v in np.unique(labels)}
    if found <= allowed:
        return
    if min(found) < 0:
        raise looks_like_ct(path, found)
    other = "binary" if convention == "lung_nodule" else "lung_nodule"
    fits = found <= {0} | {v for v in CONVENTIONS[other].values() if v is not None}
    hint = f"set label_convention: {other} if that is how the maps are coded, or recode" if fits else "recode"
    raise ImageError(
        f"{path}: labels {sorted(found)}, data.images.label_convention {convention!r} allows {sorted(allowed)}; "
        f"{hint} the map (a map of nodule instances 1..n: nodule = label > 0, with label_convention: binary)"
    )


def read_label(path: Path, ct: DicomSeries, convention: str) -> tuple[np.ndarray | None, np.ndarray]:
    """A label map on the grid of ``ct`` -> (lung bool [Z, Y, X] or None when it has no lung label, nodule bool)."""
    import SimpleITK as sitk

    image = read_image(Path(path))
    labels = sitk.GetArrayFromImage(image)
    spacing, origin = sitk_grid(ct)
    if ct.z_positions.size < 2:  # one slice: no slice spacing to compare
        spacing = (*spacing[:2], image.GetSpacing()[2])
    if problems := grid_problems(image_grid(image), Grid(ct.hu.shape[::-1], spacing, origin)):
        raise grid_error(Path(path), ct.directory, problems)
    check_values(Path(path), labels, convention)
    codes = CONVENTIONS[convention]
    nodule = labels == codes["nodule"]
    lung = None
    if codes["lung"] is not None and (labels == codes["lung"]).any():
        lung = labels > 0  # the lungs with their nodules
    return lung, nodule


def read_image_case(
    case: ImageCase, convention: str, padding_hu: float, max_hu: float, max_air_nodule_ml: float
) -> ImageScan:
    """CT, lungs (when labelled) and nodule components (26-connected) of one case; a component that is lung
    (:func:`~lungddpm.data.nodules.lung_like`) is refused."""
    ct = read_ct(case.image, padding_hu, max_hu)
    if case.label is None:
        return ImageScan(ct, None, [])
    lung, nodule = read_label(case.label, ct, convention)
    dz = float(np.median(np.diff(ct.z_positions))) if ct.z_positions.size > 1 else 1.0
    nods = components(nodule, (dz, *ct.pixel_spacing))
    if len(nods) > MAX_NODULES:
        raise ImageError(
            f"{case.label}: {len(nods)} separate nodule pieces (at most {MAX_NODULES}); a nodule label this "
            "speckled is noise or a thresholded map: remove the specks (keep the nodules' connected masks)"
        )
    if (air := lung_like(nods, ct.hu, max_air_nodule_ml)) is not None:
        codes = "a lung mask under label_convention: binary, or lung_nodule codes swapped (1 nodule, 2 lung)"
        raise ImageError(f"{case.label}: a nodule of {air[0].volume_ml:.0f} mL at mean {air[1]:.0f} HU (air-filled) "
                         f"is lung, not a nodule: {codes}; recode the map (or raise data.images.max_air_nodule_ml "
                         "for a large air-filled lesion)")  # fmt: skip
    log.info("%s: %d nodule component(s) in %s, lung %s", case.case_id, len(nods), case.label.name,
             "from the label map" if lung is not None else "from lungddpm's lung mask")  # fmt: skip
    return ImageScan(ct, lung, nods)


def _cache_key(case: ImageCase, convention: str) -> str:
    from .sources import data_files  # a detached header's data files: rewriting only them changes the voxels

    stats = []
    for path in (p for p in (case.label, case.image) if p is not None):
        for f in ([] if path.is_dir() else [path]) + data_files(path):
            if not f.is_file():  # a detached header whose data file was not copied with it
                raise ImageError(f"{path}: its voxels' file {f} is missing; copy it beside the header")
            st = f.stat()
            stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return f"images-v5|{stats}|{convention}"


def known_flag(case: ImageCase, convention: str) -> bool | None:
    """:func:`has_nodules`' answer when it is cached (no file to read), else None."""
    try:
        flag = cached(_cache_key(case, convention), "has_nodules")
    except ImageError:  # a file missing: has_nodules names it
        return None
    return None if flag is None else bool(flag)


def has_nodules(case: ImageCase, convention: str) -> bool:
    """Whether the case's label map has a nodule voxel, once the CT's headers (:func:`ct_grid`) and the label map
    (values, grid) pass the checks reading them would make; cached on disk by the path, size and mtime of their
    files, because the split needs it whenever Snakemake parses the workflow."""
    key = _cache_key(case, convention)
    if (cached_flag := cached(key, "has_nodules")) is not None:
        return bool(cached_flag)
    import SimpleITK as sitk

    ct = ct_grid(case.image)
    flag = False
    if case.label is not None:
        image = read_image(case.label)
        labels = sitk.GetArrayFromImage(image)
        check_values(case.label, labels, convention)
        if problems := grid_problems(image_grid(image), ct):  # the label map's is already in LPS order
            raise grid_error(case.label, case.image, problems)
        flag = bool((labels == CONVENTIONS[convention]["nodule"]).any())
    store(key, "has_nodules", flag, "case check")
    return flag
