#!/usr/bin/env bash
# Round 12: the four shipped heads and prompt lookup on Spec-Bench (2 questions per category, 128 new tokens,
# greedy, 2 threads), each question timed 3 times per method (median kept), so that a category's ratio is not one
# noisy run. fp32 vanilla is the baseline; bf16 vanilla runs automatically beside the bf16 methods.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 --runs 3 \
  --method eagle=heads/smollm2-135m/eagle --method eagle-koala=heads/smollm2-135m/eagle-koala \
  --method pld-bf16=pld:dtype=bf16 \
  --method medusa-bf16=heads/smollm2-135m/medusa:dtype=bf16 \
  --method medusa-koala-bf16=heads/smollm2-135m/medusa-koala:dtype=bf16 \
  --method eagle-bf16=heads/smollm2-135m/eagle:dtype=bf16 \
  --method eagle-koala-bf16=heads/smollm2-135m/eagle-koala:dtype=bf16 \
  --out docs/results/round12/bench
