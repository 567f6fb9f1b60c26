#!/usr/bin/env bash
# GPUs on one machine.
#
#   # default: ONE process driving every visible GPU (data-parallel jit over a 1-D mesh)
#   launch/local_gpus.sh train -- --config=configs/revisiting/breast.py:imagenet,fold=0 --workdir=runs/b0
#   # N processes, one GPU each, as N JAX processes (the multi-host code path on one box)
#   NPROC=4 launch/local_gpus.sh multiproc -- --config=... --workdir=runs/b0
#   # a sweep, one run per GPU at a time
#   launch/local_gpus.sh sweep -- --study=revisiting --targets=breast --root=runs/sweep
#
# One process over all GPUs is the simple, fast default. `multiproc` exists to run
# the multi-process path locally: it checks NPROC against the GPUs that are visible
# (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), gives process i the coordinator flags
# and JAX_LOCAL_DEVICE_IDS=i (read by jax.distributed.initialize as its documented
# local_device_ids argument in the pinned JAX, launch/constraints.txt), and, when any
# process fails, stops the others (SIGTERM to each process group, SIGKILL after
# GRACE_S=30 s) so no orphan keeps holding a GPU. Ctrl-C does the same.
#
# Several machines: JAX fills in coordinator/process ids by itself only under Slurm,
# Open MPI or Kubernetes (and on Cloud TPU); see launch/slurm_example.sbatch. Anywhere
# else pass --coordinator_address/--num_processes/--process_id to every process.
# Pick GPUs with CUDA_VISIBLE_DEVICES as usual. Re-running any command resumes.
#
# Every command refuses (exit 2) when no GPU is visible; ALLOW_CPU=1 lets `train` run
# on the CPU instead (slow: for trying a config). PYTHON=... picks the interpreter
# (default: `python` on PATH), e.g. PYTHON=~/medtransfer_venv/bin/python, the venv
# launch/setup_worker.sh makes; it must import medtransfer_jax and its dependencies.
set -euo pipefail
die() { echo "local_gpus.sh: error: $*" >&2; exit 2; }
# The usage is this file's header comment, whole.
usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

cmd=${1:-}
case $cmd in
  -h|--help|help) usage; exit 0 ;;
  train|multiproc|sweep) ;;
  '') die "usage: local_gpus.sh train|multiproc|sweep -- ARGS (local_gpus.sh --help)" ;;
  *) die "unknown command '$cmd' (train, multiproc, sweep; local_gpus.sh --help)" ;;
esac
shift
[[ ${1:-} == -- ]] && shift
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
python=${PYTHON:-python}
no_gpu="no GPU visible (nvidia-smi -L lists none and CUDA_VISIBLE_DEVICES is empty)"

# The main's imports, before any process starts: a `python` outside the venv fails here
# in one line instead of with a traceback per process.
check_python() {  # module
  local err fix="set PYTHON to the venv's python, e.g. PYTHON=~/medtransfer_venv/bin/python (made by launch/setup_worker.sh)"
  command -v "$python" >/dev/null || die "PYTHON=$python: no such program; $fix"
  err=$("$python" -c "import $1" 2>&1 >/dev/null) && return 0
  err=${err%$'\n'}
  die "PYTHON=$python cannot import $1${err:+ (${err##*$'\n'})}; $fix"
}

# Indices of the visible GPUs, comma-separated (empty if none).
gpu_list() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then echo "$CUDA_VISIBLE_DEVICES"; return; fi
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi -L | awk '/^GPU [0-9]+:/ {sub(":", "", $2); printf "%s%s", sep, $2; sep=","}'
}

pids=()
stop_all() {  # signal
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do kill "-$1" -- "-$pid" 2>/dev/null || true; done
}
cleanup() {
  local pid deadline=$((SECONDS + ${GRACE_S:-30}))
  stop_all TERM
  for pid in ${pids[@]+"${pids[@]}"}; do
    while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  done
  stop_all KILL
}

multiproc() {
  local gpus nproc port i pid status=0
  IFS=, read -r -a gpus <<< "$(gpu_list)"
  ((${#gpus[@]})) || die "multiproc: $no_gpu"
  nproc=${NPROC:-${#gpus[@]}}
  [[ $nproc =~ ^[0-9]+$ ]] && ((nproc >= 1)) || die "NPROC=$nproc is not a positive number"
  ((nproc <= ${#gpus[@]})) || die "NPROC=$nproc but only ${#gpus[@]} GPU(s) are visible (${gpus[*]}); set NPROC<=${#gpus[@]} or CUDA_VISIBLE_DEVICES"
  check_python medtransfer_jax.train
  port=${PORT:-$((20000 + RANDOM % 20000))}
  trap 'cleanup; exit 130' INT TERM
  for ((i = 0; i < nproc; i++)); do
    # setsid: each process leads its own group, so cleanup reaches its children too.
    JAX_LOCAL_DEVICE_IDS=$i setsid "$python" -m medtransfer_jax.train \
      --coordinator_address="localhost:$port" --num_processes="$nproc" --process_id="$i" "$@" \
      > >(sed "s/^/[proc $i] /") 2>&1 &
    pids+=($!)
  done
  # The first process to fail (or all succeeding) decides; a failed process leaves the
  # others blocked in collectives until JAX's heartbeat timeout, so stop them now.
  local live=("${pids[@]}") next rc
  while ((${#live[@]})); do
    next=()
    for pid in "${live[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then next+=("$pid"); continue; fi
      rc=0; wait "$pid" || rc=$?
      ((rc == 0 || status != 0)) || status=$rc
    done
    if ((status != 0)); then
      echo "local_gpus.sh: a process exited with status $status; stopping the others" >&2
      cleanup
      break
    fi
    live=(${next[@]+"${next[@]}"})
    ((${#live[@]})) && sleep 0.5
  done
  trap - INT TERM
  exit "$status"
}

case $cmd in
  train)
    [[ -n $(gpu_list) || ${ALLOW_CPU:-0} == 1 ]] || die "train: $no_gpu; ALLOW_CPU=1 trains on the CPU instead"
    check_python medtransfer_jax.train
    exec "$python" -m medtransfer_jax.train "$@" ;;
  multiproc) multiproc "$@" ;;
  sweep)
    slots=$(gpu_list)
    [[ -n $slots ]] || die "sweep: $no_gpu"
    check_python medtransfer_jax.sweep
    exec "$python" -m medtransfer_jax.sweep --gpu_slots="$slots" "$@" ;;
esac
