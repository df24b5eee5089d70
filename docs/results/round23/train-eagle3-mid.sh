#!/usr/bin/env bash
# Written in round 23, to run once docs/results/round22/cache-mid.sh has finished runs/cache/sharegpt-mid (the
# 4,800 first-turn answers 4,000-8,799, ~1.87M tokens, fp32, aux layers 2/15/27; no eagle3 head has seen them).
# The KOALA question at an equal budget: the shipped eagle3 K=1 head has seen 4.0M tokens, the shipped
# eagle3-KOALA K=2 + adv head 3.24M, so K=2 gets ~245 more steps on the same cache (~0.76M tokens: a step holds
# ~2.7-3.1K tokens, judging by round 22's 2,692 a step; check the first manifest and adjust) and both end at ~5.9M;
# K=1 gets about one pass. One recipe otherwise (round 22's): the same seed, lr 3e-4 (warm-up 20, cosine), unroll 2,
# fp32, the adversarial term from step 100; held out: the 96-window Spec-Bench split. Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
[ -f runs/cache/sharegpt-mid/manifest.json ] || {
  echo "runs/cache/sharegpt-mid is not built yet: run docs/results/round22/cache-mid.sh" >&2; exit 1; }
common=(--data runs/cache/sharegpt-mid --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192
  --lr 3e-4 --warmup 20 --batch-size 8 --max-seq-len 512 --unroll 2 --eval-every 100 --dtype float32 --resume)
nice .venv/bin/koala train --head eagle3 --layers 1 --init heads/smollm2-135m/eagle3 \
  --out runs/round24/eagle3 --max-steps "${K1_STEPS:-600}" "${common[@]}"
nice .venv/bin/koala train --head eagle3 --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init heads/smollm2-135m/eagle3-koala --out runs/round24/eagle3-koala --max-steps "${K2_STEPS:-845}" "${common[@]}"
