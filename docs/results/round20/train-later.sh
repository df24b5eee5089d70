#!/usr/bin/env bash
# Round 20, after train-eagle.sh: the round-20 EAGLE-KOALA head (K=2 + adversarial, acc@1 0.465) continues on the
# largest distilled set no head has trained on, the 2,080 later-turn ShareGPT answers
# (data/smollm2-135m/sharegpt-later-turns.jsonl.gz: 1.05M tokens, 490K of them replies; cached here in fp32 with
# aux layers 2, 15, 27, ~48 min at ~360-400 tok/s), ${STEPS:-300} steps of 8 x 512 (about 0.8 of a pass), lr 2e-4
# (a gentler warm restart than 5e-4's dip of 0.02 in train-eagle.sh), the adversarial term from step 100 over 100
# steps, fp32. Held out: the same 96-window Spec-Bench split. Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
koala=.venv/bin/koala
[ -f runs/cache/later-turns/manifest.json ] || \
  nice $koala cache --data data/smollm2-135m/sharegpt-later-turns.jsonl.gz \
  --out runs/cache/later-turns --max-length 1400 --dtype float32 --aux-layers 2,15,27
nice $koala train --head eagle --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init runs/round20/eagle-koala/head --out runs/round20/eagle-koala-later --data runs/cache/later-turns \
  --eval-data runs/cache/specbench --eval-sequences 96 --unroll 1 --lr 2e-4 --warmup 20 --batch-size 8 \
  --max-seq-len 512 --eval-every 100 --max-steps "${STEPS:-300}" --dtype float32 --resume
