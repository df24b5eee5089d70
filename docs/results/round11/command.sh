#!/usr/bin/env bash
# Round 11, the AVX2-only AMD EPYC (2 cores): vanilla, HF generate, prompt lookup and the four shipped heads in one
# interleaved run (26 Spec-Bench questions, 2 per category, 128 new tokens, greedy, 2 threads). fp32 methods run on
# the fp32 target; bf16 methods on a bf16 copy, checked against bf16 vanilla (added automatically) and timed
# against fp32 vanilla. Every head uses the library defaults (plan by measured cost, 3-gram lookup first, gate).
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate \
  --method eagle=heads/smollm2-135m/eagle --method eagle-koala=heads/smollm2-135m/eagle-koala \
  --method pld-bf16=pld:dtype=bf16 \
  --method medusa-bf16=heads/smollm2-135m/medusa:dtype=bf16 \
  --method medusa-koala-bf16=heads/smollm2-135m/medusa-koala:dtype=bf16 \
  --method eagle-bf16=heads/smollm2-135m/eagle:dtype=bf16 \
  --method eagle-koala-bf16=heads/smollm2-135m/eagle-koala:dtype=bf16 \
  --out docs/results/round11/bench
