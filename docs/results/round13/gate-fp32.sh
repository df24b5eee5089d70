#!/usr/bin/env bash
# Round 13: the reworked gate in fp32, the shipped EAGLE K=1 head gated (koala's defaults) and ungated, all 26
# questions (2 per category, 128 new tokens, greedy, fp32, 2 threads, one run per question).
set -e
cd "$(dirname "$0")/../../.."
E=heads/smollm2-135m/eagle
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method eagle=$E --method eagle-nogate=$E:gate=off --out "${OUT:-docs/results/round13/gate-fp32}"
