"""The optimizer update shared by the training loop and the benchmarks, and the backend settings of a device."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lungddpm.diffusion.device import tune_backends
from lungddpm.diffusion.optim import EMA, apply_update, load_optimizer_state, make_optimizer


def _setup(seed: int = 0, fused: bool = False) -> tuple[nn.Module, torch.optim.AdamW, EMA]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv3d(4, 1, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=fused)
    return model, opt, EMA(model, 0.9, warmup=False)


def _backward(model: nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-1, 1, 2 * 2 * 4**3).reshape(2, 2, 4, 4, 4)
    loss = (model(x) * scale).abs().mean()
    loss.backward()
    return loss.detach()


def test_a_finite_update_steps_clips_and_moves_the_ema_toward_the_weights() -> None:
    model, opt, ema = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    loss = _backward(model, scale=1e4)  # a large gradient, so clipping at 0.5 acts
    raw = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    stepped, norm = apply_update(model, opt, torch.amp.GradScaler("cpu", enabled=False), ema, 0, loss, 0.5)
    assert stepped and float(norm) == pytest.approx(float(raw)) and float(raw) > 0.5
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    for b, p, e in zip(before, model.parameters(), ema.model.parameters()):
        assert not torch.equal(b, p.detach())
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())  # decay 0.9, no warm-up


def test_a_step_that_is_not_finite_changes_nothing() -> None:
    model, opt, ema = _setup()
    weights = [p.detach().clone() for p in model.parameters()]
    averaged = [p.clone() for p in ema.model.parameters()]
    _backward(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stepped, _ = apply_update(model, opt, scaler, ema, 0, torch.tensor(float("nan")), 1.0)
    assert not stepped and opt.state_dict()["state"] == {}
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(averaged, ema.model.parameters()))
    next(model.parameters()).grad[0] = float("inf")  # a finite loss with an infinite gradient: refused too
    assert not apply_update(model, opt, scaler, ema, 0, torch.tensor(1.0), 1.0)[0]
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_an_fp16_step_the_scaler_skips_leaves_the_ema_as_it_was() -> None:
    model, opt, ema = _setup()
    with torch.no_grad():
        torch._foreach_add_(list(ema.model.parameters()), 1.0)  # an average apart from the weights
    weights = [p.detach().clone() for p in model.parameters()]
    averaged = [p.clone() for p in ema.model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.linspace(-1, 1, 2 * 2 * 4**3).reshape(2, 2, 4, 4, 4)
    loss = model(x).abs().mean()
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0] = float("inf")  # fp16 overflowed: a finite loss, an infinite gradient
    stepped, _ = apply_update(model, opt, scaler, ema, 0, loss.detach(), 1.0)
    assert stepped and scaler.get_scale() == 2.0**15  # the loop goes on with a lower scale
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(averaged, ema.model.parameters()))  # updated, it moved to weights
    loss = model(x).abs().mean()
    scaler.scale(loss).backward()  # the next step is finite: weights and EMA move
    assert apply_update(model, opt, scaler, ema, 1, loss.detach(), 1.0)[0] and scaler.get_scale() == 2.0**15
    assert not all(torch.equal(a, b) for a, b in zip(averaged, ema.model.parameters()))


def test_a_fused_optimizers_state_resumes_an_unfused_one_and_both_step_alike() -> None:
    """The GPU trains with fused AdamW, the CPU without: a checkpoint of either resumes on the other."""
    (a, opt_a, _), (b, opt_b, _) = _setup(fused=True), _setup(fused=False)

    def step_alike(*pairs: tuple[nn.Module, torch.optim.Optimizer], steps: int = 1) -> None:
        for _ in range(steps):
            for model, opt in pairs:
                opt.zero_grad()
                _backward(model)
                opt.step()
        for p, q in zip(pairs[0][0].parameters(), pairs[1][0].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    step_alike((a, opt_a), (b, opt_b), steps=3)
    c, opt_c, _ = _setup(fused=False)
    c.load_state_dict(a.state_dict())
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: loading shares the tensors
    step_alike((a, opt_a), (c, opt_c))
    assert make_optimizer(c.parameters(), 1e-4, 0.0, torch.device("cpu")).defaults["fused"] is False


def test_loading_a_state_keeps_the_settings_the_optimizer_was_built_with() -> None:
    """A CPU checkpoint (unfused, no weight decay) resumed where AdamW is fused with weight decay: moments and step
    counts come from the checkpoint, the settings stay today's, and the step counts move where fused needs them."""
    a, opt_a, _ = _setup(fused=False)
    for group in opt_a.param_groups:
        group.update(weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6, lr=5e-3)
    _backward(a)
    opt_a.step()
    b, _, _ = _setup(fused=False)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    load_optimizer_state(opt_b, copy.deepcopy(opt_a.state_dict()))
    (group,) = opt_b.param_groups
    assert (group["weight_decay"], group["betas"], group["eps"], group["fused"]) == (0.1, (0.9, 0.999), 1e-8, True)
    assert group["lr"] == 5e-3 and group["params"] == list(b.parameters())  # the lr: the schedule's to set
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sb["step"]) == 1.0 and sb["step"].dtype == torch.float32 and sb["step"].device == q.device
    _backward(b)
    opt_b.step()  # the fused kernel accepts the loaded state


