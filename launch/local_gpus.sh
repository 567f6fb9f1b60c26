#!/usr/bin/env bash
# Local multi-GPU launches.
#
#   # one process driving all visible GPUs (data-parallel jit over a 1-D mesh)
#   launch/local_gpus.sh train -- --config=configs/revisiting/breast.py:imagenet,fold=0 --workdir=runs/b0
#   # N processes, one GPU each, as N JAX "hosts" (the multi-host code path on one box)
#   NPROC=4 launch/local_gpus.sh multiproc -- --config=... --workdir=runs/b0
#   # a sweep with one run per GPU at a time
#   launch/local_gpus.sh sweep -- --study=revisiting --targets=breast --root=runs/sweep
#
# Pick GPUs with CUDA_VISIBLE_DEVICES as usual. Re-running any command resumes.
set -euo pipefail
cmd=${1:?usage: local_gpus.sh train|multiproc|sweep -- ARGS}
shift
[[ "${1:-}" == "--" ]] && shift
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

gpu_list() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then echo "$CUDA_VISIBLE_DEVICES";
  else nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -; fi
}

case "$cmd" in
  train)
    exec python -m medtransfer_jax.train "$@"
    ;;
  multiproc)
    IFS=, read -r -a gpus <<< "$(gpu_list)"
    nproc=${NPROC:-${#gpus[@]}}
    port=${PORT:-$((20000 + RANDOM % 20000))}
    pids=()
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
    for ((i = 0; i < nproc; i++)); do
      CUDA_VISIBLE_DEVICES=${gpus[$i]} python -m medtransfer_jax.train \
        --coordinator_address=localhost:$port --num_processes=$nproc --process_id=$i "$@" \
        > >(sed "s/^/[proc $i] /") 2>&1 &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status
    ;;
  sweep)
    exec python launch/sweep.py --gpu_slots="$(gpu_list)" "$@"
    ;;
  *)
    echo "unknown command $cmd" >&2; exit 2;;
esac
