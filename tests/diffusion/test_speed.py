"""The side-by-side speed benchmark (`lungddpm bench speed`), on a stand-in checkout of the original.

CI has no Lung-DDPM checkout (no network, and its code is never committed), so the stand-in package below has
the original's layout (``diffusion_model/unet.py`` with ``create_model`` as its ``train.py`` calls it, a relative
import of ``modules``) and the original's calling convention (one tensor: image and layout concatenated). Against
the real checkout the benchmark's parity line measured 1.4e-6 at 32³ (paper network, same weights).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from support import THREADS, randomise

from lungddpm.config import Config
from lungddpm.diffusion import precision
from lungddpm.diffusion.precision import forward_differences
from lungddpm.diffusion.speed import (
    Case,
    Mode,
    build_pair,
    largest_batch,
    markdown_table,
    merge_rows,
    run_mode,
)
from lungddpm.diffusion.unet import UNet3D, UNetConfig
from lungddpm.errors import LungDDPMError

MODULES = '''
import torch
from lungddpm.diffusion.unet import UNet3D, UNetConfig


class UNetModel(UNet3D):
    """The original's call: forward(cat([x, condition]), t); its embedding period 1000."""

    def __init__(self, image_size, model_channels):
        super().__init__(UNetConfig(image_size=image_size, model_channels=model_channels, time_max_period=1000.0))
        for p in self.parameters():  # guided-diffusion's zero_module on the output and attention projections
            if p.dim() > 1 and p.shape[0] == 1:
                torch.nn.init.zeros_(p)

    def forward(self, x, timesteps):
        return super().forward(x[:, :1], timesteps, x[:, 1:])
