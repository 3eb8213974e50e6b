from __future__ import annotations

import numpy as np

from lungddpm.config import LungmaskConfig, validate_config
from lungddpm.preprocessing.lungmask import outside_air, segment_lungs

CFG = LungmaskConfig(**validate_config({})["lungmask"])
SPACING = (4.0, 4.0, 4.0)


def toy_thorax(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4 mm toy chest: body, two lungs with vessels, a trachea forking into both lungs, a table.
    Returns (hu [Z, Y, X], true lung, trachea+bronchi)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:60, 0:80, 0:96].astype(float)
    hu = np.full(z.shape, -1000.0)
    body = ((x - 48) / 42) ** 2 + ((y - 40) / 30) ** 2 <= 1
    hu[body] = 40.0
    hu[(y >= 74) & (y <= 76)] = 300.0  # table, separated from the body by air
    lung = np.zeros(z.shape, dtype=bool)
    for cx in (28, 68):
        lung |= (((x - cx) / 15) ** 2 + ((y - 40) / 20) ** 2 + ((z - 25) / 24) ** 2) <= 1
    hu[lung] = -850 + 30 * (y[lung] - 40) / 20
    vessels = lung & (rng.random(z.shape) < 0.01)
    from scipy import ndimage as ndi

    vessels = ndi.binary_dilation(vessels) & lung
    hu[vessels] = 40.0
    trachea = (((x - 48) / 3) ** 2 + ((y - 36) / 3) ** 2 <= 1) & (z >= 35)
    carina = np.zeros_like(trachea)
    for t in np.linspace(0, 1, 40):
        for side in (-1, 1):
            cx, cz = 48 + side * 18 * t, 35 - 6 * t
            carina |= ((x - cx) ** 2 + (y - 36) ** 2 + (z - cz) ** 2) <= 2.5**2
    airway = (trachea | carina) & ~lung
    hu[trachea | carina] = -1000.0
    hu += rng.normal(0, 10, hu.shape)
    return hu.astype(np.float32), lung, airway


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_outside_air_is_room_air_only() -> None:
    hu, lung, _ = toy_thorax()
    outside = outside_air(hu, CFG.threshold_hu)
    assert outside[0, 0, 0] and outside[30, 78, 48]  # corner and the gap below the table
    assert not (outside & lung).any()


def test_segments_lungs_with_vessels_and_without_airways() -> None:
    hu, lung, airway = toy_thorax()
    result = segment_lungs(hu, SPACING, CFG)
    assert dice(result.lung, lung) > 0.97
    assert not (result.lung & airway).any()
    assert result.airway_ml > 0 and result.n_components == 2
    expected_ml = lung.sum() * 64 / 1000
    assert abs(result.lung_ml - expected_ml) / expected_ml < 0.05


def test_empty_scan_gives_empty_mask() -> None:
    result = segment_lungs(np.full((10, 20, 20), 40.0, dtype=np.float32), SPACING, CFG)
    assert not result.lung.any() and result.lung_ml == 0.0


def test_keeps_a_detached_upper_lobe_and_drops_bowel_gas() -> None:
    hu, lung, _ = toy_thorax()
    band = lung.copy()
    band[:33] = band[35:] = False
    band[..., 48:] = False
    hu[band] = 40.0  # a soft-tissue band cuts one lung's top off (a separate component)
    gas = np.zeros_like(lung)
    gas[1:5, 14:29, 35:60] = True  # 96 mL, below the lungs' mid-height, inside the body, apart from them
    hu[gas] = -1000.0
    result = segment_lungs(hu, SPACING, CFG)
    assert result.n_components == 3  # two lungs + the detached top piece, not the gas
    assert not (result.lung & gas).any()
    assert result.lung[40:45][lung[40:45]].mean() > 0.95
