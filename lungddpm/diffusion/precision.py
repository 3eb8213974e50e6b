"""Numerical precision: the autocast dtype a ``precision`` setting means on a device, the autocast context, the
CPU bf16 gradient probe, and how far a precision or a compiled network moves a forward."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LungDDPMError

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), so that oneDNN's bf16 kernels are faster than
    fp32 (about 2x measured for the UNet) instead of emulated (slower)."""
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(callable(p) for p in probes):
        return any(p() for p in probes)  # type: ignore[misc]
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.is_file() else set()
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (NVIDIA compute capability >= 8, Ampere on; ROCm): cuDNN's bf16
    convolutions need it, an older GPU (V100, T4) falls back to slow kernels."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; otherwise the autocast dtype (``auto``: bf16 on a GPU or CPU with native bf16, else fp32)."""
    if precision == "auto":
        native = (device.type == "cuda" and gpu_has_native_bf16(device)) or (
            device.type == "cpu" and cpu_has_native_bf16()
        )
        if device.type == "cuda" and not native:
            log.info("precision auto: this GPU has no native bf16 (compute capability < 8): fp32; fp16 may be faster")
        return torch.bfloat16 if native else None
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@functools.cache  # once per process
def _warn_emulated_bf16() -> None:
    log.warning(
        "precision bf16 on a CPU without native bf16 (AMX or AVX512-BF16): oneDNN emulates it, slower than fp32 "
        "(the speed benchmark's 16^3 network: 76 s against 16 s on an AVX2 CPU); precision auto uses fp32 here"
    )


def precision_name(dtype: torch.dtype | None) -> str:
    """The config's name of a :func:`resolve_precision` result (what ``auto`` became): fp32, bf16 or fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


CONV_GRAD_TOLERANCE = 0.05  # bf16's own error on these probes is about 4e-3; a wrong kernel is off by ~1 or not finite
PROBE_MAX_EDGE = 6  # probe shapes are capped at this many voxels per axis, so the float64 reference stays cheap


# A convolution as the probe takes it: (input grid (D, H, W), in channels, out channels, kernel, stride, channels-last)
ConvCase = tuple[tuple[int, int, int], int, int, int, int, bool]


def network_convolutions(model: nn.Module, grid: Sequence[int], channels_last: bool) -> list[ConvCase]:
    """Every distinct 3D convolution ``model`` (a layout-conditioned UNet with a ``cfg``) runs on a ``grid``
    (D, H, W) input: a forward of a copy built on the meta device (no memory, no arithmetic) with hooks."""
    cfg = model.cfg  # type: ignore[union-attr]
    with torch.device("meta"):
        net = type(model)(cfg)
    cases: set[ConvCase] = set()

    def record(conv: nn.Conv3d, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        shape = tuple(int(s) for s in inputs[0].shape[2:])
        cases.add((shape, conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], channels_last))  # type: ignore[arg-type]

    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            module.register_forward_hook(record)
    with torch.device("meta"), torch.no_grad():
        net(torch.zeros(1, cfg.in_channels, *grid), torch.zeros(1, dtype=torch.long),
            torch.zeros(1, cfg.layout_channels, *grid))  # fmt: skip
    return sorted(cases)


@functools.cache
def bf16_conv_grad_error(
    shape: tuple[int, int, int], cin: int, cout: int, kernel: int = 3, stride: int = 1, channels_last: bool = False
) -> float:
    """This CPU's bf16 gradients (weight and input, by autograd under autocast, in the given memory format) of a
    biased ``kernel``³ convolution (padding kernel // 2) on a (2, cin, *shape) input: the larger error against
    float64, relative to the largest value (nan = not finite). oneDNN in torch 2.14 on an AVX512-BF16 CPU returns
    garbage when the depth is 2, for some channel counts only (docs/training.md: Mixed precision). The global RNG is
    left as it was (the layers' initialisation drew from it, so a training's dropout depended on whether this ran
    before)."""
    with torch.random.fork_rng(devices=[]):
        return _conv_grad_error(shape, cin, cout, kernel, stride, channels_last)


def _conv_grad_error(
    shape: tuple[int, int, int], cin: int, cout: int, kernel: int, stride: int, channels_last: bool
) -> float:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(2, cin, *shape, generator=g)
    ref = nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2).double()
    ref.load_state_dict(conv.state_dict())
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    dy = torch.randn(y64.shape, generator=g)
    y64.backward(dy.double())
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=fmt)
    x16 = x.contiguous(memory_format=fmt).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x16)
    y.backward(dy.to(y.dtype))
    pairs = ((conv.weight.grad, ref.weight.grad), (x16.grad, x64.grad))
    if not all(torch.isfinite(got).all() for got, _ in pairs):  # type: ignore[arg-type]
        return float("nan")
    return max(float((got.double() - want).abs().max() / want.abs().max()) for got, want in pairs)  # type: ignore[union-attr]


def checked_cpu_bf16(
    dtype: torch.dtype | None,
    device: torch.device,
    convs: Callable[[], Sequence[ConvCase]],
    precision: str,
    probe: Callable[..., float] = bf16_conv_grad_error,
) -> torch.dtype | None:
    """``dtype`` for training, unless this CPU's bf16 convolution gradients are wrong for one of the network's
    ``convs()`` (:func:`network_convolutions`, listed only when bf16 on a CPU is asked for; probed at their grid
    capped to ``PROBE_MAX_EDGE`` voxels per axis): then fp32 for ``precision: auto`` (with a warning), an error for an
    explicit ``bf16``. GPUs and fp32 / fp16 pass unchecked."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return dtype
    for shape, cin, cout, kernel, stride, channels_last in convs():
        capped = tuple(min(s, PROBE_MAX_EDGE) for s in shape)
        err = probe(capped, cin, cout, kernel, stride, channels_last)
        if err <= CONV_GRAD_TOLERANCE:  # False for nan
            continue
        layout = ", channels-last" if channels_last else ""
        why = (
            f"this CPU's bf16 convolution gradients are wrong for the network's {kernel}x{kernel}x{kernel} "
            f"convolution of {cin} -> {cout} channels (stride {stride}{layout}) on {shape[0]}x{shape[1]}x{shape[2]} "
            f"voxels (relative error {err:.2g} against float64; bf16's own is about 4e-3, a oneDNN fault with a "
            "depth of 2)"
        )
        fix = "choose preprocess.size / train.crop / model.channel_mult so that no level has a depth of 2"
        if precision == "auto":
            log.warning("%s: training in fp32 instead; to train in bf16, %s", why, fix)
            return None
        raise LungDDPMError(f"{why}; set train.precision (lesion.train.precision) to auto or fp32, or {fix}")
    return dtype


def forward_differences(
    eager: nn.Module,
    compiled: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    """One no-grad forward each, as largest |difference| over the reference's largest |value|: the compiled network
    against the eager one under ``dtype`` autocast (``max_rel_diff_vs_eager``; nan: the compiled one is not finite)
    and, for a lower precision, both against the eager fp32 forward (``eager_vs_fp32``, the precision's own error on
    this device and so the yardstick for ``compiled_vs_fp32``)."""

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))

    with torch.no_grad():
        with autocast(device, dtype):
            low, got = eager(*inputs).float(), compiled(*inputs).float()
        if not torch.isfinite(low).all():
            raise LungDDPMError("speed: the eager forward is not finite; the comparison means nothing")
        out = {"max_rel_diff_vs_eager": rel(got, low)}
        if dtype is not None:
            ref = eager(*inputs).float()
            out |= {"eager_vs_fp32": rel(low, ref), "compiled_vs_fp32": rel(got, ref)}
    return out
