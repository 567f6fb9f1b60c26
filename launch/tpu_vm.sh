#!/usr/bin/env bash
# Cloud TPU VMs and queued resources for medtransfer_jax (single host or pod slice).
#
#   launch/tpu_vm.sh queue  NAME ZONE ACCEL [--mode=spot|guaranteed|reserved|best-effort]
#                           [--version=RUNTIME] [--autocheckpoint=auto|on|off] [--timeout=S] [--no-wait]
#   launch/tpu_vm.sh create NAME ZONE ACCEL [--mode=on-demand|spot|reserved] [--version=RUNTIME]
#                           [--autocheckpoint=auto|on|off]
#   launch/tpu_vm.sh wait-ready NAME ZONE [--timeout=S]   # queued resource -> ACTIVE (exit 1 on FAILED/SUSPENDED)
#   launch/tpu_vm.sh setup  NAME ZONE [--accelerator=tpu] [--bucket=gs://B/dir]  # code, venv (Python >= 3.11), pinned stack
#   launch/tpu_vm.sh check  NAME ZONE [--bucket=gs://B/dir]  # jax.devices() (+ a bucket write) from every worker
#   launch/tpu_vm.sh train  NAME ZONE [--job=train] [--detach] -- --config=... --workdir=gs://BUCKET/run
#   launch/tpu_vm.sh sweep  NAME ZONE [--job=sweep] [--detach] -- --study=revisiting --root=gs://BUCKET/sweep
#   launch/tpu_vm.sh wait   NAME ZONE [--job=train]       # until the job ends on every worker; its exit status
#   launch/tpu_vm.sh status NAME ZONE [--job=train]
#   launch/tpu_vm.sh logs   NAME ZONE [--job=train] [--worker=all|N] [--lines=100] [--follow]
#   launch/tpu_vm.sh stop   NAME ZONE [--job=train] [--grace=300]  # SIGTERM: save a checkpoint, exit 143
#   launch/tpu_vm.sh resume NAME ZONE ACCEL [queue options] [--max-restarts=20] [--job=train] [--sweep] -- ARGS
#   launch/tpu_vm.sh mount  NAME ZONE BUCKET              # gcsfuse (data only) at /mnt/gcs on every worker
#   launch/tpu_vm.sh ssh    NAME ZONE [--worker=all|N] -- COMMAND
#   launch/tpu_vm.sh delete NAME ZONE                     # the queued resource NAME-qr and its TPU, or the TPU
#
# Every worker runs the same command (`--worker=all`), detached from ssh by
# launch/worker_job.sh, with a log per host (~/medtransfer_jobs/JOB/<host>.log) and
# its exit status kept; `train`/`sweep` then wait, follow worker 0's log and exit
# with the job's status (0 done, 143 checkpointed and stopped by SIGTERM, 130 stopped
# with `stop`, 75 the slice was preempted or deleted, anything else a failure). A
# laptop disconnect only stops the waiting: `wait`/`logs` pick it up again.
#
# Workdirs on a pod slice: pass gs://BUCKET/... (orbax writes checkpoints to GCS
# directly; every host sees the same run). `resume` re-creates a preempted spot /
# queued slice and re-runs the same command, which resumes from the last checkpoint.
# Runtime versions follow the accelerator (v2-v4 tpu-ubuntu2204-base, v5litepod
# v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e). Autocheckpoint
# (SIGTERM before maintenance, `gcloud alpha`) is requested where the Cloud TPU docs
# list it (v2-v4, v5e). GCP_PROJECT=... adds --project; MEDTRANSFER_POLL_S sets the
# polling interval (30 s).
#
# Input is checked before gcloud runs (exit 2, one line): `train`/`resume` need
# --workdir after -- (unless a --flagfile holds it); --worker is all or a number;
# --lines/--grace/--timeout/--max-restarts whole numbers; --job letters, digits, . _ -.
set -euo pipefail

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }    # the user's input is wrong
fail() { echo "tpu_vm.sh: $*" >&2; exit 1; }          # the cloud said no

