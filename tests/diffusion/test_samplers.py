"""Sampler timesteps: every step lands on the next listed timestep's noise level; DDPM starts from pure noise at any
step count; the optional time-quadratic spacing (sample.timestep_spacing) keeps fine texture, the default is
today's DPM-Solver++."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from lungddpm.diffusion.process import DiffusionConfig, GaussianDiffusion
from lungddpm.diffusion.sample import Blend, Resample, make_sampler, sample, sampling_timesteps
from lungddpm.errors import SamplingError

T = 250  # diffusion.timesteps' default
GRID = (1, 1, 16, 16, 16)


def _trajectory(d: GaussianDiffusion, sampler: str, steps: int, **kw: object) -> list[tuple[int, float, float]]:
    """Deterministic sampling of a known x0 with the exact ε, from x0 noised with e to the first timestep: the sample
    stays in span{x0, e}, x = p x0 + q e, and at a call at t it should be at t's level, p = sqrt(ᾱ_t),
    q = sqrt(1 - ᾱ_t). Returns (t, p - sqrt(ᾱ_t), q - sqrt(1 - ᾱ_t)) per network call."""
    g = torch.Generator().manual_seed(0)
    x0, e = torch.rand(GRID, generator=g) - 0.5, torch.randn(GRID, generator=g)
    basis = torch.stack([x0.flatten(), e.flatten()], 1).double()
    a = d.alphas_cumprod
    seen = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        at = a[t].view(-1, 1, 1, 1, 1)
        p, q = torch.linalg.lstsq(basis, x_t.flatten().double()[:, None]).solution[:, 0].tolist()
        seen.append((int(t[0]), p - float(at.sqrt()), q - float((1 - at).sqrt())))
        return (x_t - at.sqrt() * x0) / (1 - at).sqrt()

    first = a[sampling_timesteps(T, steps, str(kw.get("timestep_spacing", "trailing")))[0]]
    sample(oracle, d, torch.zeros(1, 2, *GRID[2:]), sampler, steps, noise=first.sqrt() * x0 + (1 - first).sqrt() * e,
           **kw)  # fmt: skip
    return seen


@pytest.mark.parametrize("sampler,steps", [("ddim", 20), ("ddim", 30), ("dpm++", 20), ("ddim", 50)])
def test_each_step_lands_on_the_next_timesteps_noise_level(sampler: str, steps: int) -> None:
    # T=250, 20 steps: diffusers' DDIMScheduler stepped from 237 to 225 (237 - 250 // 20), the next call was at 224
    d = GaussianDiffusion()
    off = _trajectory(d, sampler, steps)
    assert [t for t, _, _ in off] == sampling_timesteps(T, steps)
    assert max(max(abs(dp), abs(dq)) for _, dp, dq in off) < 1e-4, off[:3]


def test_ddim_with_repaint_restarts_its_solver_and_still_recovers_x0() -> None:
    # a jump back renoises with fresh noise (outside span{x0, e}), so check the call schedule and the end point
    d = GaussianDiffusion()
    x0 = torch.rand(GRID, generator=torch.Generator().manual_seed(1)) - 0.5
    keep = torch.zeros(GRID, dtype=torch.bool)
    keep[..., :8] = True
    calls = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        at = d.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return (x_t - at.sqrt() * x0) / (1 - at).sqrt()

    out = sample(oracle, d, torch.zeros(1, 2, *GRID[2:]), "ddim", 20, torch.Generator().manual_seed(0),
                 blend=Blend(x0, keep), resample=Resample(5, 2))  # fmt: skip
    ts = sampling_timesteps(T, 20)
    # RePaint's schedule, aligned with the end (from the states before calls 9, 14 and 19 back by 5 calls; the jumps
    # were counted from the start, so the last calls were never resampled and the first jump went back to T - 1)
    assert calls == ts[:9] + ts[4:14] + ts[9:19] + ts[14:]
    assert calls == _repaint_calls(ts, 5, 2)
    assert (out - x0).abs().max() < 1e-4


def _repaint_calls(ts: list[int], jump_length: int, jump_n_sample: int) -> list[int]:
    """The network calls of RePaint's sampler (andreas128/RePaint, scheduler.get_schedule_jump with one sample per
    step: states x_t from t = n - 1 down to -1 = clean, a call from each t to t - 1, and after reaching a state t in
    0, j, 2j, ... < n - j, jump_n_sample - 1 jumps up by j) over our timesteps ``ts`` (n = len(ts)): state t is the
    input of our call ts[n - 1 - t]. diffusers' RePaintScheduler lays its jumps one level lower (after the call at
    each such level, down to re-noising the clean sample)."""
    n = len(ts)
    left = {j: jump_n_sample - 1 for j in range(0, n - jump_length, jump_length)}
    state, calls = n - 1, []
    while state >= 0:
        calls.append(ts[n - 1 - state])
        state -= 1
        if left.get(state, 0) > 0:
            left[state] -= 1
            state += jump_length
    return calls


@pytest.mark.parametrize(("steps", "jump_length", "jump_n_sample"), [(20, 2, 2), (20, 10, 3), (21, 10, 2), (50, 5, 2)])
def test_repaint_jumps_are_repaints_schedule(steps: int, jump_length: int, jump_n_sample: int) -> None:
    d = GaussianDiffusion()
    for sampler in ("ddpm", "ddim"):
        calls: list[int] = []

        def record(x_t: torch.Tensor, t: torch.Tensor, layout: torch.Tensor, calls: list[int] = calls) -> torch.Tensor:
            calls.append(int(t[0]))
            return torch.zeros_like(x_t)

        ref = torch.zeros(1, 1, 4, 4, 4)
        sample(record, d, torch.zeros(1, 2, 4, 4, 4), sampler, steps, torch.Generator().manual_seed(0),
               blend=Blend(ref, ref.bool()), resample=Resample(jump_length, jump_n_sample))  # fmt: skip
        assert calls == _repaint_calls(sampling_timesteps(T, steps), jump_length, jump_n_sample), sampler


def test_ddpm_starts_from_pure_noise_at_any_step_count() -> None:
    d = GaussianDiffusion()
    for steps in (20, 30, T):
        s = make_sampler(d, "ddpm")
        s.set_timesteps(steps)
        ts = s.timesteps.tolist()
        assert ts == sampling_timesteps(T, steps) and ts[0] == T - 1  # "leading" started at 228 for 20 steps
        assert [int(s.previous_timestep(t)) for t in ts] == [*ts[1:], -1]  # each step goes to the next listed
    assert sampling_timesteps(T, T) == list(range(T - 1, -1, -1))  # steps = T: the paper's chain, as before


def test_quadratic_spacing_is_dpm_solvers_and_has_steps_timesteps() -> None:
    assert sampling_timesteps(T, 20, "quadratic") == [
        249, 225, 202, 181, 160, 141, 123, 106, 91, 76, 63, 51, 41, 31, 23, 16, 10, 6, 2, 0
    ]  # fmt: skip
    assert sampling_timesteps(T, 20) == [
        249, 237, 224, 211, 199, 187, 174, 161, 149, 137, 124, 111, 99, 87, 74, 61, 49, 37, 24, 11
    ]  # fmt: skip
    for n in range(1, T + 1):  # rounding never merges two timesteps: the network runs exactly `steps` times
        ts = sampling_timesteps(T, n, "quadratic")
        assert len(ts) == n and ts[0] == T - 1 and all(a > b for a, b in pairwise(ts)) and ts[-1] >= 0
    assert sampling_timesteps(T, T, "quadratic") == list(range(T - 1, -1, -1))
    for total in (T, 1000):  # trailing too: arange's float end gave 62 timesteps for 61 steps, the last t = -1
        s = make_sampler(GaussianDiffusion(DiffusionConfig(timesteps=total)), "ddim")
        for n in range(1, total + 1):
            ts = sampling_timesteps(total, n)
            assert len(ts) == n and ts[0] == total - 1 and all(a > b for a, b in pairwise(ts)) and ts[-1] >= 0, n
            s.set_timesteps(n)  # diffusers' own trailing list, less its extra t = -1 where it has one
            assert ts == [t for t in s.timesteps.tolist() if t >= 0][:n], n
    with pytest.raises(ValueError, match="timestep_spacing 'linear' unknown"):
        sampling_timesteps(T, 20, "linear")
    with pytest.raises(ValueError, match="steps 251 must lie in 1..250"):
        sampling_timesteps(T, 251)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_quadratic_spacing_calls_the_network_steps_times_at_its_timesteps(sampler: str) -> None:
    d = GaussianDiffusion()
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return 0.1 * x

    sample(model, d, torch.zeros(1, 2, 4, 4, 4), sampler, 20, torch.Generator().manual_seed(0),
           timestep_spacing="quadratic")  # fmt: skip
    assert calls == sampling_timesteps(T, 20, "quadratic")
    if sampler != "ddpm":  # and each step lands on the next listed level
        off = _trajectory(d, sampler, 20, timestep_spacing="quadratic")
        assert max(max(abs(dp), abs(dq)) for _, dp, dq in off) < 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_61_trailing_steps_call_the_network_61_times_and_a_late_blend_still_pastes(sampler: str) -> None:
    """61 of T = 250 made 62 calls, the last at t = -1 (the blend noised the reference to t = T - 1 there); a
    blend_start_fraction whose first blended step rounded to the end blended nothing, not even the last step."""
    d = GaussianDiffusion()
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return 0.1 * x

    ref, keep = torch.rand(1, 1, 4, 4, 4) * 2 - 1, torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    out = sample(model, d, torch.zeros(1, 2, 4, 4, 4), sampler, 61, torch.Generator().manual_seed(0),
                 blend=Blend(ref, keep, 0.999))  # fmt: skip
    assert calls == sampling_timesteps(T, 61) and len(calls) == 61 and calls[-1] == 3
    assert torch.equal(out[keep], ref[keep])


def test_quadratic_spacing_keeps_fine_texture_that_trailing_smooths_away() -> None:
    # Gaussian data of std 0.03 (fine texture), the exact ε for the schedule: E[ε | x_t] = sqrt(1-ᾱ) x_t / (ᾱ s² + 1-ᾱ).
    # Trailing's last call is at t=11 (σ ≈ 0.087 > 0.03): the jump to σ = 0 returns a smoothed x̂0
    d = GaussianDiffusion()
    std = 0.03

    def exact(x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        a = d.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * std**2 + 1 - a)

    layout = torch.zeros(1, 2, 32, 32, 32)
    kept = {}
    for spacing in ("trailing", "quadratic"):
        out = sample(exact, d, layout, "dpm++", 20, torch.Generator().manual_seed(0), timestep_spacing=spacing)
        kept[spacing] = float(out.std()) / std
    assert kept["trailing"] < 0.4 and kept["quadratic"] > 0.85, kept  # measured 0.33 and 0.90


def test_default_dpm_solver_is_unchanged() -> None:
    # the default (trailing) is today's DPM-Solver++(2M): plain diffusers, step by step, bit for bit
    from diffusers import DPMSolverMultistepScheduler

    d = GaussianDiffusion()
    layout = torch.zeros(1, 2, 8, 8, 8)

    def model(x: torch.Tensor, t: torch.Tensor, lay: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.7 * x + 0.003 * t.view(-1, 1, 1, 1, 1) - 0.2)

    s = DPMSolverMultistepScheduler.from_config(
        d.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing="trailing", thresholding=True, sample_max_value=1.0,
    )  # fmt: skip
    s.set_timesteps(20)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    for t in s.timesteps:
        x = s.step(model(x, t.view(1), layout), t, x).prev_sample
    out = sample(model, d, layout, "dpm++", 20, torch.Generator().manual_seed(4))
    assert torch.equal(out, x)
    again = sample(model, d, layout, "dpm++", 20, torch.Generator().manual_seed(4), timestep_spacing="trailing")
    assert torch.equal(again, out)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_a_volume_that_comes_out_not_finite_is_refused_by_its_index(sampler: str) -> None:
    """A network whose output overflows for one volume of a batch: that volume is named, not returned (NaN was
    written as 0 HU, soft tissue, without a word)."""

    def model(x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        out = 0.1 * x
        out[1, 0, 0, 0, 0] = float("nan") if int(t[0]) < 100 else float("inf")
        return out

    layout = torch.zeros(3, 2, 4, 4, 4)
    with pytest.raises(SamplingError, match=r"volume\(s\) \[1\] of the batch of 3 came out not finite"):
        sample(model, GaussianDiffusion(), layout, sampler, 5, torch.Generator().manual_seed(0))
    with pytest.raises(SamplingError, match=r"overflowed under bfloat16 autocast or"):
        sample(model, GaussianDiffusion(), layout, sampler, 5, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(sample(lambda x, t, y: 0.1 * x, GaussianDiffusion(), layout, sampler, 5)).all()
