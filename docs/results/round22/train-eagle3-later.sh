#!/usr/bin/env bash
# Round 22 (AVX2 EPYC, 2 cores): both shipped eagle3 heads, whose curves were the steepest of round 21, continue at
# an equal budget on the distilled set neither has seen: the 2,080 later-turn ShareGPT answers (runs/cache/later-turns,
# 1.05M tokens, fp32, aux layers 2/15/27; built by docs/results/round20/train-later.sh). Same recipe for both:
# ${STEPS:-375} steps of 8 x 512 (about one pass), the same seed (so the same batches), lr 3e-4 with 20 warm-up steps
# then cosine, unroll 2, fp32; the K=2 head keeps its adversarial term (from step 100 over 100). Held out: the same
# 96-window Spec-Bench split. Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
common=(--data runs/cache/later-turns --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192
  --lr 3e-4 --warmup 20 --batch-size 8 --max-seq-len 512 --unroll 2 --eval-every 75 --max-steps "${STEPS:-375}"
  --dtype float32 --resume)
nice .venv/bin/koala train --head eagle3 --layers 1 --init heads/smollm2-135m/eagle3 \
  --out runs/round22/eagle3 "${common[@]}"
nice .venv/bin/koala train --head eagle3 --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init heads/smollm2-135m/eagle3-koala --out runs/round22/eagle3-koala "${common[@]}"
