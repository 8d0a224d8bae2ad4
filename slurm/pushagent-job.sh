#!/bin/bash
# What the pushagent Slurm jobs share, sourced by push.sbatch, push-array.sbatch and verify.sbatch:
# site activation, timestamped log lines, signal forwarding, requeue after exit 75, drain and verify.
#
# Run on its own it runs one pushagent command the same way, e.g. from scrontab or inside salloc:
#     slurm/pushagent-job.sh drain

PUSHAGENT_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_pushagent_signals=""   # the signals the job received, in order
source "$PUSHAGENT_SLURM_DIR/site.sh"

# shellcheck disable=SC2034  # for the templates
EXIT_INCOMPLETE=3     # finished, but records are queued, dead-lettered or quarantined
EXIT_INTERRUPTED=75   # stopped by a signal after a clean checkpoint: run again to resume

pushagent_log() {
  printf '%s pushagent-job: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$*" >&2
}

# Activate the site's environment; log which job, task, run and node this is.
pushagent_setup() {
  pushagent_log "start job=${SLURM_JOB_ID:-none} array_task=${SLURM_ARRAY_TASK_ID:-none}" \
    "restart=${SLURM_RESTART_COUNT:-0} node=${SLURMD_NODENAME:-$(hostname -s)}"
  if [[ -n $PUSHAGENT_ACTIVATE ]] && ! eval "$PUSHAGENT_ACTIVATE"; then
    pushagent_log "activation failed: $PUSHAGENT_ACTIVATE (set PUSHAGENT_ACTIVATE in slurm/site.sh)"
    exit 1
  fi
}

# pushagent_run COMMAND ARGS...: run pushagent in the background and wait, forwarding USR1, TERM and
# INT to it; returns its exit code. A batch shell runs its traps only while it waits on a background
# child, and `--signal=B:USR1` reaches only the batch shell, hence the forwarding.
pushagent_run() {
  local config=() status
  [[ -z $PUSHAGENT_CONFIG ]] || config=(--config "$PUSHAGENT_CONFIG")
  $PUSHAGENT_CMD "$1" "${config[@]}" "${@:2}" &
  _pushagent_child=$!
  trap '_pushagent_forward USR1' USR1
  trap '_pushagent_forward TERM' TERM
  trap '_pushagent_forward INT' INT
  while :; do
    _pushagent_signalled=
    wait "$_pushagent_child"
    status=$?
    # A trapped signal ends `wait` early (status > 128) while pushagent still runs: wait again.
    if (( status <= 128 )) || [[ -z $_pushagent_signalled ]]; then
      break
    fi
  done
  trap - USR1 TERM INT
  return "$status"
}

_pushagent_forward() {
  _pushagent_signalled=1
  _pushagent_signals+=" $1"
  pushagent_log "SIG$1 received: forwarding it to pushagent (pid $_pushagent_child)"
  kill -s "$1" "$_pushagent_child" 2>/dev/null
}

# pushagent_push ARGS...: `pushagent push --json ARGS...` with the report in a file of its own per
# run ($PUSHAGENT_REPORT) and in the log; sets PUSHAGENT_BATCH_ID; returns push's exit code.
pushagent_push() {
  local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}} status
  job=${job:-${SLURM_JOB_ID:-$$}}
  PUSHAGENT_REPORT=${PUSHAGENT_REPORT_DIR:-$(_pushagent_log_dir)}/${SLURM_JOB_NAME:-pushagent}-$job-run${SLURM_RESTART_COUNT:-0}.json
  pushagent_run push --json "$@" >"$PUSHAGENT_REPORT"
  status=$?
  cat "$PUSHAGENT_REPORT"
  PUSHAGENT_BATCH_ID=$(sed -n 's/.*"batch_id": *"\([^"]*\)".*/\1/p' "$PUSHAGENT_REPORT")
  pushagent_log "push exited $status: batch ${PUSHAGENT_BATCH_ID:-unknown}, report $PUSHAGENT_REPORT"
  return "$status"
}

# The directory of the job's log (the batch shell's stdout, wherever --output put it); "." when stdout
# is not a file, e.g. a terminal.
_pushagent_log_dir() {
  local log
  log=$(readlink -f "/proc/$$/fd/1" 2>/dev/null)
  if [[ -f $log ]]; then dirname "$log"; else echo .; fi
}

# After exit 75 (checkpoint saved): requeue this job so that it resumes from the checkpoint, at most
# PUSHAGENT_MAX_REQUEUES times (SLURM_RESTART_COUNT counts them), when USR1 stopped it: the time
# limit is near (--signal=B:USR1@...) or someone asked (scancel --signal=USR1 --batch). TERM means
# scancel, the time limit itself or preemption, after which Slurm requeues the job itself or not at
# all: the job just ends. Does not return.
pushagent_requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0}
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    pushagent_log "interrupted outside Slurm: run the same command again to resume"
    exit "$EXIT_INTERRUPTED"
  fi
  if [[ $_pushagent_signals != *USR1* || $_pushagent_signals == *TERM* || $_pushagent_signals == *INT* ]]; then
    pushagent_log "stopped by SIG${_pushagent_signals# }: not requeueing; submit the same job again to resume" \
      "from the checkpoint"
    exit "$EXIT_INTERRUPTED"
  fi
  if (( restarts >= PUSHAGENT_MAX_REQUEUES )); then
    pushagent_log "interrupted after $restarts requeues (PUSHAGENT_MAX_REQUEUES): giving up;" \
      "submit the same job again to resume from the checkpoint"
    exit "$EXIT_INTERRUPTED"
  fi
  pushagent_log "checkpoint saved: requeueing job $SLURM_JOB_ID ($((restarts + 1)) of $PUSHAGENT_MAX_REQUEUES)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    pushagent_log "scontrol requeue failed: submit the same job again to resume from the checkpoint"
    exit "$EXIT_INTERRUPTED"
  fi
  exit 0   # Slurm now ends this run and queues the job again
}

# pushagent_drain_and_verify BATCH_ID [VERIFY ARGS...]: send what the batch left in the retry queue
# (--all: now, not at the items' next-attempt times; an item that fails again keeps its backoff, and
# the drain waits for it up to PUSHAGENT_DRAIN_WAIT), then verify the batch. Exits with verify's
# status when it fails, else with drain's. An interrupted drain is not requeued: a rerun would push
# the finished batch again; the retry queue keeps what is left for the next drain.
pushagent_drain_and_verify() {
  local batch_id=$1 status verified
  pushagent_run drain --batch-id "$batch_id" --all --wait "$PUSHAGENT_DRAIN_WAIT"
  status=$?
  pushagent_log "drain exited $status"
  (( status != EXIT_INTERRUPTED )) || exit "$status"
  pushagent_run verify --batch-id "$batch_id" "${@:2}"
  verified=$?
  pushagent_log "verify of batch $batch_id exited $verified"
  (( verified == 0 )) || status=$verified
  exit "$status"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  (( $# )) || { echo "usage: $0 COMMAND [ARGS...]   (a pushagent command, e.g. drain)" >&2; exit 2; }
  pushagent_setup
  pushagent_run "$@"
  exit
fi