# The usage is this file's header comment, whole: a new command cannot fall outside it.
usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

cmd=${1:-}
case $cmd in ''|-h|--help|help) usage; exit 0 ;; esac
case $cmd in
  queue|create|wait-ready|setup|check|train|sweep|wait|status|logs|stop|resume|mount|ssh|delete) ;;
  *) die "unknown command '$cmd' (run tpu_vm.sh --help)";;
esac
name=${2:-}
zone=${3:-}
[[ -n $name && -n $zone ]] || die "'$cmd' needs NAME ZONE, e.g. tpu_vm.sh $cmd my-tpu us-central2-b"
shift 3
qr=$name-qr
poll=${MEDTRANSFER_POLL_S:-30}
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=medtransfer_jax
worker_job="cd ~/$remote_dir && bash launch/worker_job.sh"

# --- options: NAME=value pairs into opt_NAME variables (bash 3.2 compatible) ---------
positional=()
passthrough=()
switches=" detach no-wait follow sweep "   # options without a value; the others need =VALUE
parse_opts() {  # allowed-options... --- "$@"
  local allowed=" " key
  while [[ $1 != --- ]]; do allowed+="$1 "; shift; done
  shift
  while (($#)); do
    case $1 in
      --) shift; passthrough=("$@"); break ;;
      --*) key=${1#--}; key=${key%%=*}
           [[ $allowed == *" $key "* ]] || die "unknown option $1 for '$cmd' (options:$allowed); flags for the training program go after --"
           if [[ $switches == *" $key "* ]]; then
             [[ $1 != *=* ]] || die "$1: --$key takes no value"
             printf -v "opt_${key//-/_}" '%s' 1
           else
             [[ $1 == *=?* ]] || die "$1 needs a value: --$key=VALUE"
             printf -v "opt_${key//-/_}" '%s' "${1#*=}"
           fi ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  case $cmd in
    queue|create|resume|mount) ;;
    *) ((${#positional[@]} == 0)) || die "unexpected argument '${positional[0]}' for '$cmd'; flags for the training program go after --" ;;
  esac
  check_values
}
opt() { local v="opt_${1//-/_}"; echo "${!v:-${2:-}}"; }

# Values that end up in gcloud flags or remote shell commands, checked here: a typo
# fails at once with the fix, not after an ssh round trip to every worker.
check_values() {
  local key v number='^[0-9]+$' worker='^(all|[0-9]+)$' job='^[A-Za-z0-9._-]+$'
  v=$(opt worker)
  [[ -z $v || $v =~ $worker ]] || die "--worker=$v: give all or a worker number (0, 1, ...)"
  v=$(opt job)
  [[ -z $v || $v =~ $job ]] || die "--job=$v: a job name may only use letters, digits, . _ -"
  for key in lines grace timeout max-restarts; do
    v=$(opt "$key")
    [[ -z $v || $v =~ $number ]] || die "--$key=$v is not a whole number (0, 1, 2, ...)"
  done
}

# The flag a main cannot run without (medtransfer_jax.train: --workdir), checked before
# any slice is queued or ssh'd into. A --flagfile may hold it: then the main checks.
require_flag() {  # flag example-value
  local a prev=""
  for a in ${passthrough[@]+"${passthrough[@]}"}; do
    case $a in
      --) break ;;
      --flagfile|--flagfile=*|-flagfile|-flagfile=*) return 0 ;;
      "--$1="?*|"-$1="?*) return 0 ;;
    esac
    [[ ($prev == "--$1" || $prev == "-$1") && -n $a ]] && return 0
    prev=$a
  done
  die "'$cmd' needs --$1 for the training program, after --: tpu_vm.sh $cmd $name $zone ... -- --$1=$2"
}

gc() { gcloud "$@" --zone="$zone" ${GCP_PROJECT:+--project="$GCP_PROJECT"}; }

ssh_workers() {  # worker command
  gc compute tpus tpu-vm ssh "$name" --worker="$1" --command="$2"
}

