"""Helpers shared by tests of several packages: tiny configs, toy volumes and networks, bank nodules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import torch

from lungddpm.config import Config, validate_config
from lungddpm.data.phantom import DicomQuirks, ScanGeometry, write_dicom_series
from lungddpm.diffusion.data import TrainData
from lungddpm.diffusion.unet import UNet3D, UNetConfig
from lungddpm.io import Geometry, write_volume
from lungddpm.preprocessing.grid import SliceGrid
from lungddpm.preprocessing.rois import RoiSettings, SourceCT, cut_roi
from lungddpm.synthesis.layout_edit import BankNodule
from lungddpm.synthesis.lesion import Site

# torch threads for in-process work: the cores shared out among pytest-xdist's workers (on 2 cores, 2 workers: 1
# each). Two threads in each worker next to the other worker's Snakemake jobs oversubscribe the cores, and OpenMP's
# waiting threads then cost more than they give: measured, a 120-step tiny training beside one busy core took 47 s
# with 2 threads and 22 s with 1 (14 s and 21 s on idle cores).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # this process's
THREADS = max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))

TINY = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), norm_groups=4)


def randomise(model: UNet3D) -> UNet3D:
    """Undo the zero initialisations so every branch reaches the output."""
    torch.nn.init.normal_(model.out[2].weight)
    for block in model.modules():
        if hasattr(block, "out_layers"):
            torch.nn.init.normal_(block.out_layers[3].weight, std=0.05)
        if hasattr(block, "proj_out"):
            torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    return model


def ball_nodule(index: int, diameter: float, texture: int = 5) -> BankNodule:
    r = diameter / 2
    zz, yy, xx = np.mgrid[-4:5, -16:17, -16:17]
    mask = (zz * 2.5) ** 2 + (yy * 0.7) ** 2 + (xx * 0.7) ** 2 <= r**2
    return BankNodule(index, f"LIDC-IDRI-{index:04d}", mask, (2.5, 0.7, 0.7), diameter, texture, 3, 4)


TINY_MODEL = {"model_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [8], "norm_groups": 4}


def tiny_config(**train: object) -> Config:
    raw = validate_config(
        {
            "preprocess": {"size": [16, 16, 16]},
            "model": dict(TINY_MODEL),  # validate_config fills defaults in place: never into the shared dict
            "train": {
                "steps": 20,
                "lr": 2e-3,
                "checkpoint_every": 10,
                "log_every": 1,
                "preview_every": 0,
                "preview_sampler_steps": 2,
                "precision": "fp32",
                **train,
            },
        }
    )
    return Config.from_dict(raw)


def phantom_volumes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n toy [16³] CTs (HU) and layouts: a body with two lungs and a nodule."""
    z, y, x = np.mgrid[0:16, 0:16, 0:16]
    cts, layouts = [], []
    for i in range(n):
        lung = (((x - 5) / 3) ** 2 + ((y - 8) / 5) ** 2 < 1) | (((x - 11) / 3) ** 2 + ((y - 8) / 5) ** 2 < 1)
        lung &= (z > 2) & (z < 14)
        nodule = ((x - 5) ** 2 + (y - 8 + i) ** 2 + (z - 8) ** 2) <= 2
        ct = np.where(lung, -850, 40).astype(np.int16)
        ct[nodule] = 20
        lay = np.where(lung, 1, 0).astype(np.uint8)
        lay[nodule] = 2
        cts.append(ct)
        layouts.append(lay)
    return np.stack(cts), np.stack(layouts)


def tiny_data(n: int = 2) -> TrainData:
    from lungddpm.diffusion.encoding import hu_to_model, layout_to_channels

    cts, layouts = phantom_volumes(n)
    return TrainData(
        torch.from_numpy(np.stack([hu_to_model(c, (-1000, 400))[None] for c in cts])),
        torch.from_numpy(np.stack([layout_to_channels(lay) for lay in layouts])),
        tuple(f"case{i}" for i in range(n)),
    )


def write_cases(root: Path, n: int) -> tuple[list[Path], list[Path]]:
    cts, layouts = phantom_volumes(n)
    geom = Geometry((10.0, 10.0, 10.0), (0.0, 0.0, 0.0))
    ct_paths, lay_paths = [], []
    for i in range(n):
        ct_paths.append(root / f"case{i}" / "ct.nii.gz")
        lay_paths.append(root / "layouts" / f"case{i}.nii.gz")
        write_volume(ct_paths[-1], cts[i], geom)
        write_volume(lay_paths[-1], layouts[i], geom)
    return ct_paths, lay_paths


