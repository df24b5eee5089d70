#!/usr/bin/env bash
# Round 11, after the plan margin: the four heads and prompt lookup in bf16 again (same questions and settings as
# command.sh, same cached profiles), against bf16 vanilla (added automatically) and fp32 vanilla.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method pld-bf16=pld:dtype=bf16 \
  --method medusa-bf16=heads/smollm2-135m/medusa:dtype=bf16 \
  --method medusa-koala-bf16=heads/smollm2-135m/medusa-koala:dtype=bf16 \
  --method eagle-bf16=heads/smollm2-135m/eagle:dtype=bf16 \
  --method eagle-koala-bf16=heads/smollm2-135m/eagle-koala:dtype=bf16 \
  --out docs/results/round11/plan-margin-bf16
