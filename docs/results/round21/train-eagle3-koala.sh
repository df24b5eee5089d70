#!/usr/bin/env bash
# Round 21 (AVX2 EPYC, 2 cores): the shipped eagle3-KOALA head (K=2 + adversarial, 1.08M tokens: the first 4,000
# ShareGPT first-turn answers) gets the continuation the eagle3 K=1 head got in round 19
# (docs/results/round19/train-eagle3.sh): the same 1,419 answers it never saw (runs/cache/sharegpt-new, fp32, aux
# layers 2/15/27), the same 446 steps of 8 x 512 and seed (so the same batches), lr 5e-4 with 20 warm-up steps then
# cosine, unroll 2, fp32; the adversarial term from step 100 over 100, as in its first training. Held out: the same
# 96-window Spec-Bench split. Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
nice .venv/bin/koala train --head eagle3 --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init heads/smollm2-135m/eagle3-koala --lr 5e-4 \
  --data runs/cache/sharegpt-new --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192 \
  --warmup 20 --batch-size 8 --max-seq-len 512 --unroll 2 --eval-every 100 --max-steps 446 \
  --dtype float32 --out runs/round21/eagle3-koala --resume
