#!/usr/bin/env bash
# The eagle3 heads in our loop: Spec-Bench, 2 questions per category, 128 tokens, greedy, fp32, 2 threads, idle
# machine; then the K=1 head in llama.cpp (exact build, then the AMX build), same prompts.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 --max-new-tokens 128 \
  --threads 2 --method eagle=$H/eagle --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala \
  --method eagle3-head-only=$H/eagle3:lookup=0 --method eagle3-ungated=$H/eagle3:gate=off --out runs/bench/eagle3
.venv/bin/python scripts/llamacpp_eagle3.py --head $H/eagle3 --out runs/bench/llamacpp-exact --n-max 1 3
.venv/bin/python scripts/llamacpp_eagle3.py --head $H/eagle3 --out runs/bench/llamacpp-amx --amx --llamafile --n-max 1 3