# --- accelerator type -> runtime version, autocheckpoint ----------------------------
runtime_for() {
  case $1 in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}
autocheckpoint_listed() { case $1 in v2-*|v3-*|v4-*|v5litepod-*) return 0 ;; *) return 1 ;; esac; }

# Sets: accel, version, track (gcloud release track words), extra (flags).
slice_flags() {  # kind(create|queue)
  accel=${positional[0]:-}
  [[ -n $accel ]] || die "'$cmd' needs an accelerator type, e.g. v4-8, v5litepod-16, v5p-8, v6e-8"
  version=$(opt version)
  if [[ -z $version ]]; then
    version=$(runtime_for "$accel") || die "no default runtime version for '$accel'; pass --version=... (see https://cloud.google.com/tpu/docs/runtimes)"
  fi
  local mode ac
  # cloud-platform scope: bucket access is then decided by IAM roles alone, so the
  # workers can write gs:// workdirs (narrower default scopes may be read-only).
  track=(compute); extra=(--scopes=https://www.googleapis.com/auth/cloud-platform)
  if [[ $1 == queue ]]; then mode=$(opt mode spot); else mode=$(opt mode on-demand); fi
  case $1:$mode in
    queue:spot|create:spot) extra+=(--spot) ;;
    queue:guaranteed) extra+=(--guaranteed) ;;
    queue:reserved|create:reserved) extra+=(--reserved) ;;
    queue:best-effort) extra+=(--best-effort); track=(alpha compute) ;;
    create:on-demand) ;;
    *) die "--mode=$mode is not available for '$1' (queue: spot guaranteed reserved best-effort; create: on-demand spot reserved)" ;;
  esac
  ac=$(opt autocheckpoint auto)
  case $ac in
    auto) autocheckpoint_listed "$accel" && ac=on || ac=off ;;
    on|off) ;;
    *) die "--autocheckpoint=$ac is not one of auto, on, off" ;;
  esac
  if [[ $ac == on ]]; then
    autocheckpoint_listed "$accel" || echo "tpu_vm.sh: warning: the Cloud TPU docs list autocheckpoint for v2-v4 and v5e only; asking for it on $accel anyway" >&2
    extra+=(--autocheckpoint-enabled); track=(alpha compute)
  fi
}

# --- queued resources ---------------------------------------------------------------
qr_state() { gc compute tpus queued-resources describe "$qr" --format='value(state.state)' 2>/dev/null; }
node_state() { gc compute tpus tpu-vm describe "$name" --format='value(state)' 2>/dev/null || echo NOT_FOUND; }

wait_ready() {  # timeout_s (0 = none)
  local timeout=${1:-0} start=$SECONDS state
  while :; do
    state=$(qr_state) || fail "cannot describe queued resource $qr in $zone (does it exist? 'tpu_vm.sh queue' creates it)"
    case $state in
      ACTIVE) echo "$qr is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        gc compute tpus queued-resources describe "$qr" --format='yaml(state)' >&2 || true
        fail "queued resource $qr is $state; it will not become ACTIVE. Free it with 'tpu_vm.sh delete $name $zone', then queue again (another zone/--mode if it keeps failing)" ;;
    esac
    if ((timeout > 0 && SECONDS - start >= timeout)); then
      fail "queued resource $qr still ${state:-unknown} after ${timeout}s; it stays queued ('tpu_vm.sh delete $name $zone' to withdraw it)"
    fi
    echo "$qr is ${state:-unknown}; waiting (${poll}s)..."
    sleep "$poll"
  done
}

queue_slice() {
  slice_flags queue
  gcloud "${track[@]}" tpus queued-resources create "$qr" --node-id="$name" --zone="$zone" \
    ${GCP_PROJECT:+--project="$GCP_PROJECT"} --accelerator-type="$accel" \
    --runtime-version="$version" ${extra[@]+"${extra[@]}"} \
    || fail "creating queued resource $qr failed (quota? 'gcloud compute tpus queued-resources list --zone=$zone')"
  [[ $(opt no-wait) == 1 ]] || wait_ready "$(opt timeout 0)"
}

