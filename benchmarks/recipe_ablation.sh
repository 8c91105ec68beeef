#!/usr/bin/env bash
# 10-epoch CIFAR-10 runs of the baseline and variants, three at a time per GPU, to find what holds
# CIFAR-10 accuracy back. Prints one line per variant. Usage (repo root, data staged):
#   bash benchmarks/recipe_ablation.sh OUTDIR
set -u
OUT=${1:-results/ablation}; mkdir -p "$OUT"
export PYTHONPATH=/root/nkat-site:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
common="--epochs 10 --warmup 1 --quiet --no-resume"
# Every variant names the colour LayerNorm explicitly: its default changed after this ablation.
declare -A variants=(
  [baseline]="--color_norm"
  [no_color_ln]="--no-color_norm"
  [no_color_ln_sdpa]="--no-color_norm --top_k 0 --top_p 1.0 --nkat_strength 0"
  [no_color_ln_light_aug]="--no-color_norm --randaugment 0 0 --mixup 0 --cutmix 0 --cutout 0"
  [no_color_ln_patch1]="--no-color_norm --patch_size 1"
  [sdpa_color_ln]="--color_norm --top_k 0 --top_p 1.0 --nkat_strength 0"
)
i=0
for name in "${!variants[@]}"; do
  gpu=$((i % 2)); i=$((i + 1))
  (CUDA_VISIBLE_DEVICES=$gpu python -m nkat_search train $common ${variants[$name]} \
     --out "$OUT/$name" > "$OUT/$name.log" 2>&1; echo "$name rc=$?" >> "$OUT/$name.log") &
done
wait
for name in "${!variants[@]}"; do echo "$name [${variants[$name]}]: $(tail -3 "$OUT/$name.log" | head -1)"; done
