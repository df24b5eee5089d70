#!/usr/bin/env bash
# Spec-Bench, 2 questions per category, 128 tokens, greedy, fp32, 2 threads (distillation paused while it runs)
set -e
cd "$(dirname "$0")/../.."
H=heads/smollm2-135m
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 --max-new-tokens 128 \
  --threads 2 --method hf-generate --method pld --method medusa=$H/medusa --method medusa-koala=$H/medusa-koala \
  --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala --method eagle-head-only=$H/eagle:lookup=0 \
  --method eagle-ungated=$H/eagle:gate=off --out runs/bench/round3