delete_slice() {
  if qr_state >/dev/null; then
    # --force deletes the TPU VMs of the request first; without it the request
    # outlives its TPU and the next `queue` with this name fails.
    gc compute tpus queued-resources delete "$qr" --force --quiet || fail "deleting $qr failed"
    echo "deleted queued resource $qr (and TPU $name)"
  else
    gc compute tpus tpu-vm delete "$name" --quiet || fail "no queued resource $qr and deleting TPU $name failed"
    echo "deleted TPU $name"
  fi
}

# --- code and environment on every worker ------------------------------------------
setup_workers() {
  local accelerator tarball
  accelerator=$(opt accelerator tpu)
  tarball=$(mktemp "${TMPDIR:-/tmp}/medtransfer_XXXXXX")
  tar -C "$repo_dir" --exclude=.git --exclude='*.egg-info' --exclude=runs --exclude='.*venv*' \
    --exclude=__pycache__ -czf "$tarball" .
  gc compute tpus tpu-vm scp "$tarball" "$name:medtransfer_src.tar.gz" --worker=all \
    || { rm -f "$tarball"; fail "copying the code to $name failed"; }
  rm -f "$tarball"
  ssh_workers all "set -euo pipefail; rm -rf ~/$remote_dir.new && mkdir -p ~/$remote_dir.new && \
tar -C ~/$remote_dir.new -xzf ~/medtransfer_src.tar.gz && rm -rf ~/$remote_dir && \
mv ~/$remote_dir.new ~/$remote_dir && bash ~/$remote_dir/launch/setup_worker.sh $accelerator" \
    || fail "setup failed on at least one worker of $name (its output is above)"
  check_workers
}

check_workers() {
  local out n_lines n_procs
  out=$(mktemp "${TMPDIR:-/tmp}/medtransfer_check_XXXXXX")
  local bucket
  bucket=$(opt bucket)
  [[ -z $bucket || $bucket == gs://* ]] || die "--bucket=$bucket: give a gs:// URL, e.g. gs://my-bucket/runs"
  if ! ssh_workers all "cd ~/$remote_dir && bash launch/setup_worker.sh check tpu --distributed${bucket:+ --write-test=$bucket}" | tee "$out"; then
    rm -f "$out"; fail "device check failed on at least one worker of $name (output above); rerun 'tpu_vm.sh setup $name $zone'"
  fi
  n_lines=$(grep -c '^MEDTRANSFER_CHECK ' "$out" || true)
  n_procs=$(sed -n 's/^MEDTRANSFER_CHECK .* process=[0-9]*\/\([0-9]*\) .*/\1/p' "$out" | head -n 1)
  rm -f "$out"
  [[ $n_lines -ge 1 && $n_lines == "${n_procs:-0}" ]] \
    || fail "device check: $n_lines of ${n_procs:-?} workers reported; see the output above"
  echo "all $n_lines workers of $name see their TPUs"
}

# --- jobs ---------------------------------------------------------------------------
start_job() {  # job module module-flags...
  local job=$1 module=$2 args
  shift 2
  args=$(printf '%q ' "$@" ${passthrough[@]+"${passthrough[@]}"})
  ssh_workers all "$worker_job start $job -- ~/medtransfer_venv/bin/python -m $module $args" \
    || fail "starting job '$job' failed on at least one worker (output above): a job of that name still running ('tpu_vm.sh stop $name $zone --job=$job'), or ssh itself failing ('tpu_vm.sh ssh $name $zone -- hostname')"
}

# Folds the MEDTRANSFER_JOB lines of all workers into one status: a real failure
# beats 137 (lost) beats 143 (checkpointed on SIGTERM) beats 130 (stopped) beats 0.
# Prints "running", "failed-partly RC" (a failure while others still run), "none",
# "unknown" or the status.
fold_status() {  # file
  awk '
    function sev(c) { return c == 0 ? 0 : c == 130 ? 1 : c == 143 ? 2 : c == 137 ? 3 : 4 }
    function see(c) { if (!seen || sev(c) > sev(worst)) { worst = c; seen = 1 } }
    /^MEDTRANSFER_JOB / {
      n++; st = ""; rc = ""
      for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "state") st = kv[2]; if (kv[1] == "rc") rc = kv[2] }
      sub(/\r$/, "", rc)
      if (st == "running") running++
      else if (st == "stopped") see(130)
      else if (st == "lost") see(137)
      else if (st == "exited") see(rc + 0)
    }
    END {
      if (n == 0) print "unknown"
      else if (running > 0 && seen && sev(worst) == 4) print "failed-partly " worst
      else if (running > 0) print "running"
      else if (!seen) print "none"
      else print worst
    }' "$1"
}

