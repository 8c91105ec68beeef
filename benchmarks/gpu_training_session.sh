#!/usr/bin/env bash
# The issue-4 measurements in one device call (two GPUs): throughput benchmark, smoke test and the
# 40-epoch baseline on GPU 0 while MNIST and Fashion-MNIST train on GPU 1; then one Stage 2 table
# over all four datasets (EMNIST is reported missing when its files are absent). Run from the repo
# root after staging the data (../shared/device/stage.sh); logs and results land in $OUT.
#   bash benchmarks/gpu_training_session.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
log=$OUT/log.txt
{
  date -u; nvidia-smi --query-gpu=index,name,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__)"
  python -c "from nkat_search.train.data import load_split
for n in ('mnist', 'fashion_mnist', 'cifar10'):
    for s in ('train', 'test'): print(n, s, load_split(n, s, None)[0].shape)"
} 2>&1 | tee -a "$log"
(CUDA_VISIBLE_DEVICES=1 python -m nkat_search stage2 --datasets mnist fashion_mnist --compile \
   --out "$RUNS/stage2" --quiet > "$RUNS/stage2_gpu1.log" 2>&1; echo "gpu1 stage2 rc=$?" >> "$RUNS/stage2_gpu1.log") &
gpu1=$!
{
  echo "== throughput (GPU 0)"; CUDA_VISIBLE_DEVICES=0 python benchmarks/throughput.py --out "$OUT/throughput.json"
  echo "== smoke (GPU 0)"; time CUDA_VISIBLE_DEVICES=0 python -m nkat_search smoke --compile --quiet --out "$RUNS/smoke"; echo "smoke rc=$?"
  cp "$RUNS/smoke/smoke.json" "$OUT/smoke.json"
  echo "== cifar10 40 epochs (GPU 0)"; CUDA_VISIBLE_DEVICES=0 python -m nkat_search stage2 --datasets cifar10 --compile --out "$RUNS/stage2"
} 2>&1 | tee -a "$log"
wait $gpu1
{
  echo "== GPU 1 log"; tail -5 "$RUNS/stage2_gpu1.log"
  echo "== Stage 2 table (all four; finished checkpoints are evaluated, not retrained)"
  CUDA_VISIBLE_DEVICES=0 python -m nkat_search stage2 --compile --quiet --out "$RUNS/stage2"
  cp "$RUNS/stage2/stage2.json" "$RUNS/stage2/stage2.md" "$OUT/"
  date -u
} 2>&1 | tee -a "$log"
