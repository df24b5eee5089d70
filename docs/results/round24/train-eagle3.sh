#!/usr/bin/env bash
# Round 24: both shipped eagle3 heads continued on the same 0.77M tokens no eagle3 head has seen (the 2,000
# ShareGPT first-turn answers 4,000-5,999 in runs/cache/sharegpt-mid2k, from docs/results/round24/cache.sh; bf16
# target this time, the shipped heads saw fp32 caches). The KOALA question on equal increments: K=1 goes from
# 2.99M to ~3.8M tokens, K=2 + adv from 3.25M to ~4.0M. Round 22's recipe otherwise: lr 3e-4 (warm-up 20, cosine),
# unroll 2, fp32, the adversarial term from step 100; held out: the 96-window Spec-Bench split. Resumable.
set -euo pipefail
cd "$(dirname "$0")/../../.."
[ -f runs/cache/sharegpt-mid2k/manifest.json ] || {
  echo "runs/cache/sharegpt-mid2k is not built yet: run docs/results/round24/cache.sh" >&2; exit 1; }
common=(--data runs/cache/sharegpt-mid2k --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192
  --lr 3e-4 --warmup 20 --batch-size 8 --max-seq-len 512 --unroll 2 --eval-every 95 --dtype float32 --resume
  --max-steps "${STEPS:-285}")
nice .venv/bin/koala train --head eagle3 --layers 1 --init heads/smollm2-135m/eagle3 --out runs/round24/eagle3 \
  "${common[@]}"
nice .venv/bin/koala train --head eagle3 --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init heads/smollm2-135m/eagle3-koala --out runs/round24/eagle3-koala "${common[@]}"
