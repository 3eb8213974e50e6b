from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import TINY, randomise

from lungddpm.diffusion.unet import UNet3D, UNetConfig, count_parameters, timestep_embedding

DATA = Path(__file__).parent / "reference"


def test_paper_architecture_matches_lung_ddpm_state_dict() -> None:
    model = UNet3D(UNetConfig())
    assert count_parameters(model) == 40_226_433
    manifest = json.loads((DATA / "lung_ddpm_ema_keys.json").read_text())["keys"]
    theirs = {k.removeprefix("denoise_fn."): v for k, v in manifest.items() if k.startswith("denoise_fn.")}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs


def test_shapes_zero_init_and_layout_conditioning() -> None:
    torch.manual_seed(0)
    model = UNet3D(TINY)
    x, layout = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 2, 16, 16, 16)
    t = torch.tensor([0, 249])
    out = model(x, t, layout)
    assert out.shape == (2, 1, 16, 16, 16)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    randomise(model)
    a, b = model(x, t, layout), model(x, t, -layout)
    assert not torch.allclose(a, b)  # the layout reaches the output
    assert not torch.allclose(model(x, torch.tensor([5, 5]), layout), model(x, torch.tensor([200, 200]), layout))


def test_bad_inputs_are_refused() -> None:
    model = UNet3D(TINY)
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.randn(1, 1, 15, 16, 16), torch.tensor([1]), torch.randn(1, 2, 15, 16, 16))
    with pytest.raises(ValueError, match="4 input channels, expected 1 image \\+ 2 layout"):
        model(torch.randn(1, 1, 16, 16, 16), torch.tensor([1]), torch.randn(1, 3, 16, 16, 16))


def test_checkpointing_channels_last_and_bf16_agree() -> None:
    torch.manual_seed(0)
    model = randomise(UNet3D(TINY))
    x, layout, t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 2, 16, 16, 16), torch.tensor([17])
    ref = model(x, t, layout)
    ref.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ckpt = UNet3D(UNetConfig(**{**TINY.__dict__, "use_checkpoint": True}))
    ckpt.load_state_dict(model.state_dict())
    out = ckpt(x, t, layout)
    out.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(grads, ckpt.parameters()))
    cl = model.to(memory_format=torch.channels_last_3d)
    out_cl = cl(x.contiguous(memory_format=torch.channels_last_3d), t, layout)
    assert torch.allclose(out_cl, ref, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = model(x, t, layout)
    assert out_bf16.dtype == torch.bfloat16
    assert (out_bf16.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_multi_head_attention_and_embedding() -> None:
    model = UNet3D(UNetConfig(**{**TINY.__dict__, "num_heads": 2}))
    assert model(torch.randn(1, 1, 16, 16, 16), torch.tensor([3]), torch.randn(1, 2, 16, 16, 16)).shape[1] == 1
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert emb.shape == (2, 8) and torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


@pytest.mark.parametrize("period", [1000.0, 10000.0])
def test_time_embedding_is_the_sinusoid_of_its_period(period: float) -> None:
    """cos half then sin half of t x period^(-k / half), k = 0..half-1 (Lung-DDPM: period 1000)."""
    import numpy as np

    t, dim = torch.tensor([0, 1, 17, 249]), 8
    freqs = period ** (-np.arange(dim // 2) / (dim // 2))
    args = t.numpy()[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = timestep_embedding(t, dim, period).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
    assert got[2, 1] == pytest.approx(np.cos(17 * period**-0.25), abs=2e-5)  # t = 17, second frequency


def test_the_network_uses_its_configured_period() -> None:
    torch.manual_seed(0)
    ours = randomise(UNet3D(TINY))
    theirs = UNet3D(UNetConfig(**{**TINY.__dict__, "time_max_period": 1000.0}))
    theirs.load_state_dict(ours.state_dict())
    x, layout, t = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 2, 16, 16, 16), torch.tensor([120])
    assert not torch.allclose(ours(x, t, layout), theirs(x, t, layout), atol=1e-4)
    assert torch.equal(ours(x, torch.tensor([0]), layout), theirs(x, torch.tensor([0]), layout))  # t = 0: same
