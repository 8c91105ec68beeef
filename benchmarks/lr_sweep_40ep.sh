#!/usr/bin/env bash
# Which peak learning rate at batch 512 opens the CIFAR-10 gate for the user's full recipe? 40-epoch
# runs of the baseline side by side on one GPU (their epoch times are not speed measurements).
# Run from the repo root after staging the data:
#   bash benchmarks/lr_sweep_40ep.sh high   # peak 1.6e-3, 3.2e-3, batch 128 at 4e-4, seed 1 at 8e-4
#   bash benchmarks/lr_sweep_40ep.sh low    # peak 4e-4, 2e-4, and 4e-4 with weight decay 0.1
# Flags are written for the current rule (peak = lr * (batch/32)^0.25, so lr = peak / 2 at 512).
# results/gpu/session3/lr_*.json were made before that rule, under the square-root rule
# (peak = 4 x lr at 512) with the flags --lr 4e-4 / 8e-4 / --batch_size 128 / --seed 1, and
# --lr 1e-4 / 5e-5 / 1e-4 --weight_decay 0.1: the same peak learning rates as below.
set -u
source "$(dirname "$0")/gpu_env.sh"
phase=${1:?usage: lr_sweep_40ep.sh high|low}
r() { n=$1; shift; (timeout ${SWEEP_TIMEOUT:-540} python -m nkat_search train --compile --quiet --out $RUNS/lr_$n "$@" > $RUNS/lr_$n.log 2>&1; echo "$n rc=$?" >> $RUNS/lr_$n.log) & }
case $phase in
high) names="lr_x2 lr_x4 bs128 seed1"
      r lr_x2 --lr 8e-4; r lr_x4 --lr 1.6e-3; r bs128 --batch_size 128 --lr 2.8284e-4; r seed1 --seed 1 --lr 4e-4 ;;
low)  names="lr_x0.5 lr_x0.25 lr_x0.5_wd0.1"
      r lr_x0.5 --lr 2e-4; r lr_x0.25 --lr 1e-4; r lr_x0.5_wd0.1 --lr 2e-4 --weight_decay 0.1 ;;
*) echo "unknown phase '$phase' (high or low)"; exit 2 ;;
esac
wait
for n in $names; do echo "== $n"; tail -3 $RUNS/lr_$n.log; cp $RUNS/lr_$n/metrics.json $OUT/lr_$n.json; done 2>&1 | tee $OUT/lr_sweep_${phase}_log.txt
