"""The phantom's public configuration: the scan geometry it is drawn at, its nodules, its anatomy settings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError


@dataclass(frozen=True, eq=False)
class ScanGeometry:
    """Geometry of one LIDC series. Pixel (row i, col j) of slice k lies at LPS
    ``(x0 + j * ps, y0 + i * ps, slice_zvals[k])`` with ``x0 = -ps * cols / 2``, ``y0 = -ps * rows / 2``."""

    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float  # mm, rows and columns
    slice_zvals: np.ndarray  # [Z] ascending z (mm, +z superior), possibly irregular
    slice_thickness: float
    rows: int = 512
    cols: int = 512

    def __post_init__(self) -> None:
        z = np.array(self.slice_zvals, dtype=np.float64).reshape(-1)
        if z.size == 0 or not np.all(np.isfinite(z)) or np.any(np.diff(z) <= 0):
            raise ConfigError(
                f"{self.patient_id}: slice_zvals must be a non-empty, strictly ascending list of z "
                "positions (mm); sort the slices by z and drop duplicates"
            )
        if not self.pixel_spacing > 0 or self.rows < 8 or self.cols < 8:
            raise ConfigError(
                f"{self.patient_id}: pixel_spacing {self.pixel_spacing} mm, rows {self.rows}, cols "
                f"{self.cols}: need a positive spacing and at least 8x8 pixels"
            )
        z.setflags(write=False)
        object.__setattr__(self, "slice_zvals", z)

    @property
    def x0(self) -> float:
        return -self.pixel_spacing * self.cols / 2

    @property
    def y0(self) -> float:
        return -self.pixel_spacing * self.rows / 2

    @property
    def slice_step_mm(self) -> float:
        """The median slice spacing (mm); one slice: its thickness, at least the pixel spacing."""
        z = self.slice_zvals
        return float(np.median(np.diff(z))) if z.size > 1 else max(self.slice_thickness, self.pixel_spacing)

    @property
    def fov_mm(self) -> float:
        """Diameter of the circular reconstruction field of view."""
        return self.pixel_spacing * min(self.rows, self.cols)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slice_zvals), self.rows, self.cols)


@dataclass(frozen=True, eq=False)
class NoduleSpec:
    """One nodule: a boolean mask in a local box of the full ``[Z, Y, X]`` volume."""

    mask: np.ndarray  # bool [z, y, x] local box
    offset: tuple[int, int, int]  # (k0, i0, j0): full-volume index of mask[0, 0, 0]
    texture: int  # LIDC texture 1 (ground glass) .. 5 (solid), median of the readers

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim != 3:
            raise ConfigError(f"nodule mask has shape {mask.shape}; expected a [Z, Y, X] box")
        if int(self.texture) not in range(1, 6):
            raise ConfigError(f"nodule texture {self.texture} outside 1..5 (LIDC rating)")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "offset", tuple(int(o) for o in self.offset))
        object.__setattr__(self, "texture", int(self.texture))


@dataclass(frozen=True)
class PhantomConfig:
    """Every constant of the phantom. Anatomical lengths in mm at a body half-width of ``body_half_width_mm``
    (they scale with smaller bodies; scanner, table, nodule, minimal radii and segment-length constants do not),
    HU values, cranio-caudal positions as fractions of the scan's z range (``*_frac``, 0 = top slice) or of the
    lung height (apex to the mean dome height, ``*_lung_frac``)."""

    # scanner
    noise_hu: float = 20.0  # std of the (spatially correlated) image noise
    blur_mm: float = 1.0  # Gaussian sigma of the reconstruction blur
    coarse_factor: int = 4  # anatomy grid = coarse_factor x pixel spacing in-plane ...
    coarse_max_mm: float = 4.0  # ... reduced so that the grid step stays below this (coarse pixels)
    # HU
    air_hu: float = -1000.0
    table_hu: float = 200.0
    skin_hu: float = 20.0
    fat_hu: float = -100.0
    muscle_hu: float = 50.0
    mediastinum_hu: float = 40.0  # mediastinal / neck / upper-abdominal soft tissue
    mediastinal_fat_hu: float = -90.0  # pericardial fat and the sheath of the great vessels
    heart_hu: float = 40.0
    great_vessel_hu: float = 45.0
    liver_hu: float = 60.0
    bone_cortex_hu: float = 700.0
    bone_marrow_hu: float = 250.0
    cartilage_hu: float = 120.0
    disc_hu: float = 80.0
    spinal_canal_hu: float = 20.0
    lung_hu: float = -850.0
    lung_gravity_hu: float = 50.0  # posterior minus anterior lung HU
    lung_texture_hu: float = 15.0  # peak amplitude (about 2 std) of the low-frequency lung texture
    lung_texture_mm: float = 10.0  # correlation length (Gaussian sigma) of that texture
    lung_vessel_hu: float = 40.0
    airway_wall_hu: float = 50.0
    # body (mm at full size)
    body_half_width_mm: float = 170.0
    body_fov_fraction: float = 0.46  # body half-width <= this fraction of the FOV diameter
    # the body is fitted to the nodules (volume._fit_thorax): widened up to body_fov_fraction_max, deepened up to
    # body_aspect_max, its fat thinned down to fat_scale_min and moved up to body_shift_max_mm (on a body_fit_step_mm
    # grid), by the least total displacement (mm) that puts every nodule centre nodule_cavity_margin_mm inside the
    # rib cage and, where possible, the lungs (a juxtapleural nodule stays at the pleura); a nodule the lungs still
    # miss gets a lung bulge from the nearest lung deep enough to hold it, within nodule_bulge_reach_mm
    body_fov_fraction_max: float = 0.49
    body_aspect_max: float = 0.8
    fat_scale_min: float = 0.5
    body_shift_max_mm: float = 48.0
    body_fit_step_mm: float = 4.0
    nodule_cavity_margin_mm: float = 4.0
    nodule_bulge_reach_mm: float = 60.0
    body_aspect: float = 0.65  # AP half-depth / half-width
    body_y_offset_mm: float = 10.0  # body centre posterior of the image centre
    skin_mm: float = 2.0
    fat_mm: float = 12.0
    muscle_mm: float = 10.0
    back_muscle_mm: float = 25.0  # extra muscle depth at the back (erector spinae)
    pleural_gap_mm: float = 1.0
    table_gap_mm: float = 12.0
    table_thickness_mm: float = 8.0
    table_radius_mm: float = 600.0  # radius of curvature of the table's cradle
    # bones
    rib_thickness_mm: float = 8.0
    rib_height_mm: float = 11.0
    rib_count: int = 12
    rib_pitch_lung_frac: float = 0.1  # posterior rib spacing / lung height
    rib_drop_lung_frac: float = 0.3  # how much lower a rib's anterior end lies than its posterior end
    cortex_mm: float = 1.5
    vertebra_radius_mm: float = 18.0
    vertebra_y_frac: float = 0.42  # vertebral body centre: body centre + this x AP half-depth
    disc_height_mm: float = 6.0
    sternum_half_width_mm: float = 14.0
    sternum_half_depth_mm: float = 5.0
    # cranio-caudal layout (fractions of the scan's z range, from the top slice)
    apex_frac: float = 0.05
    dome_right_frac: float = 0.72
    dome_left_frac: float = 0.77
    recess_frac: float = 0.86  # posterior costophrenic recess
    apex_taper_lung_frac: float = 0.6  # the lung reaches its full cross-section this far below the apex
    carina_lung_frac: float = 0.4
    diaphragm_mm: float = 4.0
    # airways
    trachea_radius_mm: float = 9.0  # lumen
    trachea_wall_mm: float = 2.0
    bronchus_radius_mm: float = 6.0  # main bronchi, lumen
    bronchus_wall_mm: float = 1.5
    airway_root_radius_mm: float = 4.0  # lobar bronchi, lumen
    airway_min_radius_mm: float = 1.2
    airway_max_generations: int = 5
    airway_wall_fraction: float = 0.2  # wall thickness / lumen radius of intrapulmonary airways
    airway_wall_min_mm: float = 0.8
    # heart and vessels
    heart_semi_axes_mm: tuple[float, float] = (62.0, 48.0)  # x, y; z semi-axis = heart_height_lung_frac
    heart_height_lung_frac: float = 0.35
    heart_x_mm: float = 18.0
    pericardial_fat_mm: float = 3.0
    mediastinum_half_width_mm: float = 30.0
    vessel_root_radius_mm: float = 6.0
    vessel_min_radius_mm: float = 1.0
    vessel_max_segments: int = 1500  # per lung and tree family (arteries, veins, airways)
    branch_taper_major: float = 0.87  # child / parent radius, larger child
    branch_taper_minor: float = 0.72  # child / parent radius, smaller child
    branch_angle_major_deg: tuple[float, float] = (8.0, 25.0)
    branch_angle_minor_deg: tuple[float, float] = (30.0, 60.0)
    segment_length_base_mm: float = 5.0
    segment_length_per_radius: float = 3.0  # segment length = base + this x radius
    tree_margin_mm: float = 1.5  # a branch's end stays this far inside the lung (beyond its radius)
    tree_candidates: int = 8  # directions tried per branch to stay inside the lung ...
    tree_max_detour_deg: float = 45.0  # ... deviating from the planned one by up to this angle
    segment_length_jitter: float = 0.2  # relative random variation of segment lengths
    # nodules
    nodule_texture_hu: tuple[float, float, float, float, float] = (-600.0, -450.0, -500.0, -50.0, 30.0)
    part_solid_core_hu: float = 20.0
    part_solid_core_fraction: float = 0.5  # core = voxels deeper than this fraction of the maximal depth
    nodule_edge_mm: float = 0.5  # Gaussian sigma of the painted nodule edge
    nodule_lung_margin_mm: float = 5.0  # lung added around each nodule


def fov_mask(geom: ScanGeometry) -> np.ndarray:
    """bool [rows, cols]: pixels inside the circular field of view (diameter ``geom.fov_mm``, image centre)."""
    ps = geom.pixel_spacing
    y = geom.y0 + ps * np.arange(geom.rows)
    x = geom.x0 + ps * np.arange(geom.cols)
    return (y[:, None] ** 2 + x[None, :] ** 2) <= (geom.fov_mm / 2) ** 2
