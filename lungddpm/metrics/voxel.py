"""Paired voxel metrics on HU volumes, restricted to a region (e.g. the lungs), and bootstrap intervals; the signed
distance to a mask's boundary and the mean HU per distance bin across it (a nodule's margin profile)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import islice

import numpy as np
from scipy import ndimage

from .distribution import draws_only_itself, group_members, percentile_interval, resamples, w1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks [Z, Y, X]; 1.0 when both are empty (nothing to find and nothing predicted)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def region_mse(real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared HU difference inside ``mask`` (all [Z, Y, X])."""
    if not mask.any():
        raise ValueError("region_mse: empty mask")
    d = real[mask].astype(np.float64) - synthetic[mask].astype(np.float64)
    return float(np.mean(d * d))


def hu_histogram_distance(real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> float:
    """Wasserstein-1 distance (HU) between the HU distributions inside ``mask``: 0 for identical histograms,
    the mean shift for a shifted one."""
    if not mask.any():
        raise ValueError("hu_histogram_distance: empty mask")
    return w1(real[mask], synthetic[mask])


def _region(real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if real.shape != synthetic.shape:
        raise ValueError(f"paired volumes differ in shape: {real.shape} vs {synthetic.shape}")
    if mask is None:
        return real.astype(np.float64).ravel(), synthetic.astype(np.float64).ravel()
    if not mask.any():
        raise ValueError("empty region mask")
    return real[mask].astype(np.float64), synthetic[mask].astype(np.float64)


def ssim_map(real: np.ndarray, synthetic: np.ndarray, data_range: float, window: int, sigma: float) -> np.ndarray:
    """Local 3D SSIM (MONAI, Gaussian window) → [Z - w + 1, Y - w + 1, X - w + 1] (valid positions only)."""
    import torch
    from monai.metrics.regression import compute_ssim_and_cs

    def t(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None]

    ssim, _ = compute_ssim_and_cs(t(synthetic), t(real), 3, [window] * 3, [sigma] * 3, data_range=data_range)
    return ssim[0, 0].double().numpy()


def windowed(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """HU clipped to ``hu_window`` (lo, hi) and shifted to [0, hi - lo]: the intensities that PSNR's peak and SSIM's
    constants (C1 = (0.01 L)², C2 = (0.03 L)², L = hi - lo) assume."""
    lo, hi = (float(v) for v in hu_window)
    return np.clip(hu.astype(np.float64), lo, hi) - lo


PSNR_FLOOR = 1e-10  # of the squared window: PSNR is capped at 100 dB (identical volumes), never infinite


def paired_metrics(
    real: np.ndarray,
    synthetic: np.ndarray,
    mask: np.ndarray | None,
    hu_window: Sequence[float],
    ssim_window: int = 11,
    ssim_sigma: float = 1.5,
) -> dict[str, float]:
    """MSE, MAE (HU², HU; raw HU), PSNR (dB, at most 100) and SSIM (both on the HU window, :func:`windowed`, peak its
    width) between paired HU volumes [Z, Y, X], over the whole volume (``mask`` None) or inside ``mask``. SSIM inside
    a mask averages the local SSIM map over the mask's voxels whose window lies inside the volume."""
    r, s = _region(real, synthetic, mask)
    d = r - s
    mse = float(np.mean(d * d))
    data_range = float(hu_window[1]) - float(hu_window[0])
    wr, ws = windowed(real, hu_window), windowed(synthetic, hu_window)
    wd = np.subtract(*_region(wr, ws, mask))
    mse_window = float(np.mean(wd * wd))
    smap = ssim_map(wr, ws, data_range, ssim_window, ssim_sigma)
    if mask is not None:  # map index i is the window starting at voxel i, centred at i + (w - 1) // 2
        lo, hi = (ssim_window - 1) // 2, ssim_window // 2
        inner = mask[lo : mask.shape[0] - hi, lo : mask.shape[1] - hi, lo : mask.shape[2] - hi]
        smap = smap[inner] if inner.any() else np.array([np.nan])
    return {
        "mse": mse,
        "mae": float(np.mean(np.abs(d))),
        "psnr": float(10 * np.log10(data_range**2 / max(mse_window, PSNR_FLOOR * data_range**2))),
        "ssim": float(np.mean(smap)),
    }


def nodule_agreement(
    real: np.ndarray,
    synthetic: np.ndarray,
    nodule: np.ndarray,
    spacing: Sequence[float],
    solid_hu: float,
    margin_voxels: int = 1,
) -> dict[str, float]:
    """Nodule HU and size agreement inside the layout's nodule label (``nodule`` [Z, Y, X] bool): mean HU of each
    volume there, and the volume (mL) of voxels above ``solid_hu`` in the label dilated by ``margin_voxels``."""
    if not nodule.any():
        return {}
    grown = ndimage.binary_dilation(nodule, iterations=margin_voxels) if margin_voxels else nodule
    ml = float(np.prod(spacing)) / 1000.0
    return {
        "nodule_mean_hu_real": float(real[nodule].mean()),
        "nodule_mean_hu_synthetic": float(synthetic[nodule].mean()),
        "nodule_ml_real": float((real[grown] > solid_hu).sum() * ml),
        "nodule_ml_synthetic": float((synthetic[grown] > solid_hu).sum() * ml),
    }


def bootstrap_ci(
    values: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
    groups: Sequence[object] | None = None,
) -> tuple[float, float, float]:
    """(statistic, low, high) percentile bootstrap interval of ``values``. With ``groups`` (one label per value),
    a cluster bootstrap: whole groups are resampled, so that correlated values (several ROIs of one nodule) count as
    one draw; one group, or one value, gives no interval (NaN); with every label distinct it is the plain bootstrap,
    draw for draw."""
    v = np.asarray(values, dtype=np.float64)
    members = None if groups is None else group_members(groups)
    if v.size < 2 or draws_only_itself([members]):
        return float(statistic(v)), float("nan"), float("nan")
    draws = resamples(np.random.default_rng(seed), (v.size,), [members], 1)
    return percentile_interval(float(statistic(v)), [statistic(v[i]) for (i,) in islice(draws, n_boot)], level)


def signed_distance(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Signed distance (mm) [Z, Y, X] to the boundary of ``mask`` (negative inside): to the nearest voxel of the
    other side, less half a voxel, so the boundary voxels on either side sit at -+ half a voxel."""
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return np.where(mask, -(inside - spacing_mm / 2), outside - spacing_mm / 2)


def margin_profile(
    ct: np.ndarray, mask: np.ndarray, spacing_mm: float, bins: np.ndarray, signed: np.ndarray | None = None
) -> np.ndarray:
    """Mean HU of ``ct`` [Z, Y, X] per bin (:func:`profile_bins`) of the :func:`signed_distance` to the boundary of
    ``mask`` (``signed``, when the caller has it); NaN for a bin with no voxel."""
    signed = signed_distance(mask, spacing_mm) if signed is None else signed
    step = float(bins[1] - bins[0])
    which = np.floor(signed / step).astype(int) + len(bins) // 2
    out = np.full(len(bins), np.nan)
    for k in range(len(bins)):
        sel = which == k
        if sel.any():
            out[k] = float(ct[sel].mean())
    return out
