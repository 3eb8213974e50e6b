"""Procedural chest CT ("phantom") at the geometry of a real LIDC scan, with nodules at real consensus masks,
written as a DICOM CT series that a normal loader reads like a real LIDC series.

Anatomy is a set of approximate signed-distance shapes in LPS millimetres (patient centred near x = 0, +y
posterior, +z superior), composed as partial-volume occupancies ``clip(0.5 - d / h, 0, 1)`` on a coarse grid
(in-plane ``coarse_factor`` x the pixel spacing, z at the slice positions or a coarse uniform grid), then
upsampled to the full matrix by separable linear interpolation, with the scanner blur folded into the same
matrices. The true lung mask is the same lung occupancy upsampled without blur and thresholded at 0.5, so its
border is where the image crosses half-way between lung and soft tissue. Cranio-caudal positions are fractions
of the scan's z range; in-plane sizes scale with the body, whose half-width is ``min(170 mm, 0.46 * FOV)``. With
nodules, the body is widened, deepened, thinned or moved, least first, until the rib cage and the lungs hold
every nodule, and a nodule the lungs still miss gets a bulge of lung from the nearest lung (``volume._fit_thorax``).

The package: :mod:`.spec` (public configuration), :mod:`.anatomy` (shape primitives, the thorax layout),
:mod:`.trees` (vessel and airway trees), :mod:`.paint` (the coarse anatomy), :mod:`.volume` (full resolution and
:func:`synthesize_thorax`), :mod:`.dicom` (the series writer). Underscored names are private to the package.
"""

from __future__ import annotations

from .anatomy import thorax_landmarks
from .dicom import DicomQuirks, quirks_for, write_dicom_series
from .spec import NoduleSpec, PhantomConfig, ScanGeometry, fov_mask
from .volume import synthesize_thorax

# Bumped when the same geometry, nodules and seed give another phantom (the demo_dicom rule's params: a new
# version remakes the demo's series). 2 (2026-12-05): the body is fitted to hold every nodule in its lungs.
# 3 (2026-12-07): each case's seed and DICOM quirks drawn from data.demo.seed and its case id, not its index.
PHANTOM_VERSION = 3

__all__ = [
    "PHANTOM_VERSION",
    "DicomQuirks",
    "NoduleSpec",
    "PhantomConfig",
    "ScanGeometry",
    "fov_mask",
    "quirks_for",
    "synthesize_thorax",
    "thorax_landmarks",
    "write_dicom_series",
]
