#!/usr/bin/env bash
# randomized-SVD oversampling ablation: dqrelo 1/8 (defaults) and svd 1 bpw f4, oversample 10 / 5 / 2
set -euo pipefail
Z=~/.cache/deltakit/zoo; OUT=/tmp/rd/os; cd /work/main; . .venv/bin/activate
for V in shakespeare shakespeare-heavy; do
  C=()
  for OS in 10 5 2; do
    deltakit --threads 1 compress -m dqrelo --base $Z/base $Z/variants/$V -o $OUT/$V-dqrelo-os$OS --ratio 1/8 --set oversample=$OS --overwrite > $OUT/$V-dqrelo-os$OS.log 2>&1
    deltakit --threads 1 compress -m svd --base $Z/base $Z/variants/$V -o $OUT/$V-svd-os$OS --bits-per-weight 1 --set factor_bits=4 --set oversample=$OS --overwrite > $OUT/$V-svd-os$OS.log 2>&1
    C+=($OUT/$V-dqrelo-os$OS $OUT/$V-svd-os$OS)
  done
  deltakit --threads 1 eval --base base --finetune $V "${C[@]}" --max-tokens 2048 --json > $OUT/eval_$V.json 2> $OUT/eval_$V.log
done
echo done > $OUT/DONE
