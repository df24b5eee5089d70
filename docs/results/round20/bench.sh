#!/usr/bin/env bash
# Round 20 (AVX2 EPYC, 2 cores): the equal-budget EAGLE pair of train-eagle.sh beside the shipped heads, in bf16 (the
# faster dtype on this CPU, round 18) with fp32 vanilla for reference (the target loads in fp32; every other method
# runs on a bf16 copy); every new head calibrated in the loop first (`koala calibrate`). 26 Spec-Bench questions
# (2 per category), 128 new tokens, greedy, 2 threads, one run per question, methods interleaved per question;
# koala's defaults otherwise (plan by measured cost, lookup first, gated). See bench-clock.sh for why it ran twice.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=runs/round20
for d in $R/eagle/head $R/eagle-koala/head; do
  .venv/bin/python -c "import json,sys; sys.exit('rank_acceptance' in json.load(open('$d/config.json'))['extra'])" \
    && .venv/bin/koala calibrate $d --dtype bfloat16
done
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method vanilla-bf16=vanilla:dtype=bf16 --method hf-generate-bf16=hf-generate:dtype=bf16 \
  --method eagle=$H/eagle:dtype=bf16 --method eagle-koala=$H/eagle-koala:dtype=bf16 \
  --method eagle-r20=$R/eagle/head:dtype=bf16 --method eagle-koala-r20=$R/eagle-koala/head:dtype=bf16 \
  --method eagle3=$H/eagle3:dtype=bf16 --method eagle3-koala=$H/eagle3-koala:dtype=bf16 \
  --out docs/results/round20/bench
