#!/usr/bin/env bash
# Round 11, after the plan margin (koala.drafters.plan.PLAN_MARGIN): the two fp32 EAGLE heads again, same questions
# and settings as command.sh, with the same cached verify and draft profiles (so only the choice rule changed).
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method eagle=heads/smollm2-135m/eagle --method eagle-koala=heads/smollm2-135m/eagle-koala \
  --out docs/results/round11/plan-margin
