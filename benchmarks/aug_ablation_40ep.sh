#!/usr/bin/env bash
# Which part of the user's augmentation costs the 40-epoch baseline its CIFAR-10 gate: four
# 40-epoch runs of the baseline, each with one part removed or weakened, side by side on one GPU
# (their epoch times are not speed measurements). Run from the repo root after staging the data.
#   bash benchmarks/aug_ablation_40ep.sh
# This is the command that made results/gpu/session2/abl_*.json and ablation40_log.txt.
set -u
source "$(dirname "$0")/gpu_env.sh"
r() { n=$1; shift; (timeout 420 python -m nkat_search train --compile --quiet --out $RUNS/abl_$n "$@" > $RUNS/abl_$n.log 2>&1; echo "$n rc=$?" >> $RUNS/abl_$n.log) & }
r no_ra --randaugment 0 0; r no_mix --mixup 0 --cutmix 0; r no_cutout --cutout 0; r ra_2_5 --randaugment 2 5
wait
for n in no_ra no_mix no_cutout ra_2_5; do echo "== $n"; tail -3 $RUNS/abl_$n.log; cp $RUNS/abl_$n/metrics.json $OUT/abl_$n.json; done 2>&1 | tee $OUT/ablation40_log.txt