'''
UNET = """
from .modules import UNetModel


def create_model(image_size, num_channels, num_res_blocks, channel_mult="", in_channels=1, out_channels=1):
    assert (num_res_blocks, in_channels, out_channels) == (1, 3, 1), "called as Lung-DDPM's train.py calls it"
    return UNetModel(image_size, num_channels)
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    pkg = tmp_path / "Lung-DDPM" / "diffusion_model"
    pkg.mkdir(parents=True)
    (pkg / "modules.py").write_text(MODULES)
    (pkg / "unet.py").write_text(UNET)
    return pkg.parent


def test_both_networks_get_the_same_nonzero_weights(checkout: Path) -> None:
    original, ours = build_pair(checkout, image_size=128, channels=32)
    g = torch.Generator().manual_seed(0)
    x, layout, t = (
        torch.randn(2, 1, 16, 16, 16, generator=g),
        torch.randn(2, 2, 16, 16, 16, generator=g),
        torch.tensor([3, 200]),
    )
    with torch.no_grad():
        a, b = original(x, t, layout), ours(x, t, layout)
    assert a.abs().max() > 1e-3  # the zero-initialised output conv was randomised
    assert torch.allclose(a, b, atol=1e-6)
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in ours.parameters())


def test_modes_parse_and_bad_ones_say_the_grammar() -> None:
    m = Mode.parse("ours:bf16:reduce-overhead:device-rng:checkpoint")
    assert (m.network, m.precision, m.compile, m.channels_last, m.device_rng, m.checkpoint) == (
        "ours", "bf16", "reduce-overhead", False, True, True)  # fmt: skip
    assert m.label == "ours bf16 compile=reduce-overhead device-rng checkpoint"
    assert Mode.parse("original:fp32").label == "original fp32"
    for bad in ("ours", "theirs:fp32", "ours:fp64", "ours:bf16:fast"):
        with pytest.raises(LungDDPMError, match="expected NETWORK:PRECISION"):
            Mode.parse(bad)
    with pytest.raises(LungDDPMError, match="runs as released"):
        Mode.parse("original:bf16:default")


def test_bench_train_counts_the_updates_the_finite_check_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed step whose loss is not finite makes no update (no AdamW, no EMA): the row says how many."""
    from lungddpm.config import load_config
    from lungddpm.diffusion.bench import bench_train
    from lungddpm.diffusion.process import GaussianDiffusion

    tiny = {"model": {"model_channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "attention_resolutions": []}}
    cfg = load_config(REPO / "config/config.yaml", tiny)
    row = bench_train(cfg, 8, 1, "fp32", False, False, 2, 1)
    assert row["updates_skipped"] == 0 and row["peak_memory_kind"] in (
        "process peak RSS",
        "process max RSS since its start",
    )
    real_loss = GaussianDiffusion.loss
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, *a, **k: real_loss(self, *a, **k) * float("nan"))
    assert bench_train(cfg, 8, 1, "fp32", False, False, 2, 1)["updates_skipped"] == 2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through Linux's /proc")
def test_each_measurement_starts_a_new_cpu_peak() -> None:
    """A row's peak is its own: the process's peak RSS is reset before it (it was the max RSS of the whole run)."""
    import numpy as np

    from lungddpm.diffusion.profiling import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched
    high = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < high - 300


def test_largest_batch_doubles_then_bisects_to_the_largest_that_fits() -> None:
    tried: list[int] = []

    def attempt(limit: int):
        def try_batch(b: int):
            tried.append(b)

            def step() -> None:
                if b > limit:
                    raise torch.OutOfMemoryError("CUDA out of memory")

            return step

        return try_batch

    assert largest_batch(attempt(5)) == 5 and tried == [1, 2, 4, 8, 6, 5]  # not the power of two below
    tried.clear()
    assert largest_batch(attempt(7)) == 7 and tried == [1, 2, 4, 8, 6, 7]
    assert largest_batch(attempt(1000), limit=256) == 256
    with pytest.raises(LungDDPMError, match="not even batch 1"):
        largest_batch(attempt(0))


def test_compiled_forward_matches_eager_without_graph_breaks() -> None:
    """Inductor on a small UNet3D, fullgraph (what CUDA graphs need), bf16 autocast: equal to eager within bf16's
    tolerance."""
    model = UNet3D(UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), norm_groups=4)).eval()
    randomise(model)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 1, 8, 8, 8, generator=g), torch.tensor([7]), torch.randn(1, 2, 8, 8, 8, generator=g))
    compiled = torch.compile(model, fullgraph=True)
    cpu = torch.device("cpu")
    good = forward_differences(model, compiled, inputs, cpu, torch.bfloat16)
    bad = forward_differences(model, lambda *a: model(*a) * 1.05, inputs, cpu, torch.bfloat16)
    assert good["max_rel_diff_vs_eager"] < 2e-2  # bf16: 8 mantissa bits
    assert bad["max_rel_diff_vs_eager"] > 3e-2  # can fail
    low, comp = good["eager_vs_fp32"], good["compiled_vs_fp32"]  # bf16's own error, the yardstick
    assert 1e-4 < low < 2e-2 and comp < 2 * low + 1e-3
    assert bad["compiled_vs_fp32"] > 4e-2


def test_a_row_has_every_number_and_the_table_shows_it(checkout: Path, tmp_path: Path) -> None:
    case = Case(size=16, batch=1, repeats=1, warmup=1, sampler_steps=2, channels=32, profile=str(tmp_path))
    row = run_mode(Mode.parse("ours:fp32"), checkout, case, threads=THREADS)
    for key in ("train_step_s", "forward_s", "sample_volume_s", "peak_train_mb", "peak_sample_mb"):
        assert row[key] > 0, key
    assert row["weights_finite"]  # the training loop's update stepped (fp32: no oneDNN fault at 16³)
    profiled = (tmp_path / "ours_fp32_16_1.txt").read_text()  # where the time goes: convolutions near the top
    sections = profiled.split("=== ")[1:]
    assert [s.split(" (")[0] for s in sections] == ["train step", "forward", "DPM-Solver++-2 batch"]
    assert all("conv" in "".join(s.split("\n")[5:8]) for s in sections), profiled[:3000]
    assert row["mode"] == "ours fp32" and row["batch"] == 1 and row["peak_memory_kind"] == "process peak RSS"
    compiled = {"mode": "ours bf16 compile=default", "max_rel_diff_vs_eager": 3e-3, "eager_vs_fp32": 4e-3}
    table = markdown_table([{**row, **compiled, "compiled_vs_fp32": 5e-3}, row])
    lines = table.splitlines()
    assert lines[0].startswith("| grid | batch | mode | train step s") and "DPM-Solver++-2 s/volume" in lines[0]
    assert lines[2].startswith("| 16³ | 1 | ours bf16 compile=default |") and lines[2].endswith(
        "| 3.0e-03 | 4.0e-03 / 5.0e-03 |"
    )
    assert lines[3].endswith("|  |  |")


def test_cli_writes_the_table_and_refuses_a_missing_checkout(checkout: Path, tmp_path: Path) -> None:
    # ours in bf16 where this CPU has it natively; emulated, bf16 took 76 s a run against 16 s in fp32 (AVX2 host)
    ours = "bf16" if precision.cpu_has_native_bf16() else "fp32"
    out = tmp_path / "speed"
    args = ["bench", "speed", "--lung-ddpm", str(checkout), "--sizes", "16", "--channels", "32", "--steps", "1",
            "--sampler-steps", "2", "--threads", "1", "--modes", "original:fp32", f"ours:{ours}",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "lungddpm.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "speed.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["original fp32", f"ours {ours}"]
    assert result["parity_max_rel_diff"] < 1e-5
    assert (out / "speed.md").read_text() in proc.stdout
    # each mode ran in its own process: the peaks are separate measurements, both above the bare interpreter's
    assert all(r["peak_train_mb"] > 100 for r in result["rows"])
    # a second run into the same folder replaces what it measures again and keeps the rest; a run cut short (here:
    # batch max, which needs a GPU, after batch 1) keeps the rows it finished
    again = [*args[: args.index("--sampler-steps")], "--sampler-steps", "3", "--threads", "1", "--modes",
             f"ours:{ours}", "--batch-sizes", "1", "max", "--out", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "lungddpm.cli", *again], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "batch max (the largest that fits) needs a GPU" in proc.stderr
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert [(r["mode"], r["sampler_steps"]) for r in rows] == [("original fp32", 2), (f"ours {ours}", 3)]
    assert "DPM-Solver++-2/3 s/volume" in (out / "speed.md").read_text()
    missing = ["bench", "speed", "--lung-ddpm", str(tmp_path / "none")]
    proc = subprocess.run([sys.executable, "-m", "lungddpm.cli", *missing], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "none/diffusion_model/unet.py not found" in proc.stderr
    assert "Manem-Lab/Lung-DDPM" in proc.stderr


def test_merged_rows_replace_only_what_was_measured_again() -> None:
    def row(mode: str, size: int, batch: int | str, guidance: float, s: float) -> dict[str, object]:
        return {"mode": mode, "size": size, "batch": 8, "requested_batch": batch, "guidance": guidance, "s": s}

    old = [row("ours bf16", 128, 1, 1.0, 1), row("ours bf16", 128, "max", 1.0, 2), row("ours bf16", 64, 1, 3.0, 3)]
    new = [row("ours bf16", 128, "max", 1.0, 4), row("original fp32", 128, 1, 1.0, 5)]
    assert [r["s"] for r in merge_rows(old, new)] == [1, 3, 4, 5]
    legacy = {"mode": "ours bf16", "size": 128, "batch": 1, "s": 0}  # a row from before requested_batch/guidance
    assert [r["s"] for r in merge_rows([legacy], [row("ours bf16", 128, 1, 1.0, 6)])] == [6]


def test_explicit_bf16_on_a_cpu_without_it_warns_once(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda v=native: v)
        precision._warn_emulated_bf16.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lungddpm.diffusion.precision"):
            assert precision.resolve_precision("bf16", cpu) is torch.bfloat16
            assert precision.resolve_precision("bf16", cpu) is torch.bfloat16
            assert precision.resolve_precision("auto", cpu) is (torch.bfloat16 if native else None)
            assert precision.resolve_precision("fp32", cpu) is None
        emulated = [r for r in caplog.records if "oneDNN emulates it" in r.getMessage()]
        assert len(emulated) == (0 if native else 1)  # once per process, and only for an explicit bf16
    precision._warn_emulated_bf16.cache_clear()


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    precision.cpu_has_native_bf16.cache_clear()
    for amx, avx512_bf16, expected in (
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (False, False, None),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.resolve_precision("auto", cpu) is expected
        for capability, on_gpu in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 0), None), ((7, 5), None)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
            assert precision.resolve_precision("auto", gpu) is on_gpu, capability  # V100, T4: fp32
        assert (
            precision.resolve_precision("fp32", cpu) is None
            and precision.resolve_precision("bf16", cpu) is torch.bfloat16
        )
    monkeypatch.undo()
    precision.cpu_has_native_bf16.cache_clear()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    assert precision.cpu_has_native_bf16() == any(f in flags for f in precision.NATIVE_BF16_FLAGS)  # this machine


def test_bf16_training_falls_back_or_stops_where_the_cpus_conv_gradients_are_wrong(caplog) -> None:
    """The probe on this machine (a grid without a depth of 2 is right everywhere), and the decision per result:
    a wrong convolution makes auto train in fp32 with a warning, an explicit bf16 stop naming the fix."""
    assert precision.bf16_conv_grad_error((4, 4, 4), 32, 32) < 1e-2  # bf16's own error, on any CPU
    assert precision.bf16_conv_grad_error((4, 4, 4), 48, 16, 3, 2, True) < 1e-2  # strided, channels-last
    torch.manual_seed(5)  # the global RNG untouched (a training's dropout after the probe depended on it)
    before = torch.rand(3)
    torch.manual_seed(5)
    precision.bf16_conv_grad_error((4, 4, 4), 8, 8, 3, 1, False)
    assert torch.equal(torch.rand(3), before)
    cpu, gpu, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    convs = [((16, 16, 16), 16, 16, 3, 1, False), ((8, 8, 8), 32, 32, 3, 2, False), ((2, 4, 4), 64, 32, 3, 1, True)]
    seen: list[tuple[tuple[int, int, int], int]] = []

    def wrong_at_depth_2(shape: tuple[int, int, int], cin: int, *_: object) -> float:
        seen.append((shape, cin))
        return float("nan") if shape[0] == 2 else 4e-3

    assert precision.checked_cpu_bf16(bf16, cpu, lambda: convs[:2], "auto", wrong_at_depth_2) is bf16
    assert seen == [((6, 6, 6), 16), ((6, 6, 6), 32)]  # capped at PROBE_MAX_EDGE voxels per axis
    with caplog.at_level("WARNING"):
        assert precision.checked_cpu_bf16(bf16, cpu, lambda: convs, "auto", wrong_at_depth_2) is None
    said = "3x3x3 convolution of 64 -> 32 channels (stride 1, channels-last) on 2x4x4 voxels"
    assert said in caplog.text and "training in fp32 instead" in caplog.text
    with pytest.raises(LungDDPMError, match=r"relative error nan.*train.precision \(lesion.train.precision\) to auto"):
        precision.checked_cpu_bf16(bf16, cpu, lambda: convs, "bf16", wrong_at_depth_2)
    n = len(seen)  # a GPU, fp32 and fp16 are not probed, nor their convolutions listed

    def unlisted() -> list:
        raise AssertionError("listed")

    assert precision.checked_cpu_bf16(bf16, gpu, unlisted, "auto", wrong_at_depth_2) is bf16
    assert precision.checked_cpu_bf16(None, cpu, unlisted, "fp32", wrong_at_depth_2) is None and len(seen) == n


def test_the_probe_sees_every_convolution_the_network_runs() -> None:
    """Found by a forward on the meta device: the decoder's convolutions take the skip's channels too (16 -> 8 at
    the 2³ level of an 8-channel network, which the oneDNN fault breaks where 8 -> 8 passes), the downsamplings are
    strided, and the memory format is the training's."""
    net = UNet3D(UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 1, 1, 1), attention_resolutions=(),
                            norm_groups=4))  # fmt: skip
    convs = precision.network_convolutions(net, (16, 16, 16), True)
    assert ((2, 2, 2), 8, 8, 3, 1, True) in convs and ((2, 2, 2), 16, 8, 3, 1, True) in convs
    assert ((16, 16, 16), 3, 8, 3, 1, True) in convs and ((8, 8, 8), 8, 8, 3, 2, True) in convs  # input; a downsampling
    assert ((2, 2, 2), 16, 8, 1, 1, True) in convs  # a decoder block's 1x1 skip projection
    assert len(convs) == len(set(convs)) == 17 and all(p.device.type == "cpu" for p in net.parameters())


def test_sampler_quality_interval_resamples_whole_layouts(tmp_path: Path) -> None:
    """`bench quality`'s k samples of a layout share its CT: the interval draws layouts, not samples (one layout
    gives none; two give the two layouts' own means as its ends, every resample being one, the other or both)."""
    from support import tiny_config, tiny_data, write_cases

    from lungddpm.diffusion.bench import compare_samplers
    from lungddpm.diffusion.train import train

    cfg = tiny_config(steps=2, checkpoint_every=2)
    train(tiny_data(), cfg, tmp_path / "out", tmp_path / "state", None, threads=1)
    pairs = list(zip(*write_cases(tmp_path / "cases", 2)))
    (one,) = compare_samplers(cfg, tmp_path / "out/checkpoint.pt", pairs[:1], ["ddim:2"], 2, 1)
    (two,) = compare_samplers(cfg, tmp_path / "out/checkpoint.pt", pairs, ["ddim:2"], 2, 1)
    assert (one["n"], one["lung_mse_ci95"], one["lung_hist_w1_ci95"]) == (2, None, None)
    lo, hi = two["lung_mse_ci95"]
    assert two["n"] == 4 and min(lo, hi) < two["lung_mse_hu2"] < max(lo, hi)
    assert one["lung_mse_hu2"] in (lo, hi) and one["lung_hist_w1_hu"] in two["lung_hist_w1_ci95"]
    # sample.blend and sample.use_ema as configured (it always blended and took the EMA weights)
    for key, value in (("blend", False), ("use_ema", False)):
        other = Config.from_dict({**cfg.raw, "sample": {**cfg.raw["sample"], key: value}})
        (got,) = compare_samplers(other, tmp_path / "out/checkpoint.pt", pairs[:1], ["ddim:2"], 2, 1)
        assert got["lung_mse_hu2"] != one["lung_mse_hu2"], key
