#!/usr/bin/env bash
# One named job per machine, detached from the ssh session that started it.
#
#   launch/worker_job.sh start  JOB -- COMMAND [ARGS...]  # detached (setsid + nohup), returns at once
#   launch/worker_job.sh status JOB                       # one MEDTRANSFER_JOB line; exit 0
#   launch/worker_job.sh wait   JOB                       # until it ends; exits with its status
#   launch/worker_job.sh stop   JOB [GRACE_S]             # SIGTERM to the job's process group, then KILL
#   launch/worker_job.sh logs   JOB [LINES] [--follow]    # this host's log
#
# tpu_vm.sh runs this on every TPU worker over `gcloud ... ssh --worker=all`. Why
# detached: a job in the foreground of ssh dies with (or, worse, outlives as an orphan
# holding the TPU) the laptop's connection. The job's exit status is written to
# JOB_DIR/exit_code when it ends, so `wait`/`status` report the real outcome (a crash
# or a preemption, 143, is never reported as success). Logs are per host:
# JOB_DIR/<hostname>.log. Jobs live under $MEDTRANSFER_JOBS (default ~/medtransfer_jobs).
#
# Exit statuses: the job's own; 2 for usage errors; 130 = stopped by `stop`;
# 137 = the job vanished without a status (killed with -9, or the VM rebooted).
set -euo pipefail

usage="usage: worker_job.sh start|status|wait|stop|logs JOB ..."
cmd=${1:?$usage}
job=${2:?$usage}
shift 2
[[ $job =~ ^[A-Za-z0-9._-]+$ ]] || { echo "worker_job.sh: error: job name '$job' may only use letters, digits, . _ -" >&2; exit 2; }
dir=${MEDTRANSFER_JOBS:-$HOME/medtransfer_jobs}/$job
host=$(hostname)
poll=${MEDTRANSFER_POLL_S:-10}

# Running while any process of the job's process group lives (pid = pgid via setsid).
running() { [[ -f $dir/pid ]] && kill -0 -- "-$(cat "$dir/pid")" 2>/dev/null; }

# One line a launcher can parse, whatever ssh prints around it.
state_line() {
  local state rc=""
  if running; then state=running
  elif [[ -f $dir/exit_code ]]; then
    rc=$(cat "$dir/exit_code")
    state=exited
    [[ -f $dir/stopped ]] && state=stopped
  elif [[ -f $dir/pid ]]; then state=lost; rc=137
  else state=none
  fi
  echo "MEDTRANSFER_JOB host=$host job=$job state=$state rc=${rc:--}"
}

final_rc() {
  if [[ -f $dir/stopped ]]; then echo 130
  elif [[ -f $dir/exit_code ]]; then cat "$dir/exit_code"
  else echo 137
  fi
}

case $cmd in
  start)
    [[ ${1:-} == -- ]] && shift
    (( $# )) || { echo "worker_job.sh: error: start $job needs a command after --" >&2; exit 2; }
    if running; then
      echo "worker_job.sh: error: job '$job' is still running on $host (pid $(cat "$dir/pid")); run 'stop' first or pick another --job" >&2
      exit 2
    fi
    mkdir -p "$dir"
    rm -f "$dir/exit_code" "$dir/stopped" "$dir/pid"
    printf '%q ' "$@" > "$dir/cmd"
    log=$dir/$host.log
    echo "=== $(date -u +%FT%TZ) start on $host: $(cat "$dir/cmd")" >> "$log"
    # setsid: the job gets its own process group, so `stop` reaches every process it
    # spawned (data-loader workers too). The trap makes bash wait for the child on
    # SIGTERM and still record its status (143 after a save-and-exit).
    setsid nohup bash -c '
      trap "" HUP
      trap "true" TERM INT
      dir=$1; shift
      "$@"
      rc=$?
      echo "=== $(date -u +%FT%TZ) exit status $rc" >&2
      echo "$rc" > "$dir/exit_code.tmp" && mv "$dir/exit_code.tmp" "$dir/exit_code"
    ' medtransfer-job "$dir" "$@" < /dev/null >> "$log" 2>&1 &
    echo $! > "$dir/pid"
    echo "started job '$job' on $host (pid $!); log: $log"
    ;;
  status)
    state_line
    ;;
  wait)
    while running; do sleep "$poll"; done
    state_line
    exit "$(final_rc)"
    ;;
  stop)
    grace=${1:-${MEDTRANSFER_STOP_GRACE_S:-300}}
    if ! running; then state_line; exit 0; fi
    touch "$dir/stopped"
    pgid=$(cat "$dir/pid")
    echo "stopping job '$job' on $host: SIGTERM to process group $pgid (checkpoint, then exit 143)"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for ((i = 0; i < grace; i++)); do running || break; sleep 1; done
    if running; then
      echo "job '$job' on $host still running after ${grace}s: SIGKILL" >&2
      kill -KILL -- "-$pgid" 2>/dev/null || true
      sleep 1
    fi
    state_line
    ;;
  logs)
    lines=${1:-100}
    log=$dir/$host.log
    [[ -f $log ]] || { echo "worker_job.sh: error: no log for job '$job' on $host ($log)" >&2; exit 2; }
    echo "----- $host: $log"
    if [[ ${2:-} == --follow ]] && running; then
      tail -n "$lines" --pid="$(cat "$dir/pid")" -F "$log"
    else
      tail -n "$lines" "$log"
    fi
    ;;
  *)
    echo "worker_job.sh: error: unknown command '$cmd'; $usage" >&2; exit 2;;
esac
