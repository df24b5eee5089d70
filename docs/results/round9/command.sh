#!/usr/bin/env bash
# Round 9, on the AVX2-only AMD EPYC (2 cores) of rounds 7-8, with round 8's kernels plus fused decoder layers
# (koala.fused_layer): every method in one interleaved run (26 Spec-Bench questions, 2 per category, 128 new tokens,
# greedy, 2 threads). fp32 methods run on the fp32 target; bf16 methods on a bf16 copy, each checked against bf16
# vanilla (added automatically) and timed against fp32 vanilla; HF generate runs in both dtypes.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate --method hf-generate-bf16=hf-generate:dtype=bf16 \
  --method eagle=heads/smollm2-135m/eagle --method eagle-koala=heads/smollm2-135m/eagle-koala \
  --method pld-bf16=pld:dtype=bf16 \
  --method medusa-koala-bf16=heads/smollm2-135m/medusa-koala:dtype=bf16 \
  --method eagle-bf16=heads/smollm2-135m/eagle:dtype=bf16 \
  --method eagle-koala-bf16=heads/smollm2-135m/eagle-koala:dtype=bf16 \
  --out docs/results/round9
