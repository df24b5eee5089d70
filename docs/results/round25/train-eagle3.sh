#!/usr/bin/env bash
# Round 25: the eagle3 pair continued on the 2,800 ShareGPT first-turn answers 6,000-8,799 no eagle3 head has seen
# (runs/cache/sharegpt-6000-8799 from docs/results/round25/cache.sh, 1.09M tokens). K=1 from the shipped eagle3/
# (round 24's continuation); K=2 + adv from round 24's continuation of eagle3-koala/ (runs/round24/eagle3-koala,
# kept on the Zen 4 host), so both have seen the same answers 4,000-5,999 first. Round 24's recipe otherwise
# (lr 3e-4, warm-up 20, cosine, unroll 2, fp32, adversarial term from step 100). Resumable.
set -euo pipefail
cd "$(dirname "$0")/../../.."
[ -f runs/cache/sharegpt-6000-8799/manifest.json ] || {
  echo "runs/cache/sharegpt-6000-8799 is not built yet: run docs/results/round25/cache.sh" >&2; exit 1; }
common=(--data runs/cache/sharegpt-6000-8799 --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192
  --lr 3e-4 --warmup 20 --batch-size 8 --max-seq-len 512 --unroll 2 --eval-every 140 --dtype float32 --resume
  --max-steps "${STEPS:-420}")
nice .venv/bin/koala train --head eagle3 --layers 1 --init heads/smollm2-135m/eagle3 --out runs/round25/eagle3 \
  "${common[@]}"
koala_init=runs/round24/eagle3-koala/head
[ -d $koala_init ] || koala_init=heads/smollm2-135m/eagle3-koala
nice .venv/bin/koala train --head eagle3 --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init $koala_init --out runs/round25/eagle3-koala "${common[@]}"
