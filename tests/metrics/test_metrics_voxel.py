from __future__ import annotations

import numpy as np
import pytest

from lungddpm.metrics.voxel import bootstrap_ci, hu_histogram_distance, nodule_agreement, paired_metrics, region_mse


def test_region_metrics_known_answers() -> None:
    real = np.zeros((4, 4, 4))
    syn = real.copy()
    mask = np.zeros_like(real, dtype=bool)
    mask[:2] = True
    syn[:2] += 10.0
    syn[2:] += 1000.0  # outside the region: ignored
    assert region_mse(real, syn, mask) == pytest.approx(100.0)
    assert hu_histogram_distance(real, syn, mask) == pytest.approx(10.0)  # a shift moves every voxel by 10 HU
    assert hu_histogram_distance(real, np.flip(real), mask) == 0.0
    with pytest.raises(ValueError, match="empty mask"):
        region_mse(real, syn, np.zeros_like(mask))


def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(0).normal(5.0, 1.0, 200)
    m, lo, hi = bootstrap_ci(values)
    assert lo < m < hi and lo > 4.6 and hi < 5.4
    assert bootstrap_ci([3.0, 3.0]) == (3.0, 3.0, 3.0)
    m, lo, hi = bootstrap_ci([3.0])  # one value: no interval (it would look exact)
    assert m == 3.0 and np.isnan(lo) and np.isnan(hi)


WINDOW = (-1000.0, 400.0)


def test_paired_metrics_identical_and_lung_region_ignores_outside() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(-500, 200, (16, 16, 16)).astype(np.float32)
    lung = np.zeros(real.shape, bool)
    lung[4:12, 4:12, 4:12] = True
    same = paired_metrics(real, real.copy(), None, WINDOW)
    assert same["mse"] == 0.0 and same["mae"] == 0.0 and same["psnr"] == pytest.approx(100.0)  # capped, finite
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5)
    syn = real.copy()
    syn[~lung] += 300.0  # changes outside the lungs only
    inside = paired_metrics(real, syn, lung, WINDOW, ssim_window=3)
    whole = paired_metrics(real, syn, None, WINDOW, ssim_window=3)
    assert inside["mse"] == 0.0 and inside["mae"] == 0.0
    assert whole["mse"] == pytest.approx(300.0**2 * (~lung).mean(), rel=1e-4)
    clipped = np.mean((np.clip(real, -1000, 400) - np.clip(syn, -1000, 400)).astype(np.float64) ** 2)
    assert whole["psnr"] == pytest.approx(10 * np.log10(1400.0**2 / clipped), rel=1e-6)
    assert whole["ssim"] < 0.99
    core = np.zeros(real.shape, bool)
    core[6:10, 6:10, 6:10] = True  # 3x3x3 windows around these voxels stay inside the lungs
    assert paired_metrics(real, syn, core, WINDOW, ssim_window=3)["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_nodule_agreement_known_answer() -> None:
    real = np.full((10, 10, 10), -850.0)
    syn = real.copy()
    nodule = np.zeros(real.shape, bool)
    nodule[4:6, 4:6, 4:6] = True  # 8 voxels
    real[nodule] = 20.0
    syn[nodule] = -120.0
    syn[3, 4, 4] = 0.0  # a solid voxel just outside the label still counts toward the synthetic size
    out = nodule_agreement(real, syn, nodule, (2.0, 2.0, 2.0), solid_hu=-400.0)
    assert out["nodule_mean_hu_real"] == 20.0 and out["nodule_mean_hu_synthetic"] == -120.0
    assert out["nodule_ml_real"] == pytest.approx(8 * 8 / 1000)
    assert out["nodule_ml_synthetic"] == pytest.approx(9 * 8 / 1000)
    assert nodule_agreement(real, syn, np.zeros_like(nodule), (1.0, 1.0, 1.0), -400.0) == {}


@pytest.mark.parametrize("window", [3, 4, 5])
def test_lung_ssim_crops_the_mask_to_the_map_for_any_window(window: int) -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(-500, 200, (12, 12, 12)).astype(np.float32)
    mask = np.zeros(real.shape, bool)
    mask[3:9, 3:9, 3:9] = True
    out = paired_metrics(real, real.copy(), mask, WINDOW, ssim_window=window)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_ssim_and_psnr_are_on_the_hu_window_whatever_the_tissue_level() -> None:
    """SSIM's constants assume intensities in [0, L]: on raw HU a synthetic copy 60 HU brighter scored 0.997 in the
    lungs (-850 HU) and 0.066 at 0 HU. On the window the same shift scores alike at every level, and HU beyond the
    window (bone above 400) counts as the window's edge."""
    texture = np.random.default_rng(3).normal(0, 30, (16, 16, 16))
    scores = [paired_metrics(base + texture, base + texture + 60, None, WINDOW, ssim_window=5)
              for base in (-850, -100, 0, 40)]  # fmt: skip
    assert all(m["mae"] == pytest.approx(60.0) for m in scores)
    ssim = [m["ssim"] for m in scores]
    assert min(ssim) > 0.9 and max(ssim) - min(ssim) < 0.06, ssim
    assert all(m["psnr"] == pytest.approx(10 * np.log10(1400.0**2 / 60.0**2), rel=1e-6) for m in scores)
    bone = paired_metrics(np.full((8, 8, 8), 900.0), np.full((8, 8, 8), 1500.0), None, WINDOW, ssim_window=3)
    assert bone["mae"] == 600.0 and bone["psnr"] == 100.0 and bone["ssim"] == pytest.approx(1.0)


def test_ssim_at_the_default_window_equals_skimage() -> None:
    """The default window (11 at sigma 1.5) is skimage's (and MONAI's): the same value as skimage's
    structural_similarity on the windowed volumes; the earlier default 7 was 0.035 higher on a demo pair."""
    from scipy import ndimage
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    real = ndimage.gaussian_filter(rng.normal(-500, 300, (24, 24, 24)), 1.0)
    syn = real + ndimage.gaussian_filter(rng.normal(0, 600, real.shape), 1.0)
    got = paired_metrics(real.astype(np.float32), syn.astype(np.float32), None, WINDOW)["ssim"]
    a, b = (np.clip(v, *WINDOW) - WINDOW[0] for v in (real, syn))
    want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=WINDOW[1] - WINDOW[0])  # fmt: skip
    assert 0.3 < want < 0.95 and got == pytest.approx(want, abs=1e-5)
