from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lungddpm.diffusion.process import DiffusionConfig, GaussianDiffusion
from lungddpm.diffusion.sample import SAMPLERS, sample

DATA = Path(__file__).parent / "reference"


def test_cosine_schedule_equals_lung_ddpm_buffers() -> None:
    buffers = json.loads((DATA / "lung_ddpm_schedule_buffers.json").read_text())["buffers"]
    d = GaussianDiffusion()
    assert torch.allclose(d.scheduler.betas, torch.tensor(buffers["betas"]), atol=1e-7)
    assert torch.allclose(d.alphas_cumprod, torch.tensor(buffers["alphas_cumprod"]), atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_forward_process_target_and_x0(prediction: str) -> None:
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, 4, generator=g)
    t = torch.tensor([0, 100, 249])
    a = d.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    x_t = d.add_noise(x0, noise, t)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    target = d.target(x0, noise, t)
    expected = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.allclose(d.predict_x0(x_t, t, target), x0, atol=1e-3)


def test_loss_is_zero_for_a_perfect_denoiser_and_l1_or_l2() -> None:
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(2, 1, 4, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)
    t = torch.tensor([10, 200])
    for loss in ("l1", "l2"):
        d = GaussianDiffusion(DiffusionConfig(loss=loss))
        assert d.loss(lambda x, tt, lay: noise, x0, None, t, noise).abs().max() < 1e-7
        off = d.loss(lambda x, tt, lay: noise + 0.5, x0, None, t, noise)
        assert torch.allclose(off, torch.full((2,), 0.5 if loss == "l1" else 0.25))


def test_a_bf16_output_is_scored_against_the_fp32_target() -> None:
    # under bf16 autocast the output lies on bf16's grid; a target rounded onto it too scored the rounded denoiser 0,
    # with no gradient, though it is a bf16 ulp off the true ε (and L1's gradient sign flipped near it)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(2, 1, 4, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g)
    t = torch.tensor([10, 200])
    rounded = noise.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = GaussianDiffusion(DiffusionConfig(loss="l1")).loss(lambda x, tt, lay: rounded, x0, None, t, noise)
    assert loss.dtype == torch.float32
    expected = (rounded.detach().float() - noise).abs().flatten(1).mean(1)
    assert expected.min() > 1e-4 and torch.allclose(loss, expected, rtol=1e-6)
    loss.sum().backward()
    sign = torch.sign(rounded.detach().float() - noise)
    assert torch.equal(torch.sign(rounded.grad.float()), sign)  # every voxel pulled towards the true ε


def test_a_sample_with_all_zero_loss_weights_adds_zero_not_nan() -> None:
    # a context model's crop that misses the generated region, outside weight 0: every weight of the sample is 0
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(3, 1, 4, 4, 4, generator=g), torch.randn(3, 1, 4, 4, 4, generator=g)
    weight = torch.rand(3, 1, 4, 4, 4, generator=g) + 0.5
    weight[1] = 0.0
    t = torch.tensor([10, 100, 200])
    d = GaussianDiffusion(DiffusionConfig(loss="l2"))
    off = torch.randn(3, 1, 4, 4, 4, generator=g, requires_grad=True)
    got = d.loss(lambda x, tt, lay: noise + off, x0, None, t, noise, weight)
    err = torch.nn.functional.mse_loss(noise + off.detach(), noise, reduction="none").flatten(1)
    w = weight.flatten(1)
    expected = (err * w).sum(1) / w.sum(1)  # the weighted mean of the others
    assert got[1].item() == 0.0
    assert torch.equal(got[[0, 2]], expected[[0, 2]])  # the others: bit-identical to before
    assert got.mean().item() == pytest.approx((expected[0] + expected[2]).item() / 3, rel=1e-6)  # the step's loss
    got.mean().backward()
    assert torch.isfinite(off.grad).all() and off.grad[1].abs().max() == 0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_min_snr_weight_is_the_x0_error_capped_at_gamma(prediction: str, loss: str) -> None:
    # Min-SNR-γ: a sample's weighted loss is its x̂_0 error times min(SNR, γ) under L2 (its square root under L1),
    # for ε and v alike; without snr_gamma the loss is the plain one
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(4, 1, 4, 4, 4, generator=g) * 2 - 1, torch.randn(4, 1, 4, 4, 4, generator=g)
    t = torch.tensor([0, 30, 120, 249])  # SNR about 5000, 50, 1.3, 4e-8: capped, capped, not, not
    off = torch.randn(4, 1, 4, 4, 4, generator=g) * 0.1
    plain = GaussianDiffusion(DiffusionConfig(prediction=prediction, loss=loss))
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction, loss=loss, snr_gamma=5.0))

    def model(x: torch.Tensor, tt: torch.Tensor, lay: None) -> torch.Tensor:
        return d.target(x0, noise, t) + off

    x0_hat = d.predict_x0(d.add_noise(x0, noise, t), t, model(x0, t, None))
    p = 1 if loss == "l1" else 2
    x0_err = (x0_hat - x0).abs().pow(p).flatten(1).mean(1)
    a = d.alphas_cumprod[t]
    cap = (a / (1 - a)).clamp(max=5.0).pow(p / 2)
    got = d.loss(model, x0, None, t, noise)
    assert torch.allclose(got[:3], cap[:3] * x0_err[:3], rtol=1e-3)  # the last x̂_0 is 1/sqrt(4e-8) x its error
    assert torch.equal(plain.loss(model, x0, None, t, noise) * d.timestep_weight(t), got)
    assert d.timestep_weight(t)[0] < 0.05 < d.timestep_weight(t)[2]  # the easy low-noise step weighs least
    assert torch.equal(plain.timestep_weight(t), torch.ones(4))
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        GaussianDiffusion(DiffusionConfig(snr_gamma=0.0))
    with pytest.raises(ValueError, match="linear needs timesteps > 20"):  # beta would reach 1, ᾱ 0: NaN weights
        GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=20))
    assert GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=21)).alphas_cumprod[-1] > 0


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 250), ("ddim", 20), ("dpm++", 20), ("dpm++", 250)])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_oracle_denoiser_recovers_the_clean_volume(sampler: str, steps: int, prediction: str) -> None:
    assert sampler in SAMPLERS
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    x0 = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(2)) * 2 - 1
    layout = torch.zeros(1, 2, 6, 6, 6)

    def oracle(x_t: torch.Tensor, t: torch.Tensor, lay: torch.Tensor) -> torch.Tensor:
        a = d.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    out = sample(oracle, d, layout, sampler, steps, torch.Generator().manual_seed(0))
    assert (out - x0).abs().max() < 1e-3


def test_unknown_sampler() -> None:
    with pytest.raises(ValueError, match="sampler 'euler' unknown"):
        sample(lambda *a: a[0], GaussianDiffusion(), torch.zeros(1, 2, 4, 4, 4), "euler", 5)
