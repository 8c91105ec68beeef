#!/usr/bin/env bash
# One window of a study on the device machine, spread over several device calls.
#
#   bash benchmarks/gpu_study_window.sh STUDY_FILE WAIT_S [up flags...]
#
# The first call starts `nkat-search up` in its own process session (so it outlives the device
# call, which ends after 10 minutes at most) unless one is already running for this study; every
# call then waits up to WAIT_S seconds for it, prints the log's tail, and copies a consistent
# snapshot of the study's SQLite file, up's log and nvidia-smi samples to $OUT. Make the next call
# within 30 s (the machine keeps files and processes only while warm) until it says "up ended".
# The study resumes from its SQLite file on a fresh machine: carry in the file an earlier window
# copied out and name it in RESUME_DB (RESUME_DB=results/round2/NAME/NAME.db bash ...); the first
# call copies it (and the NAME_windows.txt, NAME_up_log.txt and NAME_gpu.csv beside it, which go
# on growing) to where up keeps the study; a window there whose machine was lost before up ended
# is closed first (benchmarks/lost_window.py).
# STOP=1 sends up SIGINT first (when the device time runs out before its --timeout tail ends): the
# running trials end "interrupted" and are queued to resume (their checkpoints stay on this machine,
# so the next window trains them again from the start); then it waits as usual.
set -uo pipefail
study_file=$1 wait_s=$2; shift 2
source "$(dirname "$0")/gpu_env.sh"
name=$(python3 -c 'import sys,yaml; print(yaml.safe_load(open(sys.argv[1]))["name"])' "$study_file")
runs=$RUNS/$name; mkdir -p "$runs"
if [ -n "${RESUME_DB:-}" ] && [ ! -f "$runs/$name.db" ]; then
  [ -f "$RESUME_DB" ] || { echo "RESUME_DB=$RESUME_DB: no such file" >&2; exit 2; }
  cp "$RESUME_DB" "$runs/$name.db"
  # The earlier windows' records go on in the same files, so what comes back covers the study.
  from=$(dirname "$RESUME_DB")/$name
  [ -f "${from}_windows.txt" ] && cp "${from}_windows.txt" "$runs/windows.txt"
  [ -f "${from}_up_log.txt" ] && cp "${from}_up_log.txt" "$runs/up.log"
  [ -f "${from}_gpu.csv" ] && cp "${from}_gpu.csv" "$runs/gpu.csv"
  # A window whose machine was lost before up ended gets its closing line (and its seconds).
  python3 "$(dirname "$0")/lost_window.py" "$runs/windows.txt" "$runs/up.log"
  echo "resuming $name from $RESUME_DB"
fi
log=$runs/up.log pidfile=$runs/up.pid
if ! { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
  echo "starting up for $name at $(date -u +%T)" | tee -a "$runs/windows.txt"
  date +%s > "$runs/started_at"
  setsid nohup python3 -m nkat_search up --study "$study_file" --out "$runs" --no-dashboard \
    --data-dir "$NKAT_DATA_DIR" "$@" >>"$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  (setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader \
    -l 5 >> "$runs/gpu.csv" 2>/dev/null < /dev/null &)
fi
pid=$(cat "$pidfile") deadline=$((SECONDS + wait_s))
if [ -n "${STOP:-}" ] && kill -0 "$pid" 2>/dev/null; then
  echo "stopping up (SIGINT) at $(date -u +%T)" | tee -a "$runs/windows.txt"; kill -INT "$pid"
fi
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 5; done
snapshot() {
  python3 - "$runs/$name.db" "$OUT/$name.db" <<'PY'
import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()
PY
  cp "$log" "$OUT/${name}_up_log.txt"; cp "$runs/gpu.csv" "$OUT/${name}_gpu.csv" 2>/dev/null
  cp "$runs/windows.txt" "$OUT/${name}_windows.txt"
}
if kill -0 "$pid" 2>/dev/null; then
  tail -c 3000 "$log"; snapshot; echo "up still running after $(( $(date +%s) - $(cat "$runs/started_at") )) s"
else
  pkill -f 'nvidia-smi --query-gpu' 2>/dev/null
  echo "up ended at $(date -u +%T) after $(( $(date +%s) - $(cat "$runs/started_at") )) s" | tee -a "$runs/windows.txt"
  # Whether the compiled kernels could travel to the next window (a fresh machine compiles cold).
  compile_dir=${TORCHINDUCTOR_CACHE_DIR:-$NKAT_CACHE_DIR/compile}
  compile_size=$( [ -d "$compile_dir" ] && du -sh "$compile_dir" | cut -f1 || echo absent)
  echo "compile caches: $compile_dir $compile_size" \
    "(TORCHINDUCTOR_CACHE_DIR ${TORCHINDUCTOR_CACHE_DIR:-unset}; $NKAT_CACHE_DIR holds:" \
    "$(ls "$NKAT_CACHE_DIR" 2>/dev/null | tr '\n' ' '))"
  tail -c 6000 "$log"; snapshot
fi
