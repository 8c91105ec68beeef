#!/usr/bin/env bash
# One long command on the device machine, spread over several device calls (each ends after 10
# minutes at most), as gpu_study_window.sh does for a study:
#
#   bash benchmarks/gpu_detached.sh NAME WAIT_S -- COMMAND [ARGS...]
#
# The first call starts COMMAND in its own process session (so it outlives the call), logging to
# $RUNS/NAME.log; a later call with the same NAME finds it running (or finished) and starts
# nothing. Every call waits up to WAIT_S seconds, prints the log's tail and copies the log to
# $OUT/NAME_log.txt, plus each file named in COPY (space-separated paths) once the command has
# ended. Make the next call within 30 s (the machine keeps files and processes only while warm)
# until it prints "NAME ended". Example, the 40-epoch accuracy of the explicit path (issue 22):
#
#   COPY=runs/attn_explicit/metrics.json bash benchmarks/gpu_detached.sh attn_explicit 540 -- \
#       python benchmarks/attention_accuracy.py explicit -- --conv_stem off --patch_size 2 \
#       --compile --quiet --out runs/attn_explicit --data-dir /root/nkat-data
set -uo pipefail
[ $# -ge 4 ] && [ "$3" = "--" ] || {
  echo "usage: gpu_detached.sh NAME WAIT_S -- COMMAND [ARGS...]" >&2; exit 2; }
name=$1 wait_s=$2; shift 3
source "$(dirname "$0")/gpu_env.sh"
log=$RUNS/$name.log pidfile=$RUNS/$name.pid rcfile=$RUNS/$name.rc
started() { [ -f "$pidfile" ] && { kill -0 "$(cat "$pidfile")" 2>/dev/null || [ -f "$rcfile" ]; }; }
if ! started; then
  echo "starting $name at $(date -u +%T): $*"
  date +%s > "$RUNS/$name.started_at"
  # The exit status goes to a file: the process is not this shell's child in later calls.
  setsid nohup bash -c '"$@"; rc=$?; date +%s > "$0.ended_at"; echo $rc > "$0"' "$rcfile" "$@" \
    >>"$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
fi
pid=$(cat "$pidfile") deadline=$((SECONDS + wait_s))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 1; done
ended_at=$(cat "$rcfile.ended_at" 2>/dev/null || date +%s)
elapsed=$(( ended_at - $(cat "$RUNS/$name.started_at") ))
tail -c 3000 "$log"; echo
cp "$log" "$OUT/${name}_log.txt"
if kill -0 "$pid" 2>/dev/null; then
  echo "$name still running after $elapsed s"
else
  for path in ${COPY:-}; do cp "$path" "$OUT/${name}_$(basename "$path")" || true; done
  echo "$name ended rc=$(cat "$rcfile" 2>/dev/null || echo unknown) after $elapsed s"
fi
