#!/usr/bin/env bash
# Round 12: the two Spec-Bench qa questions again (3 runs each, bf16, 2 threads), the shipped Medusa K=1 and EAGLE K=1
# heads with and without the gate and the prompt lookup in front of them, to see where command.sh's qa dip came from.
# (Run once with --out runs/qa2-bench, the outputs copied here.)
set -e
cd "$(dirname "$0")/../../.."
mkdir -p runs
grep '"category": "qa"' ../shared/data/spec_bench/question.jsonl | head -2 > runs/qa2.jsonl
M=heads/smollm2-135m/medusa E=heads/smollm2-135m/eagle
.venv/bin/koala bench --questions runs/qa2.jsonl --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 3 \
  --method m=$M --method m-nogate=$M:gate=off --method m-nolookup=$M:lookup=0 --method m-bare=$M:gate=off,lookup=0 \
  --method pld --method e=$E --method e-nolookup=$E:lookup=0 --out docs/results/round12/qa-recheck