def lidc_config(cfg: Config, dicom_root: Path) -> Config:
    """``cfg`` reading LIDC-IDRI DICOM from ``dicom_root`` (e.g. a copy of the demo's series, damaged or edited)."""
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, source="lidc", dicom_root=str(dicom_root)))


# the lesion scale's toy source CT, ROI settings, bank and sites (tests/synthesis)
INSERT = {"diameter_mm": [2, 20], "textures": [], "malignancies": [], "min_readers": 1, "margin_mm": 2.0,
          "feather_mm": 2.0, "max_attempts": 200, "texture": "bank"}  # fmt: skip


def roi_settings(**kw: object) -> RoiSettings:
    base = dict(spacing_mm=1.0, size=16, nodule_jitter_mm=2.0, rois_per_nodule=1, free_per_case=1,
                site_min_depth_mm=4.0, nodule_fraction=0.5, edge="pad", seed=0)  # fmt: skip
    base.update(kw)
    return RoiSettings(**base)  # type: ignore[arg-type]


def source_ct(seed: int = 0) -> SourceCT:
    """A 40 x 64 x 64 native CT (1 mm pixels, 1.5 mm slices) of lung at -850 HU with noise, and a fine lung mask."""
    rng = np.random.default_rng(seed)
    hu = (-850 + rng.normal(0, 20, (40, 64, 64))).round().astype(np.float32)
    hu[:, :4] = hu[:, -4:] = 40.0  # body wall
    grid = SliceGrid(np.arange(40) * 1.5, 1.0, 1.0, 0.0, 0.0)
    lung = np.zeros((31, 33, 33), bool)  # 2 mm fine grid over the same extent
    lung[2:-2, 3:-3, 2:-2] = True
    return SourceCT("LIDC-IDRI-0001", hu, grid, lung, Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), [], -1024.0)


def labelled_source_ct() -> SourceCT:
    """:func:`source_ct` with an 8 mm solid nodule (30 HU) painted in and given as a label-map component (unrated)."""
    from dataclasses import replace

    from lungddpm.data.nodules import components

    src = source_ct()
    zz, yy, xx = np.ogrid[:40, :64, :64]
    ball = ((zz - 20) * 1.5) ** 2 + (yy - 32) ** 2 + (xx - 30) ** 2 <= 16
    src.hu[ball] = 30.0
    return replace(src, nodules=components(ball, (1.5, 1, 1)))


def lesion_bank() -> list[BankNodule]:
    zz, yy, xx = np.ogrid[-3:4, -3:4, -3:4]
    return [BankNodule(0, "LIDC-IDRI-0002", zz**2 + yy**2 + xx**2 <= 9, (1.0, 1.0, 1.0), 6.0, 5, 3, 4)]


def toy_site(src: SourceCT, centre: tuple[float, float, float] = (32.0, 32.0, 30.0)) -> Site:
    s = roi_settings()
    geometry = s.geometry(np.array(centre))
    roi = cut_roi(src, geometry, s)
    return Site("LIDC-IDRI-0001_f0", roi["ct"], roi["layout"], geometry)


def reverse_keys(value: object) -> object:
    """``value`` with every mapping's keys in reverse order (lists' items too)."""
    if isinstance(value, dict):
        return {k: reverse_keys(value[k]) for k in reversed(list(value))}
    return [reverse_keys(v) for v in value] if isinstance(value, list) else value


def write_non_axial_series(folder: Path, orientation: str, skip: int | None) -> None:
    """12 coronal (slice n at y = -10 + 2n mm) or sagittal (x = -10 + 2n) 0.8 mm slices, rows along -z; slice n is
    40 + n HU inside a soft-tissue rectangle. Written with pydicom (SimpleITK's DICOM writer resets the C locale)."""
    hu = np.full((12, 32, 32), -1000.0, np.float32)
    hu[:, 10:20, 8:24] = 40 + np.arange(12)[:, None, None]
    uid = "1.2.826.0.1.3680043.2.1125.9." + ("1" if orientation == "coronal" else "2")
    geom = ScanGeometry("P1", "1.2.826.0.1.1", uid, 0.8, np.arange(12) * 2.0, 2.0, rows=32, cols=32)
    paths = write_dicom_series(hu, geom, folder, DicomQuirks(signed=True, rescale_intercept=-1024.0, padding_hu=None))
    for n, path in enumerate(paths):
        if n == skip:
            path.unlink()
            continue
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1] if orientation == "coronal" else [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-16, -10 + 2 * n, 50] if orientation == "coronal" else [-10 + 2 * n, -16, 50]
        if "SliceLocation" in ds:
            del ds.SliceLocation
        ds.save_as(path)
