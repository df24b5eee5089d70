#!/usr/bin/env bash
# Round 13: the reworked gate (ratio of decayed sums, stop only when even an optimistic drafting rate loses) against
# drafting every step, for the shipped EAGLE and Medusa K=1 heads with koala's other defaults: all 26 questions
# (2 per category, 128 new tokens, greedy, bf16, 2 threads, one run per question).
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method eagle=$H/eagle --method eagle-nogate=$H/eagle:gate=off \
  --method medusa=$H/medusa --method medusa-nogate=$H/medusa:gate=off --out docs/results/round13/gate
