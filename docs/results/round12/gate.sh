#!/usr/bin/env bash
# Round 12: what the gate and the prompt lookup in front of the head cost or save, all 26 questions (2 per
# category, 128 new tokens, greedy, bf16, 2 threads, one run per question): the shipped EAGLE K=1 head with koala's
# defaults, ungated, without lookup, and with neither.
set -e
cd "$(dirname "$0")/../../.."
E=heads/smollm2-135m/eagle
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method eagle=$E --method eagle-nogate=$E:gate=off --method eagle-nolookup=$E:lookup=0 \
  --method eagle-bare=$E:gate=off,lookup=0 --out docs/results/round12/gate
