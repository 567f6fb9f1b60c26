#!/usr/bin/env bash
# Install the tested stack into a venv on this machine (a TPU worker, a GPU node, a laptop).
#
#   bash launch/setup_worker.sh [tpu|cuda12|cuda13|cpu]     # default tpu
#   bash launch/setup_worker.sh check [tpu|gpu|cpu|any] [--distributed] [--write-test=gs://BUCKET/dir]
#
# Why a venv with its own Python: the TPU images (tpu-ubuntu2204-base, v2-alpha-tpuv*)
# ship Python 3.10, where pip quietly resolves an old jax/flax/orbax/grain stack that
# CI never ran; current JAX needs Python >= 3.11. So this script finds python3.12 /
# python3.11 (or a python3 that is new enough), else installs Python 3.12 with uv
# (from PyPI, no sudo), makes $MEDTRANSFER_VENV (default ~/medtransfer_venv) and
# installs this checkout with `pip install -c launch/constraints.txt` (the versions CI
# tests) plus jax[<accelerator>] and gcsfs (gs:// workdirs). It then runs `check`.
#
# `check` prints Python/JAX versions and jax.devices() and exits 1 unless the devices
# are of the expected platform. With --distributed it first calls
# jax.distributed.initialize() (run it on every TPU worker at once, as tpu_vm.sh does):
# each worker then also reports process index/count and the global device count.
# --write-test writes, reads back and deletes a small file there (bucket permissions).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MEDTRANSFER_VENV:-$HOME/medtransfer_venv}

die() { echo "setup_worker.sh: error: $*" >&2; exit 1; }

py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

find_python() {
  local p
  for p in python3.12 python3.11 python3.13 python3; do
    if command -v "$p" >/dev/null && py_ok "$p"; then command -v "$p"; return; fi
  done
  # The image's Python is too old: a user-level uv from PyPI installs a managed 3.12.
  echo "no Python >= 3.11 on $(hostname); installing Python 3.12 with uv" >&2
  python3 -m pip install -q --user --upgrade uv >&2 || die "pip install --user uv failed on $(hostname)"
  local uv=$HOME/.local/bin/uv
  "$uv" python install 3.12 >&2 || die "uv python install 3.12 failed on $(hostname)"
  "$uv" python find 3.12
}

check() {  # [tpu|gpu|cpu|any] [--distributed] [--write-test=DIR_OR_URL]
  local want=any dist=0 write=""
  while (($#)); do
    case $1 in
      --distributed) dist=1 ;;
      --write-test=*) write=${1#*=} ;;
      tpu|gpu|cpu|any) want=$1 ;;
      *) echo "setup_worker.sh: error: check takes tpu|gpu|cpu|any, --distributed, --write-test=URL; got '$1'" >&2; exit 2 ;;
    esac
    shift
  done
  [[ -x $venv/bin/python ]] || die "no venv at $venv on $(hostname); run setup first"
  "$venv/bin/python" - "$want" "$dist" "$write" <<'PY'
import socket, sys
want, dist, write = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
host = socket.gethostname()
if sys.version_info < (3, 11):
    sys.exit(f"check: error: {host}: Python {sys.version.split()[0]} < 3.11; rerun setup")
import jax
if dist:
    jax.distributed.initialize(initialization_timeout=900)
devices = jax.devices()
platform = devices[0].platform if devices else "none"
print(f"MEDTRANSFER_CHECK host={host} python={sys.version.split()[0]} jax={jax.__version__} "
      f"process={jax.process_index()}/{jax.process_count()} local_devices={jax.local_device_count()} "
      f"global_devices={jax.device_count()} platform={platform}", flush=True)
print(f"  jax.devices() on {host}: {devices}", flush=True)
if want != "any" and platform != want:
    sys.exit(f"check: error: {host}: JAX sees {platform} devices, expected {want}; "
             "the accelerator plugin did not load (see the JAX warnings above)")
if write:
    from medtransfer_jax import paths
    probe = paths.join(write, f".medtransfer_check_{host}")
    try:
        paths.makedirs(write)
        paths.write_text_atomic(probe, host)
        assert paths.read_text(probe) == host, "read back something else"
        probe.unlink()
    except Exception as e:  # auth, scope, missing gcsfs, bucket name: all end here
        sys.exit(f"check: error: {host}: cannot write {write}: {type(e).__name__}: {e}. For gs:// "
                 "grant the VM's service account roles/storage.objectUser on the bucket.")
    print(f"  {host} can write {write}", flush=True)
PY
}

if [[ ${1:-} == check ]]; then shift; check "$@"; exit; fi

accel=${1:-tpu}
case $accel in
  tpu) want=tpu ;; cuda12|cuda13) want=gpu ;; cpu) want=cpu ;;
  *) echo "setup_worker.sh: error: accelerator '$accel' is not one of tpu, cuda12, cuda13, cpu" >&2; exit 2 ;;
esac
python=$(find_python)
echo "$(hostname): using $python ($("$python" --version 2>&1)) for $venv"
if [[ ! -x $venv/bin/python ]] || ! py_ok "$venv/bin/python"; then
  rm -rf "$venv"
  "$python" -m venv "$venv" 2>/dev/null || {
    # Debian/Ubuntu Pythons without python3-venv, or a uv-managed one: let uv make it.
    "${HOME}/.local/bin/uv" venv --seed --python "$python" "$venv" >/dev/null \
      || die "cannot create a venv with $python on $(hostname) (apt install python3-venv?)"
  }
fi
"$venv/bin/python" -m pip install -q --upgrade pip
jax_version=$(sed -n 's/^jax==//p' launch/constraints.txt)
"$venv/bin/python" -m pip install -q -c launch/constraints.txt \
  "jax[$accel]==$jax_version" -e ".[gcs]"
echo "$(hostname): installed medtransfer_jax with jax[$accel]==$jax_version"
check "$want" ${MEDTRANSFER_WRITE_TEST:+--write-test="$MEDTRANSFER_WRITE_TEST"}
