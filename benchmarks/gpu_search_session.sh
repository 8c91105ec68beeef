#!/usr/bin/env bash
# The search-service measurement (issue 5) in one device call on a GPU machine: a short Round 2
# (studies/round2_short.yaml: 8 trials, 8 epochs) with `nkat-search up` on embedded SQLite, one
# worker per visible GPU, then the status table, the export, and the best exported config re-run
# with `nkat-search stage2 --config`. Run from the repo root after staging the data
# (bash ../shared/device/stage.sh mnist fashion_mnist cifar10); results land in $OUT.
#   bash benchmarks/gpu_search_session.sh [extra flags for up, e.g. --trials-per-gpu 2]
set -u
source "$(dirname "$0")/gpu_env.sh"
study=nkat-round2-short
storage="sqlite:///$RUNS/up/$study.db"
log=$OUT/search_log.txt
{
  date -u; nvidia-smi --query-gpu=index,name --format=csv,noheader
  # optuna-dashboard is not on the GPU machine: no dashboard there.
  start=$(date +%s)
  python -m nkat_search up --study studies/round2_short.yaml --out "$RUNS/up" --no-dashboard --top 3 "$@"
  echo "up $* rc=$? wall_s=$(( $(date +%s) - start ))"
  python -m nkat_search status --study "$study" --storage "$storage" --json > "$OUT/round2_short_status.json"
  cp "$RUNS/up/$study/export/best.yaml" "$OUT/round2_short_best.yaml"
  for f in "$RUNS/up/$study"/logs/*.log; do tr '\r' '\n' < "$f" | grep -v "step/s" > "$OUT/round2_short_$(basename "$f")"; done
  echo "== best exported config re-run exactly with stage2"
  python -m nkat_search stage2 --config "$RUNS/up/$study/export/best.yaml" --quiet --out "$RUNS/best_stage2"
  cp "$RUNS/best_stage2/stage2.md" "$OUT/round2_short_best_stage2.md"
  date -u
} 2>&1 | tee -a "$log"
