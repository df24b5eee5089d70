#!/usr/bin/env bash
# Round 20 (AVX2 EPYC, 2 cores, fp32): the KOALA question at equal budget. Both EAGLE heads of round 3 (2.61M tokens
# each of the first 8,800 distilled ShareGPT first turns: K=1 supervised acc@1 0.432, K=2 + adversarial 0.456)
# continue on the same new data with the same steps, seed and schedule: the 1,419 first-turn answers they never saw
# (answers 8,800-10,218, runs/cache/sharegpt-new, built by ../round19/train-medusa.sh) plus the 538 Spec-Bench-shaped
# task answers (runs/cache/tasks), ${STEPS:-560} steps of batch 8 x 512, lr 5e-4, 20 warm-up steps then cosine,
# unroll 1, the adversarial term switched on again from step 100 over 100 steps (round 3's flags). Held out: the
# 96-window split of the Spec-Bench answer cache (each init head is scored at step 0). Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
koala=.venv/bin/koala
[ -f runs/cache/tasks/manifest.json ] || nice $koala cache --data data/smollm2-135m/task-answers.jsonl.gz \
  --out runs/cache/tasks --max-length 1400 --dtype float32 --aux-layers 2,15,27
for h in eagle:4d8fcfd eagle-koala:HEAD; do  # the round-3 heads (the shipped EAGLE was continued in round 17)
  d=runs/round20/init-${h%%:*}; mkdir -p $d
  for f in config.json manifest.json model.safetensors; do
    [ -f $d/$f ] || git show ${h#*:}:heads/smollm2-135m/${h%%:*}/$f > $d/$f
  done
done
common=(--data runs/cache/sharegpt-new runs/cache/tasks --eval-data runs/cache/specbench --eval-sequences 96
  --unroll 1 --lr 5e-4 --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 100 --max-steps "${STEPS:-560}"
  --dtype float32 --resume)
nice $koala train --head eagle --layers 2 --adversarial --adv-start 100 --adv-warmup 100 \
  --init runs/round20/init-eagle-koala --out runs/round20/eagle-koala "${common[@]}"
nice $koala train --head eagle --layers 1 --init runs/round20/init-eagle --out runs/round20/eagle "${common[@]}"
