#!/usr/bin/env bash
# Round 20, after train-later.sh: the EAGLE-KOALA head continued on the later-turn answers, calibrated in the loop
# (bf16), beside the shipped EAGLE and EAGLE-KOALA heads and its round-20 starting point; bench-clock.sh's setup
# (bf16 target, 26 Spec-Bench questions, 128 new tokens, greedy, 2 threads, one run per question).
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=runs/round20
d=$R/eagle-koala-later/head
.venv/bin/python -c "import json,sys; sys.exit('rank_acceptance' in json.load(open('$d/config.json'))['extra'])" \
  && .venv/bin/koala calibrate $d --dtype bfloat16
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala \
  --method eagle-koala-r20=$R/eagle-koala/head --method eagle-koala-later=$d \
  --out docs/results/round20/bench-later
