#!/usr/bin/env bash
# Round 14 on a new host (AMD EPYC Zen 5: AVX-512 with BF16 instructions, no AMX): the shipped heads with koala's
# defaults, prompt lookup and HF generate, fp32 and bf16 side by side. 26 Spec-Bench questions (2 per category),
# 128 new tokens, greedy, 2 threads, one run per question, nothing else running.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate --method eagle-fp32=$H/eagle \
  --method pld-bf16=pld:dtype=bf16 --method eagle=$H/eagle:dtype=bf16 --method eagle-koala=$H/eagle-koala:dtype=bf16 \
  --method medusa=$H/medusa:dtype=bf16 --method medusa-koala=$H/medusa-koala:dtype=bf16 --out docs/results/round14/bench
