#!/usr/bin/env bash
# Round 17 on the Zen 5 host: the EAGLE K=1 head continued this round (docs/results/round17/train-eagle.sh) against
# the round-3 head it started from (taken from git history into runs/eagle-round3),
# each in fp32 and bf16 against vanilla of the same dtype; koala's defaults (plan by measured cost, prompt lookup
# first, gated). 26 Spec-Bench questions (2 per category), 128 new tokens, greedy, 2 threads, one run per question.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
OLD=runs/eagle-round3
mkdir -p $OLD
for f in config.json manifest.json model.safetensors; do
  [ -f $OLD/$f ] || git show 4d8fcfd:$H/eagle/$f > $OLD/$f
done
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method eagle-fp32=$H/eagle --method eagle-round3-fp32=$OLD \
  --method vanilla-bf16=vanilla:dtype=bf16 --method eagle=$H/eagle:dtype=bf16 \
  --method eagle-round3=$OLD:dtype=bf16 \
  --out docs/results/round17/bench
# The second fp32 run (docs/results/round17/bench-fp32/): the new head with its own plan, the round-3 head, and the
# new head held to the round-3 head's plan.
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method eagle-fp32=$H/eagle --method eagle-round3-fp32=$OLD \
  --method eagle-fp32-d1=$H/eagle:tree=dynamic,depth=1,total_tokens=4 \
  --out docs/results/round17/bench-fp32
