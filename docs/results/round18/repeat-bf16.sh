#!/usr/bin/env bash
# Round 18: the bf16 heads again (a second single run of the same 26 questions, bf16 as the main dtype), to see how
# much of a 2-question category's figure is run-to-run noise; eagle-train has the same plan as eagle.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala \
  --method medusa=$H/medusa --method medusa-koala=$H/medusa-koala \
  --method eagle-train=runs/uncalibrated/eagle \
  --out docs/results/round18/repeat-bf16
