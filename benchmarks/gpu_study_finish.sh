#!/usr/bin/env bash
# A study's last window and then its winner's Stage 2 on the test splits (issue 23's step 3), in
# as few device calls as possible: every call between two is a chance to lose the machine (it
# keeps files and processes only 30 s after a call).
#
#   RESUME_DB=results/round2/NAME/NAME.db bash benchmarks/gpu_study_finish.sh STUDY_FILE WAIT_S [up flags...]
#
# Each call: until up has ended on this machine with the study finished (`status --json`:
# nothing left, nothing running or queued), one gpu_study_window.sh call (same arguments; it
# starts up again if an earlier run ended by its --timeout); then the winner's configuration
# (up's export/best.yaml) through `nkat-search stage2 --val_fraction 0` with gpu_detached.sh, in
# the same call, for what is left of WAIT_S. Make the next call within 30 s until it prints
# "stage2_NAME ended"; stage2.json and stage2.md then come back in $OUT as
# stage2_NAME_stage2.json and stage2_NAME_stage2.md, beside the study's files.
set -uo pipefail
study_file=$1 wait_s=$2; shift 2
here=$(dirname "$0")
source "$here/gpu_env.sh"
began=$SECONDS
name=$(python3 -c 'import sys,yaml; print(yaml.safe_load(open(sys.argv[1]))["name"])' "$study_file")
runs=$RUNS/$name pidfile=$RUNS/$name/up.pid
# up ended here: it was started on this machine (its pid file) and is no longer running.
up_ended() { [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; }
# Every configuration of the budget finished, none running or queued (status --json).
finished() {
  python3 -m nkat_search status --study "$name" --storage "$runs/$name.db" --json |
    python3 -c 'import json,sys; b=json.load(sys.stdin)["budget"]
sys.exit(0 if b["left"] == 0 and not {"RUNNING", "WAITING"} & set(b["states"]) else 1)'
}
if ! { up_ended && finished; }; then
  bash "$here/gpu_study_window.sh" "$study_file" "$wait_s" "$@"
  up_ended || exit 0
  if ! finished; then
    echo "$name is not finished (up ended before it; its log is above): the next call starts up again"
    exit 0
  fi
fi
best=$runs/$name/export/best.yaml
[ -f "$best" ] || { echo "no $best: the study has no trial to re-run" >&2; exit 1; }
left=$(( wait_s - (SECONDS - began) )); (( left < 5 )) && left=5
out=$runs/stage2_test
COPY="$out/stage2.json $out/stage2.md" bash "$here/gpu_detached.sh" "stage2_$name" "$left" -- \
  python3 -m nkat_search stage2 --config "$best" --val_fraction 0 --data-dir "$NKAT_DATA_DIR" \
  --out "$out" --quiet
