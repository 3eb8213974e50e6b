#!/usr/bin/env bash
# The issue "Speed"'s one GPU run: the original Lung-DDPM network against ours, side by side (CUDA-event timing
# after warm-up, peak CUDA memory per mode), into three tables:
#   whole:  128³, batch 1;   max: 128³, the largest training batch that fits;
#   lesion: 64³ ROIs, the paper-size network, 32 nodules batched, guided DPM-Solver++-20.
# The rows run in phases, most important first, within BUDGET_S seconds (default 540: one device call of 600 s);
# a phase past the budget is cut, and every table keeps each row it finished (written after every row; a later
# phase adds its rows to the same table). Needs this checkout's dependencies (torch, diffusers, jsonschema, ...)
# and a checkout of Manem-Lab/Lung-DDPM at $LUNG_DDPM (default peers/Lung-DDPM, git-ignored: `carry` it along).
# Tables: $OUT_DIR/{whole,max,lesion}/speed.{md,json}, OUT_DIR defaulting to benchmarks/speed/<gpu>
# (on the device machine: OUT_DIR=$OUT/speed so that they come back).
# PHASES="3 5 6" runs only those phases (numbered 1-7 below): a second call on the still-warm machine finishes what
# the first call's budget cut (a machine idle for 30 s is given back, so send the second call at once).
# CPU dry run: SIZE=16 CHANNELS=32 MAX=2 LESION_SIZE=16 BATCH=2 STEPS=1 OUT_DIR=/tmp/dry bash benchmarks/gpu.sh
# (its ours-bf16 rows say NOT FINITE on a CPU with oneDNN's bf16 fault at a level 2 voxels deep, at 16³ and 32³:
# docs/training.md; lungddpm.diffusion.precision.checked_cpu_bf16. The tooling is what a dry run checks.)
set -uo pipefail
cd "$(dirname "$0")/.."
src=${LUNG_DDPM:-peers/Lung-DDPM}
# without an install: this checkout, plus the dependencies the machine lacks, carried along in the git-ignored peers/:
# wheels in peers/whl (`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform ... -d
# peers/whl diffusers jsonschema referencing jsonschema-specifications rpds-py simpleitk`, docs/speed.md), installed
# here into a temporary folder where they are missing, or an installed tree in peers/site
py=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d peers/site ]; then export PYTHONPATH="$PWD/peers/site:$PYTHONPATH"; fi
if [ -d peers/whl ] && ! "$py" -c "import diffusers, jsonschema, SimpleITK" 2>/dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" peers/whl/*.whl \
    || { echo "gpu.sh: the wheels in peers/whl do not install (above)" >&2; exit 2; }
  export PYTHONPATH="$site:$PYTHONPATH"
fi
# the dependencies, checked once: versions to stderr, the device's name (the tables' folder) to stdout
gpu=$("$py" -c "import sys, torch, diffusers, jsonschema, yaml
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, name, file=sys.stderr)
print(name.replace(' ', '_'))") \
  || { echo "gpu.sh: a dependency is missing (above); carry peers/site or pip install -e ." >&2; exit 2; }
out=${OUT_DIR:-benchmarks/speed/$gpu}
size=${SIZE:-128}
budget=${BUDGET_S:-540}
failed=0
n=0
# phase TABLE SIZE BATCH [extra args] -- MODES...: one process, cut at the budget's end
phase() {
  n=$((n + 1))
  case " ${PHASES:-1 2 3 4 5 6 7} " in *" $n "*) ;; *) return ;; esac  # PHASES: which to run, by number
  local table=$1 grid=$2 batch=$3 left=$((budget - SECONDS))
  shift 3
  local extra=()
  while [ "$1" != "--" ]; do extra+=("$1"); shift; done
  shift
  if [ "$left" -lt 30 ]; then echo "gpu.sh: $table $* not run: the ${budget} s budget is spent" >&2; failed=1; return; fi
  echo "gpu.sh: $table at ${grid}³, batch $batch: $* (${left} s left)" >&2
  local t0=$SECONDS
  timeout -s INT -k 10 "$left" "$py" -m lungddpm.cli bench speed --lung-ddpm "$src" --steps "${STEPS:-6}" \
    --channels "${CHANNELS:-64}" --sizes "$grid" --batch-sizes "$batch" --out "$out/$table" "${extra[@]}" --modes "$@"
  local rc=$?
  # by the clock, not the code: a cut is 124, or 137 when timeout's KILL 10 s later ends a pool still shutting down
  local why="failed"
  if [ $((SECONDS - t0)) -ge "$left" ]; then why="cut at the ${budget} s budget"; fi
  if [ "$rc" -ne 0 ]; then echo "gpu.sh: $table $*: exit $rc ($why)" >&2; failed=1; fi
}
lesion=(${LESION_SIZE:-64} ${BATCH:-32} --guidance 3 --)
phase whole "$size" 1 -- original:fp32 ours:bf16 ours:bf16:default
phase lesion "${lesion[@]}" ours:bf16 original:bf16
phase max "$size" "${MAX:-max}" -- original:fp32 ours:bf16
phase whole "$size" 1 -- ours:bf16:reduce-overhead:device-rng original:bf16 ours:fp32 ours:bf16:checkpoint
phase lesion "${lesion[@]}" ours:bf16:default ours:bf16:reduce-overhead:device-rng
phase max "$size" "${MAX:-max}" -- ours:bf16:default
# 7: where the compiled step's, forward's and volume's time goes (torch.profiler: $OUT_DIR/whole/profile/); it also
# re-measures that row with the training loop's full update (clipping, the finite check, EMA; since 2026-12-04),
# and the same compiled row in channels-last-3d (cuDNN's bf16 3D convolutions run NDHWC: a contiguous input is
# transposed around each one; eager channels-last lost on an H100, 0.315 against 0.195 s, perhaps in GroupNorm, which
# the compiler generates for either layout)
phase whole "$size" 1 --profile -- ours:bf16:default ours:bf16:default:channels-last
for t in whole lesion max; do [ -f "$out/$t/speed.md" ] && { echo "## $t"; cat "$out/$t/speed.md"; }; done
exit "$failed"
