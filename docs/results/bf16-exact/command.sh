#!/usr/bin/env bash
# fp32 and bf16 side by side in one interleaved run (26 Spec-Bench questions, 2 per category, 128 new tokens,
# greedy, 2 threads, idle machine). bf16 methods run on a bf16 copy of the target with exact attention; each is
# checked against bf16 vanilla (added automatically) and timed against fp32 vanilla too.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 \
  --method hf-generate --method eagle=heads/smollm2-135m/eagle --method eagle-koala=heads/smollm2-135m/eagle-koala \
  --method hf-generate-bf16=hf-generate:dtype=bf16 --method eagle-bf16=heads/smollm2-135m/eagle:dtype=bf16 \
  --method eagle-koala-bf16=heads/smollm2-135m/eagle-koala:dtype=bf16 \
  --out docs/results/bf16-exact
