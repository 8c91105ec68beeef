#!/usr/bin/env bash
# The issue-4 measurements on a one-GPU machine, in two device calls (each under 10 minutes).
# Run from the repo root after staging the data (bash ../shared/device/stage.sh mnist
# fashion_mnist cifar10); logs and results land in $OUT.
#   bash benchmarks/gpu_one_gpu_session.sh bench      # throughput benchmark, then the smoke test alone
#   bash benchmarks/gpu_one_gpu_session.sh accuracy   # 40-epoch baseline on CIFAR-10, MNIST and
#       # Fashion-MNIST side by side on the one GPU, the Stage 2 table over all four datasets, and
#       # two more 40-epoch CIFAR-10 runs: the baseline with seed 1 (how much a seed moves the
#       # gate) and crop + flip only (the plain recipe the issue compares against). Runs sharing
#       # the GPU: their epoch times are not speed measurements.
set -u
source "$(dirname "$0")/gpu_env.sh"
phase=${1:?usage: gpu_one_gpu_session.sh bench|accuracy}
log=$OUT/${phase}_log.txt
{ date -u; nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee -a "$log"
case $phase in
bench)
  {
    echo "== throughput"; timeout 300 python benchmarks/throughput.py --out "$OUT/throughput.json"
    echo "== smoke (alone on the GPU)"; start=$(date +%s)
    timeout 240 python -m nkat_search smoke --compile --quiet --out "$RUNS/smoke"
    echo "smoke rc=$? wall_s=$(( $(date +%s) - start ))"
    cp "$RUNS/smoke/smoke.json" "$OUT/smoke.json"
  } 2>&1 | tee -a "$log"
  ;;
accuracy)
  side=${SIDE_TIMEOUT:-470}
  run() { local name=$1; shift; (start=$(date +%s); "$@" > "$RUNS/$name.log" 2>&1
          echo "$name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$RUNS/$name.log") & }
  run cifar10 timeout 500 python -m nkat_search stage2 --datasets cifar10 --compile --out "$RUNS/stage2"
  run gray timeout 500 python -m nkat_search stage2 --datasets mnist fashion_mnist --compile --out "$RUNS/stage2"
  run seed1 timeout "$side" python -m nkat_search train --seed 1 --compile --out "$RUNS/seed1"
  run plain timeout "$side" python -m nkat_search train --randaugment 0 0 --mixup 0 --cutmix 0 \
      --cutout 0 --compile --out "$RUNS/plain"
  wait
  {
    for name in cifar10 gray seed1 plain; do
      echo "== $name"; tr '\r' '\n' < "$RUNS/$name.log" | grep -E "^(epoch|cifar10|mnist|fashion|wrote|[a-z0-9]+ rc=)|Error|error" | tail -90
    done
    echo "== Stage 2 table (all four; finished checkpoints are evaluated, not retrained)"
    timeout 90 python -m nkat_search stage2 --compile --quiet --out "$RUNS/stage2"
    cp "$RUNS/stage2/stage2.json" "$RUNS/stage2/stage2.md" "$OUT/"
    for name in seed1 plain; do cp "$RUNS/$name/metrics.json" "$OUT/${name}_metrics.json"; done
    date -u
  } 2>&1 | tee -a "$log"
  ;;
*) echo "unknown phase '$phase' (bench or accuracy)"; exit 2 ;;
esac
