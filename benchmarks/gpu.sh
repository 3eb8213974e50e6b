#!/usr/bin/env bash
# The issue "Speed"'s one GPU run: the original Lung-DDPM network against ours, side by side, in one process per
# table (CUDA-event timing after warm-up, peak CUDA memory per mode):
#   1. 128³, batch 1, every mode;  2. 128³, the largest training batch that fits;
#   3. the lesion scale: 64³ ROIs, the paper-size network, 32 nodules batched, guided DPM-Solver++-20.
# Needs `pip install -e .` and a checkout of Manem-Lab/Lung-DDPM at $LUNG_DDPM (default peers/Lung-DDPM, git-ignored:
# `carry` it to the device). Tables go to benchmarks/speed/<gpu>/{whole,max,lesion}/speed.{md,json}.
# CPU dry run of the same script: SIZE=16 CHANNELS=32 MAX=2 LESION_SIZE=16 BATCH=2 STEPS=1 OUT_DIR=/tmp/dry bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
src=${LUNG_DDPM:-peers/Lung-DDPM}
# without an install: this checkout, plus pure-Python dependencies the machine may lack, prepared elsewhere with
# `pip install --no-deps --target peers/site diffusers jsonschema ...` and carried along (peers/ is git-ignored)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d peers/site ]; then export PYTHONPATH="$PWD/peers/site:$PYTHONPATH"; fi
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'cpu')")
out=${OUT_DIR:-benchmarks/speed/$gpu}
size=${SIZE:-128}
max=${MAX:-max}
run() { python -m lungddpm.cli bench speed --lung-ddpm "$src" --steps "${STEPS:-10}" --channels "${CHANNELS:-64}" "$@"; }
run --sizes "$size" --batch-sizes 1 --out "$out/whole" --modes original:fp32 original:bf16 ours:fp32 ours:bf16 \
  ours:bf16:checkpoint ours:bf16:default ours:bf16:reduce-overhead:device-rng
run --sizes "$size" --batch-sizes "$max" --out "$out/max" --modes original:fp32 ours:bf16 ours:bf16:default
run --sizes "${LESION_SIZE:-64}" --batch-sizes "${BATCH:-32}" --guidance 3 --out "$out/lesion" \
  --modes original:bf16 ours:bf16 ours:bf16:default ours:bf16:reduce-overhead:device-rng
