#!/usr/bin/env bash
# Round 24, a new host: AMD EPYC Zen 4 (AVX-512 with bf16 dot products, no AMX), 2 cores. The shipped EAGLE and
# eagle3 heads, the eagle3 pair continued this round (docs/results/round24/train-eagle3.sh) and HF generate against
# vanilla in one run: bf16 target, the 26 Spec-Bench questions (2 per category), 128 new
# tokens, greedy, 2 threads, three timed runs per question (median kept), nothing else running (pause any
# background job with kill -STOP). Each head drafts with the plan koala chooses on this host.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=runs/round24
new=()
for h in eagle3 eagle3-koala; do
  [ -f $R/$h/head/config.json ] && new+=(--method "$h-r24=$R/$h/head")
done
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 3 \
  --method hf-generate --method eagle=$H/eagle --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala \
  "${new[@]}" \
  --out docs/results/round24/bench
