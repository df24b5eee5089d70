#!/usr/bin/env bash
# Round 21 (AVX2 EPYC, 2 cores): the shipped EAGLE-class heads and the round-20/21 continuations beside them, bf16
# target, the 26 Spec-Bench questions (2 per category), 128 new tokens, greedy, 2 threads, one timed run per
# question, nothing else running. Heads without an in-loop acceptance table are calibrated first (bf16). (A run
# with three timed runs per question and HF generate and the Medusa pair beside took ~220 s a question on the VM
# that day, ~95 minutes, and was stopped after two questions.)
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
for d in runs/round20/eagle-koala-later/head runs/round21/eagle3-koala/head; do
  .venv/bin/python -c "import json,sys; sys.exit('rank_acceptance' in json.load(open('$d/config.json'))['extra'])" \
    && .venv/bin/koala calibrate $d --dtype bfloat16
done
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method pld=pld \
  --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala \
  --method eagle-koala-later=runs/round20/eagle-koala-later/head \
  --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala \
  --method eagle3-koala-r21=runs/round21/eagle3-koala/head \
  --out docs/results/round21/bench