wait_job() {  # job; returns the job status (see the header)
  local job=$1 out status ssh_fail=0 follow=""
  out=$(mktemp "${TMPDIR:-/tmp}/medtransfer_status_XXXXXX")
  if [[ ${MEDTRANSFER_FOLLOW:-1} == 1 ]]; then
    ssh_workers 0 "$worker_job logs $job 20 --follow" 2>/dev/null &
    follow=$!
  fi
  while :; do
    if ! ssh_workers all "$worker_job status $job" > "$out" 2>/dev/null; then
      status=$(node_state)
      case $status in
        READY) ssh_fail=$((ssh_fail + 1))
               ((ssh_fail < ${MEDTRANSFER_SSH_RETRIES:-10})) || { status=75; break; }
               echo "tpu_vm.sh: ssh to $name failed though it is READY; retrying" >&2
               sleep "$poll"; continue ;;
        *) echo "tpu_vm.sh: $name is ${status:-gone} (preempted, under maintenance or deleted)" >&2
           status=75; break ;;
      esac
    fi
    ssh_fail=0
    status=$(fold_status "$out")
    case $status in
      running) sleep "$poll" ;;
      failed-partly*)
        echo "tpu_vm.sh: job '$job' failed on a worker (status ${status#* }); stopping it on the others" >&2
        ssh_workers all "$worker_job stop $job 30" >/dev/null 2>&1 || true
        status=${status#* }; break ;;
      none|unknown) grep '^MEDTRANSFER_JOB' "$out" >&2 || true
                    echo "tpu_vm.sh: no job '$job' on $name" >&2; status=2; break ;;
      *) break ;;
    esac
  done
  [[ -z $follow ]] || { kill "$follow" 2>/dev/null || true; wait "$follow" 2>/dev/null || true; }
  grep '^MEDTRANSFER_JOB' "$out" 2>/dev/null || true
  rm -f "$out"
  echo "job '$job' on $name: exit status $status"
  return "$status"
}

run_job() {  # job module flags...
  local job=$1
  start_job "$@"
  if [[ $(opt detach) == 1 ]]; then
    echo "job '$job' runs detached on $name; 'tpu_vm.sh logs|wait|stop $name $zone --job=$job'"
    return 0
  fi
  wait_job "$job"
}

# Re-creates the slice when needed; sets fresh=1 when it made a new one.
ensure_slice() {
  local state
  fresh=0
  state=$(qr_state) || state=MISSING
  case $state in
    ACTIVE) [[ $(node_state) != PREEMPTED ]] && return 0
            echo "$name is PREEMPTED; re-creating it"; delete_slice ;;
    FAILED|SUSPENDED|SUSPENDING) echo "$qr is $state; re-creating it"; delete_slice ;;
    MISSING) ;;
    *) wait_ready 0; fresh=1; return 0 ;;
  esac
  queue_slice
  fresh=1
}

