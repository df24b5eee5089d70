#!/usr/bin/env bash
# Round 16 on the AMD EPYC Zen 5 host (AVX-512 with BF16 instructions, no AMX), after koala's AVX-512 kernels: the
# shipped heads with koala's defaults, prompt lookup, HF generate (on koala's kernels) and stock HF generate, fp32
# and bf16 side by side. 26 Spec-Bench questions (2 per category), 128 new tokens, greedy, 2 threads, one run per
# question, nothing else running.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate --method hf-stock --method eagle-fp32=$H/eagle \
  --method vanilla-bf16=vanilla:dtype=bf16 --method hf-generate-bf16=hf-generate:dtype=bf16 \
  --method hf-stock-bf16=hf-stock:dtype=bf16 --method pld-bf16=pld:dtype=bf16 \
  --method eagle=$H/eagle:dtype=bf16 --method eagle-koala=$H/eagle-koala:dtype=bf16 \
  --method medusa=$H/medusa:dtype=bf16 --method medusa-koala=$H/medusa-koala:dtype=bf16 \
  --method eagle3=$H/eagle3:dtype=bf16 --method eagle3-koala=$H/eagle3-koala:dtype=bf16 \
  --out docs/results/round16/bench
