#!/usr/bin/env bash
# Run a medtransfer_jax training config on a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh create   NAME ZONE ACCEL [VERSION]   # e.g. v4-32 tpu-ubuntu2204-base
#   launch/tpu_vm.sh queue    NAME ZONE ACCEL [VERSION]   # queued resource (spot/preemptible)
#   launch/tpu_vm.sh setup    NAME ZONE                    # copy this repo + pip install on all workers
#   launch/tpu_vm.sh train    NAME ZONE -- --config=configs/revisiting/breast.py:imagenet,fold=0 \
#                                             --workdir=/mnt/gcs/runs/breast-imagenet-f0
#   launch/tpu_vm.sh mount    NAME ZONE BUCKET             # gcsfuse-mount gs://BUCKET at /mnt/gcs on all workers
#   launch/tpu_vm.sh sweep    NAME ZONE -- --study=revisiting --targets=breast --root=/mnt/gcs/sweep
#   launch/tpu_vm.sh delete   NAME ZONE
#
# Every worker runs the same command (`--worker=all`); train.py is started with
# --multihost, so jax.distributed.initialize() discovers the slice and each host feeds
# its own shard of every batch. On pod slices the workdir must be one directory seen by
# all hosts (a gcsfuse mount of a bucket, `mount` below, or NFS/Filestore); on a
# single-host VM a local path is fine. Re-running `train` with the same workdir resumes
# (also after preemption: the loop saves at JAX's preemption sync point and exits 143).
set -euo pipefail

cmd=${1:?usage: tpu_vm.sh create|queue|setup|mount|train|sweep|ssh|delete NAME ZONE ...}
name=${2:?TPU name}
zone=${3:?zone, e.g. us-central2-b}
shift 3
project_flag=${GCP_PROJECT:+--project=$GCP_PROJECT}
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=medtransfer_jax

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" $project_flag --worker=all \
    --command="$1"
}

case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v4-8}; version=${2:-tpu-ubuntu2204-base}
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" $project_flag \
      --accelerator-type="$accel" --version="$version"
    ;;
  queue)
    accel=${1:?accelerator type, e.g. v5litepod-16}; version=${2:-v2-alpha-tpuv5-lite}
    gcloud compute tpus queued-resources create "$name-qr" --node-id="$name" --zone="$zone" \
      $project_flag --accelerator-type="$accel" --runtime-version="$version" --spot
    echo "waiting for $name-qr to become ACTIVE..."
    until gcloud compute tpus queued-resources describe "$name-qr" --zone="$zone" $project_flag \
        --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
    ;;
  setup)
    tarball=$(mktemp /tmp/medtransfer_XXXX.tar.gz)
    tar -C "$repo_dir" --exclude=.git --exclude='*.egg-info' --exclude=runs -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$name:/tmp/medtransfer.tar.gz" --zone="$zone" \
      $project_flag --worker=all
    ssh_all "mkdir -p ~/$remote_dir && tar -C ~/$remote_dir -xzf /tmp/medtransfer.tar.gz && \
      cd ~/$remote_dir && pip install -q 'jax[tpu]' && \
      pip install -q -e ."
    ;;
  train)
    [[ "${1:-}" == "--" ]] && shift
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$remote_dir && python3 -m medtransfer_jax.train --multihost $args \
      2>&1 | tee -a ~/train.log"
    ;;
  mount)
    bucket=${1:?bucket name (without gs://)}
    ssh_all "sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && \
      (command -v gcsfuse >/dev/null || (echo 'install gcsfuse first' && exit 1)) && \
      gcsfuse --implicit-dirs $bucket /mnt/gcs"
    ;;
  sweep)
    # Every worker runs the same sweep in lockstep (one run at a time, each run on all
    # hosts: the sweep passes --multihost to every training process).
    [[ "${1:-}" == "--" ]] && shift
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$remote_dir && python3 launch/sweep.py --multihost --parallel=1 $args \
      2>&1 | tee -a ~/sweep.log"
    ;;
  ssh)
    [[ "${1:-}" == "--" ]] && shift
    ssh_all "$*"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" $project_flag --quiet || \
      gcloud compute tpus queued-resources delete "$name-qr" --zone="$zone" $project_flag --force --quiet
    ;;
  *)
    echo "unknown command $cmd" >&2; exit 2;;
esac
