#!/usr/bin/env bash
# Round 14: two more adversarial designs at EAGLE K=2, seed 0, on the ablation's caches and recipe (run after
# docs/results/ablation/command.sh): the term switched on late (step 150, over 20 steps, during the cosine's tail)
# and a 5x smaller lambda (0.02), the latter with a second seed.
set -e
cd "$(dirname "$0")/../../.."
common=(--data runs/cache/sharegpt --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192
        --max-steps 200 --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 50 --unroll 1
        --adv-start 40 --adv-warmup 40 --device cpu --bf16)
.venv/bin/koala train --head eagle --layers 2 --adversarial --seed 0 --out runs/ablation/eagle-k2-advlate-s0 "${common[@]}" --adv-start 150 --adv-warmup 20 > runs/ablation/eagle-k2-advlate-s0.log 2>&1
.venv/bin/koala train --head eagle --layers 2 --adversarial --seed 0 --out runs/ablation/eagle-k2-advsmall-s0 "${common[@]}" --adv-weight 0.02 > runs/ablation/eagle-k2-advsmall-s0.log 2>&1
.venv/bin/koala train --head eagle --layers 2 --adversarial --seed 1 --out runs/ablation/eagle-k2-advsmall-s1 "${common[@]}" --adv-weight 0.02 > runs/ablation/eagle-k2-advsmall-s1.log 2>&1
