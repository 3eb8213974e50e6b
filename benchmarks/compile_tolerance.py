"""How far bf16 and torch.compile move the paper network's output: eager bf16, compiled bf16 and eager fp32
forwards on the weights and inputs of ``lungddpm bench speed`` (max |a - b| / max |b|), so the speed table's
"compiled vs eager" column can be read against bf16's own error.

    python benchmarks/compile_tolerance.py 64 128 [--lung-ddpm peers/Lung-DDPM]   # 2 CPU cores: ~4 min at 128³
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lungddpm.diffusion.device import pick_device
from lungddpm.diffusion.precision import forward_differences
from lungddpm.diffusion.speed import Case, _inputs, build_pair


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", type=int, nargs="+", help="cubic grid edges")
    p.add_argument("--lung-ddpm", type=Path, default=Path("peers/Lung-DDPM"), help="Manem-Lab/Lung-DDPM checkout")
    p.add_argument("--channels", type=int, default=64, help="base channels (paper 64)")
    args = p.parse_args()
    device = pick_device()
    _, net = build_pair(args.lung_ddpm, 128, args.channels)
    net = net.to(device).eval()
    compiled = torch.compile(net)
    for size in args.sizes:
        d = _inputs(Case(size=size, batch=1), device, torch.contiguous_format)
        x = (d["x0"], d["t"], d["layout"])
        diff = forward_differences(net, compiled, x, device, torch.bfloat16)
        print(f"{device.type} {size}³: eager bf16 vs fp32 {diff['eager_vs_fp32']:.2e}; compiled bf16 vs fp32 "
              f"{diff['compiled_vs_fp32']:.2e}; compiled vs eager bf16 {diff['max_rel_diff_vs_eager']:.2e}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
