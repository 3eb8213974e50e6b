"""Input conventions: lungddpm's HU window and the released Lung-DDPM model's per-column min-max convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungddpm.diffusion.convention import (
    ConventionError,
    LungDDPMConvention,
    WindowConvention,
    convention_from_checkpoint,
)
from lungddpm.diffusion.encoding import hu_to_model, layout_to_channels, model_to_hu


def case(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth random HU volume [Z, Y, X] (int16), a layout with lung and nodule, a keep mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    ct = (300 * np.sin(3 * z + 2 * y) * np.cos(4 * x) - 500 + rng.normal(0, 30, shape)).astype(np.int16)
    layout = np.zeros(shape, np.uint8)
    layout[(y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.1] = 1
    layout[(z - 0.5) ** 2 + (y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.02] = 2
    return ct, layout, layout == 0


def test_default_convention_is_the_training_code_of_lung_ddpm() -> None:
    """Same grid: per-S2-index min-max of the (S0, S1, S2) array, arranged (S0, S2, S1), x2-1; hard layouts."""
    ct, layout, keep = case((16, 16, 16))
    inp = LungDDPMConvention(size=16).to_model(ct, layout, keep)
    a = ct.astype(np.float64)
    lo, hi = a.min(axis=(0, 1)), a.max(axis=(0, 1))  # one value per index of the last axis S2
    expected = ((a - lo) / (hi - lo)).transpose(0, 2, 1) * 2 - 1
    assert inp.image.shape == (1, 16, 16, 16) and np.allclose(inp.image[0], expected, atol=1e-6)
    assert np.allclose(inp.image[0].min(axis=(0, 2)), -1) and np.allclose(inp.image[0].max(axis=(0, 2)), 1)
    onehot = np.stack([layout == 1, layout == 2]).transpose(0, 1, 3, 2) * 2.0 - 1
    assert np.array_equal(inp.layout, onehot) and np.array_equal(inp.keep[0], keep.transpose(0, 2, 1))
    rec = inp.record["intensity"]
    assert inp.record["convention"] == "lung-ddpm" and rec["column_axis"] == 2
    assert rec["column_min_hu"] == lo.tolist() and rec["column_max_hu"] == hi.tolist()


def test_resizing_follows_the_original_order_of_operations() -> None:
    """The original scales, transposes to (S1, S2, S0), resizes trilinearly to size³, x2-1, then arranges
    (S0, S2, S1); resizing before or after the transposes is the same. Layouts become soft."""
    ct, layout, keep = case((20, 24, 12))
    conv = LungDDPMConvention(size=16)
    inp = conv.to_model(ct, layout, keep)
    scaled, _, _ = conv.scale(ct)
    t = torch.from_numpy(scaled.transpose(1, 2, 0).copy())[None, None]  # (S1, S2, S0)
    original = F.interpolate(t, size=(16, 16, 16), mode="trilinear", align_corners=False)[0, 0] * 2 - 1
    assert np.allclose(inp.image[0], original.permute(2, 1, 0).numpy(), atol=1e-6)  # -> (S0, S2, S1)
    assert inp.layout.shape == (2, 16, 16, 16) and inp.layout.min() >= -1 and inp.layout.max() <= 1
    assert ((inp.layout > -0.99) & (inp.layout < 0.99)).any()  # soft at the edges
    assert inp.keep.dtype == bool and inp.keep.shape == (1, 16, 16, 16)


@pytest.mark.parametrize("axes,flip", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))])
def test_scaling_inverts_exactly_on_the_model_grid(axes: tuple[int, int, int], flip: tuple[bool, bool, bool]) -> None:
    ct, layout, keep = case((16, 16, 16), seed=1)
    conv = LungDDPMConvention(axes, flip, 16)
    inp = conv.to_model(ct, layout, keep)
    assert inp.record["intensity"]["column_axis"] == axes[2]
    assert np.array_equal(np.round(conv.to_hu(inp.image[0], inp)), ct)  # same grid: the inverse is exact
    # per column: our axis axes[2] indexes the columns, each spans [-1, 1]
    other = tuple(a for a in range(3) if a != axes[2])
    back = inp.image[0].transpose(0, 2, 1)  # network (S0, S2, S1) -> (S0, S1, S2)
    assert np.allclose(back.min(axis=(0, 1)), -1) and np.allclose(back.max(axis=(0, 1)), 1)
    assert np.array_equal(conv.from_original(conv.to_original(ct)), ct)
    assert np.allclose(ct.min(axis=other), conv.column_range(ct)[0][:: -1 if flip[2] else 1])


def test_inverse_is_defined_on_the_model_grid_before_resampling_back() -> None:
    """With resizing, the per-column scaling is undone on the model grid (column ranges resampled along S2 like the
    image): when every column spans the same range the scaling is one affine map, so the inverse must give exactly
    the trilinear resize of the HU volume; the case-grid result has the case's shape and stays close to it."""
    ct, layout, keep = case((20, 24, 12), seed=2)
    ct[0, 0, :], ct[-1, -1, :] = -1024, 600  # every column spans [-1024, 600]
    conv = LungDDPMConvention(size=16)
    inp = conv.to_model(ct, layout, keep)
    hu = conv.model_grid_hu(inp.image[0], inp)
    t = torch.from_numpy(ct.astype(np.float32).transpose(0, 2, 1).copy())[None, None]
    resized = F.interpolate(t, size=(16, 16, 16), mode="trilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(hu, resized, atol=1e-2)
    back = conv.to_hu(inp.image[0], inp)
    assert back.shape == ct.shape and back.dtype == np.float32
    assert np.median(np.abs(back - ct)) < 60  # two trilinear resamplings of a noisy volume
    # model outputs beyond [-1, 1] are clipped to the column range
    assert conv.model_grid_hu(np.full((16, 16, 16), 3.0, np.float32), inp).max() <= 600 + 1e-3


def test_constant_columns_and_bad_settings() -> None:
    ct = np.full((8, 8, 8), -1000, np.int16)
    ct[..., 4:] = np.arange(8 * 8 * 4).reshape(8, 8, 4)
    conv = LungDDPMConvention(size=8)
    inp = conv.to_model(ct, np.zeros_like(ct, np.uint8), np.ones(ct.shape, bool))
    assert np.isfinite(inp.image).all() and np.all(inp.image[0][:, :4] == -1)  # a constant column maps to -1
    assert np.array_equal(np.round(conv.to_hu(inp.image[0], inp)), ct)
    with pytest.raises(ConventionError, match="permutation"):
        LungDDPMConvention(axes=(0, 0, 2))


def test_window_convention_is_lungddpms_mapping_and_checkpoints_name_theirs() -> None:
    ct, layout, keep = case((8, 8, 8))
    conv = WindowConvention((-1000.0, 400.0))
    inp = conv.to_model(ct, layout, keep)
    assert np.array_equal(inp.image[0], hu_to_model(ct, (-1000, 400))) and np.array_equal(
        inp.layout, layout_to_channels(layout)
    )
    assert np.array_equal(conv.to_hu(inp.image[0], inp), model_to_hu(inp.image[0], (-1000, 400)))
    assert inp.record == {"convention": "window", "hu_window": [-1000.0, 400.0]}
    assert convention_from_checkpoint({"hu_window": [-1000, 400]}, "x.pt") == conv
    lung = LungDDPMConvention((1, 0, 2), (True, False, False), 32)
    assert convention_from_checkpoint({"convention": lung.to_dict()}, "x.pt") == lung
    with pytest.raises(ConventionError, match="x.pt: the checkpoint names no input convention"):
        convention_from_checkpoint({}, "x.pt")
    with pytest.raises(ConventionError, match="unknown input convention 'other'"):
        convention_from_checkpoint({"convention": {"name": "other"}}, "x.pt")
