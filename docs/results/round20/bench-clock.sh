#!/usr/bin/env bash
# Round 20, second run, after draft profiles are read on the verify profile's clock (koala.drafters.plan): in
# bench.sh's run the EAGLE-KOALA-r20 head's draft profile had been taken while this VM ran ~3.5x slow (8.1 ms a
# step against 2.2-2.5 ms idle) and the planner dropped the head. Every draft profile re-measured (the old ones lack
# the plain-forward reference), bf16 target, the same 26 Spec-Bench questions, 128 new tokens, greedy, 2 threads.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=runs/round20
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala \
  --method eagle-r20=$R/eagle/head --method eagle-koala-r20=$R/eagle-koala/head \
  --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala \
  --out docs/results/round20/bench-clock