def test_moments_saved_in_another_memory_layout_step_as_the_parameters_do() -> None:
    """train.channels_last may change on resume; fused AdamW then applied contiguous moments to channels-last
    weights element by element in memory (22 % off on the reviewer's UNet; CUDA's fused kernel refuses them)."""
    a, opt_a, _ = _setup(fused=False)
    for _ in range(3):
        opt_a.zero_grad()
        _backward(a)
        opt_a.step()
    reference = copy.deepcopy((a, opt_a))
    b = copy.deepcopy(a).to(memory_format=torch.channels_last_3d)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    load_optimizer_state(opt_b, copy.deepcopy(opt_a.state_dict()))
    p = next(b.parameters())
    assert p.stride() != next(a.parameters()).stride() and opt_b.state[p]["exp_avg"].stride() == p.stride()
    for model, opt in ((b, opt_b), reference):
        opt.zero_grad()
        _backward(model)
        opt.step()
    for p, q in zip(b.parameters(), reference[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(b.parameters(), reference[0].parameters()):
        torch.testing.assert_close(opt_b.state[p]["exp_avg"], reference[1].state[q]["exp_avg"])


def test_cudnn_times_its_algorithms_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    tune_backends(torch.device("cuda"))  # a flag only: no GPU is needed to set it
    assert torch.backends.cudnn.benchmark is True


def test_the_ema_schedule_of_lung_ddpms_trainer_by_values() -> None:
    """``EMA(every=k, start=s)`` against a transcription of Lung-DDPM's ``Trainer.step_ema`` (after optimizer step
    i, 0-based: if i % update_ema_every == 0, copy the weights while i < step_start_ema, else average them with
    ``old * beta + (1 - beta) * new``); the defaults (every 1, start 0) keep the warm-up average of before."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ours, warm = EMA(model, 0.9, warmup=False, every=3, start=6), EMA(model, 0.9, warmup=True)
    theirs, before = copy.deepcopy(model), copy.deepcopy(model)
    for i in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model, i)
        warm.update(model, i)
        if i % 3 == 0:
            for t, p in zip(theirs.parameters(), model.parameters()):
                t.data = p.data.clone() if i < 6 else t.data * 0.9 + (1 - 0.9) * p.data
        for b, p in zip(before.parameters(), model.parameters()):  # the warm-up average of before this change
            b.data = b.data + (1 - min(0.9, (1 + i) / (10 + i))) * (p.data - b.data)
        if i == 5:  # copies so far: equal to the weights of step 3, not of step 5
            assert not torch.equal(ours.model.weight, model.weight)
            assert torch.equal(ours.model.weight, theirs.weight)
    for a, b in zip(ours.model.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(warm.model.parameters(), before.parameters()):
        torch.testing.assert_close(a, b)
