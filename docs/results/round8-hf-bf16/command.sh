#!/usr/bin/env bash
# Round 8 rerun of HF generate in bf16 after the fix that gives HF's own bf16 cache koala's attention bits
# (commit ccdbdde); same questions and settings as docs/results/round8/command.sh.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate-bf16=hf-generate:dtype=bf16 \
  --out docs/results/round8-hf-bf16
