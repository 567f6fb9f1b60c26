#!/usr/bin/env bash
# The GPU numbers of BENCHMARKS.md in ONE device call (<= 9 min of benchmarks on one
# H100/H200; give the call timeout_s=600).
#
# Needs only what a bare GPU machine with jax[cuda], flax, optax, orbax, torch/torchvision
# and absl has, plus the wheels of the rest in .whl/ beside the repo (grain,
# ml_collections, ...; see `launch/gpu_record.sh --wheels` run on a machine with PyPI):
#
#   bash launch/gpu_record.sh            # from the repo root, on the GPU machine
#   bash launch/gpu_record.sh part2      # a rerun of the second half only (part1 likewise)
#
# Why one call: a session has ~15 min of device time, a machine start costs 1-2 min and a
# machine goes back 30 s after a call ends, so two calls usually pay two starts. The
# benchmarks run most important first, each bounded by a timeout (their sum stays under
# the 10-minute call limit; tests/test_gpu_record.py checks it), and each prints its rows
# as they are measured, so a timeout loses only that benchmark's remaining rows: the
# train bench times torch.compile last, the grid bench has a time budget inside its
# timeout and projects the targets it could not measure (marked in its table).
# Everything is also written to $OUT/*.md.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks (its jax/flax/optax/orbax/torch/absl/etils/protobuf/cloudpickle
# are used as they are); the versions CI tests.
WHEELS=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 tensorboardX==2.6.5 portpicker)
if [ "${1:-}" = "--wheels" ]; then
  # On a machine with PyPI: fetch the wheels the GPU image lacks (Python 3.12, x86-64).
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .whl "$w" || echo "could not fetch $w" >&2
  done
  exit 0
fi

OUT="${OUT:-/tmp/medtransfer_gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/medtransfer_xla}"
# The train bench runs torchvision in the same process after JAX: there JAX takes half the
# GPU memory instead of its default 75 %, which leaves torch room for batch 256 under AMP.
TORCH_TOO="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
# Everything the benchmarks import, with versions: a missing wheel stops the call here, in
# seconds, instead of failing six benchmarks one by one.
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt" || { echo "import check failed" >&2; exit 1; }
import importlib, sys
mods = ["jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX",
        "absl", "etils", "numpy", "torch", "torchvision", "medtransfer_jax.bench.cli",
        "medtransfer_jax.training.loop", "medtransfer_jax.analysis.layer_map"]
for m in mods:
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", ""))
import jax
print(sys.version.split()[0], jax.devices())
PY

bench() {  # bench NAME SECONDS ARGS...: one benchmark, its table to $OUT/NAME.md
  local name=$1 secs=$2; shift 2
  echo "=== $name (<= ${secs}s): python -m medtransfer_jax.bench $*"
  timeout "$secs" python3 -m medtransfer_jax.bench "$@" 2>&1 | tee "$OUT/$name.md" \
    | grep -v "^I[0-9]\|^W[0-9]" | tail -n 25
  echo "=== $name exit ${PIPESTATUS[0]}"
}

PART="${1:-all}"   # all (one call) | part1 | part2 (reruns of one half)
# Rows already on record (BENCHMARKS.md sections 10, 11) are not measured again: the device-
# resident input (1.2 %, met), the grain pipeline, the paper CCA protocol (35 s, met) and
# the covariance route. Each line below measures something that changed since.
if [ "$PART" = part1 ] || [ "$PART" = all ]; then
  # 1. The Revisiting grid: per target the split decode, setup, final predictions, and per
  #    epoch the train / eval / checkpoint seconds, the freeze variants' head-phase epoch
  #    (head_epoch_s), projected to 175 runs from the targets measured within the budget
  #    (mammograms, then isic; the rest from the measured one nearest in image size).
  #    Runs at once are not timed again: 3 on one H200 took 2.6x the time per run of one
  #    process (BENCHMARKS.md section 11; add --runs_at_once=3 to time them again).
  XLA_PYTHON_CLIENT_PREALLOCATE=false bench grid 240 grid --dtypes=bfloat16 --cache=device \
    --configs_dir="$PWD/configs" --time_budget_s=200
  # 2. ResNet50 224 px bf16 train step at batch 128 and 256, torchvision AMP +
  #    channels_last in the same run: img/s, MFU, JAX/torch ratio. (torch.compile was
  #    slower than eager torch on an H200: add --torch_compile to time it again.)
  XLA_PYTHON_CLIENT_MEM_FRACTION=$TORCH_TOO bench train 95 train --depth=50 \
    --image_sizes=224 --batch_sizes=128,256 --dtypes=bfloat16 --iters=10 --repeats=3
  # 3. Where that step's device time goes (MFU 14.8 % on an H200): a profiler trace of
  #    5 steps, summed per op category (convolutions, reductions such as batch norm,
  #    elementwise fusions, copies) and the costliest ops.
  bench step_profile 45 step_profile --depth=50 --image_sizes=224 --batch_sizes=256 \
    --dtypes=bfloat16 --iters=5
fi
if [ "$PART" = part2 ] || [ "$PART" = all ]; then
  # 4. A short 17 x 17 block map of two ResNet50s traced with jax.profiler: whether the
  #    device or the host bounds it (device busy vs wall, time per op category;
  #    compilation and cuDNN autotuning are part of the wall; 43 s traced on an H200,
  #    5 % of it device-busy), and each map's split: first batch (compile), the other
  #    batches, the host's per-pair finish.
  bench map_profile 90 network_scale --parts=map --depth=50 --map_images=1280 \
    --batch_sizes=128 --profile_ops
  # 5. The CCA kernels at 2048 x 20k against the NumPy float64 reference (run once per
  #    method, beside the default SVD), with cuSOLVER's Jacobi SVD (gesvdj) timed on the
  #    same data: speedup, and distance to the default SVD's value. (Its polar gesvdp is
  #    refused: wrong on rank-deficient matrices, BENCHMARKS.md section 11.)
  bench kernels_svd 80 similarity --neurons=2048 --datapoints=20000 --routes=qr \
    --svd_algorithms=default,jacobi --methods=mean_cca,svcca,pwcca,linear_cka \
    --repeats=1
fi
echo "all tables are in $OUT"