resume_loop() {
  local job module max restarts=0 rc
  job=$(opt job train)
  module=medtransfer_jax.train
  [[ $(opt sweep) == 1 ]] && module=medtransfer_jax.sweep
  max=$(opt max-restarts 20)
  while :; do
    ensure_slice
    if [[ $fresh == 1 ]] || ! ssh_workers all "test -x ~/medtransfer_venv/bin/python && test -d ~/$remote_dir" >/dev/null 2>&1; then
      setup_workers
    fi
    rc=0
    if [[ $module == medtransfer_jax.sweep ]]; then run_job "$job" "$module" --multihost --parallel=1 || rc=$?
    else run_job "$job" "$module" --multihost || rc=$?; fi
    case $rc in
      0) echo "resume: job '$job' finished"; return 0 ;;
      75|137|143)
        restarts=$((restarts + 1))
        ((restarts <= max)) || fail "resume: gave up after $max restarts (last status $rc)"
        echo "resume: job '$job' interrupted (status $rc); restart $restarts of $max from its checkpoint" ;;
      *) echo "resume: job '$job' failed with status $rc; not retrying (a bug or bad input; see 'tpu_vm.sh logs $name $zone --job=$job')" >&2
         return "$rc" ;;
    esac
  done
}

# --- commands -----------------------------------------------------------------------
case $cmd in
  queue)  parse_opts mode version autocheckpoint timeout no-wait --- "$@"; queue_slice ;;
  create) parse_opts mode version autocheckpoint --- "$@"; slice_flags create
          gcloud "${track[@]}" tpus tpu-vm create "$name" --zone="$zone" ${GCP_PROJECT:+--project="$GCP_PROJECT"} \
            --accelerator-type="$accel" --version="$version" ${extra[@]+"${extra[@]}"} \
            || fail "creating TPU $name failed" ;;
  wait-ready) parse_opts timeout --- "$@"; wait_ready "$(opt timeout 0)" ;;
  setup)  parse_opts accelerator bucket --- "$@"; setup_workers ;;
  check)  parse_opts bucket --- "$@"; check_workers ;;
  train)  parse_opts job detach --- "$@"; require_flag workdir gs://BUCKET/run
          run_job "$(opt job train)" medtransfer_jax.train --multihost ;;
  sweep)  parse_opts job detach --- "$@"
          run_job "$(opt job sweep)" medtransfer_jax.sweep --multihost --parallel=1 ;;
  wait)   parse_opts job --- "$@"; wait_job "$(opt job train)" ;;
  status) parse_opts job --- "$@"; ssh_workers all "$worker_job status $(opt job train)" ;;
  logs)   parse_opts job worker lines follow --- "$@"
          follow=""; [[ $(opt follow) == 1 ]] && follow=--follow
          ssh_workers "$(opt worker all)" "$worker_job logs $(opt job train) $(opt lines 100) $follow" ;;
  stop)   parse_opts job grace --- "$@"
          ssh_workers all "$worker_job stop $(opt job train) $(opt grace 300)" \
            || fail "stop failed on at least one worker (output above)" ;;
  resume) parse_opts mode version autocheckpoint timeout job sweep max-restarts bucket --- "$@"
          [[ $(opt sweep) == 1 ]] || require_flag workdir gs://BUCKET/run
          resume_loop ;;
  mount)  parse_opts --- "$@"
          bucket=${positional[0]:-}
          [[ -n $bucket && $bucket != gs://* ]] || die "mount needs a bucket name without gs://, e.g. my-bucket"
          # Data only: workdirs and checkpoints go to gs:// directly (orbax). gcsfuse
          # renames directories only with --rename-dir-limit on flat buckets.
          ssh_workers all "set -euo pipefail; command -v gcsfuse >/dev/null || { echo 'gcsfuse is not installed on '\$(hostname)'; see https://cloud.google.com/storage/docs/cloud-storage-fuse/install' >&2; exit 1; }; \
sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && \
gcsfuse --implicit-dirs --rename-dir-limit=200000 $bucket /mnt/gcs" || fail "mounting gs://$bucket failed" ;;
  ssh)    parse_opts worker --- "$@"
          ((${#passthrough[@]})) || die "ssh needs a command after --"
          ssh_workers "$(opt worker all)" "${passthrough[*]}" ;;
  delete) parse_opts --- "$@"; delete_slice ;;
esac
