#!/usr/bin/env bash
# Does the learning-rate rule or the step count, both ours to choose, open the CIFAR-10 gate for the
# user's full recipe? Four 40-epoch runs of the baseline side by side on one GPU (their epoch times
# are not speed measurements): peak learning rate x2 and x4 of the square-root rule at batch 512
# (x4 = the linear rule, 2e-4 * 512/32), batch 128 under the square-root rule (4x the steps), and
# the unchanged baseline with seed 1 (how far a seed moves the accuracy). Run from the repo root
# after staging the data:
#   bash benchmarks/lr_sweep_40ep.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
r() { n=$1; shift; (timeout ${SWEEP_TIMEOUT:-540} python -m nkat_search train --compile --quiet --out $RUNS/lr_$n "$@" > $RUNS/lr_$n.log 2>&1; echo "$n rc=$?" >> $RUNS/lr_$n.log) & }
r lr_x2 --lr 4e-4; r lr_x4 --lr 8e-4; r bs128 --batch_size 128; r seed1 --seed 1
wait
for n in lr_x2 lr_x4 bs128 seed1; do echo "== $n"; tail -3 $RUNS/lr_$n.log; cp $RUNS/lr_$n/metrics.json $OUT/lr_$n.json; done 2>&1 | tee $OUT/lr_sweep_log.txt
