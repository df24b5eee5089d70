#!/usr/bin/env bash
# Round 10: koala's vanilla loop against transformers' generate, with koala's CPU kernels (hf-generate: the loop
# alone differs) and without them (hf-stock: what plain transformers gives), in fp32 and bf16. AVX2-only AMD EPYC,
# 2 cores, 13 Spec-Bench questions (1 per category), 128 new tokens, greedy, 2 threads, nothing else running.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 1 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate --method hf-stock \
  --method vanilla-bfloat16=vanilla:dtype=bf16 \
  --method hf-generate-bf16=hf-generate:dtype=bf16 --method hf-stock-bf16=hf-stock:dtype=bf16 \
  --out docs/results/round10-stock
