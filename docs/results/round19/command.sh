#!/usr/bin/env bash
# Round 19 on the AVX2-only AMD EPYC (Zen 3): the Medusa heads continued this round (runs/round19/*/head, calibrated
# with `koala calibrate` like the shipped ones) against the shipped round-3 Medusa heads, with the shipped EAGLE
# head for reference; bf16 (koala's default dtype on this CPU), koala's defaults otherwise. 26 Spec-Bench questions
# (2 per category), 128 new tokens, greedy, 2 threads, one run per question, methods interleaved per question.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=${R:-runs/round19}
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 \
  --method medusa=$H/medusa --method medusa-new=$R/medusa/head \
  --method medusa-koala=$H/medusa-koala --method medusa-koala-new=$R/medusa-koala/head \
  --method eagle=$H/eagle \
  --out docs/results/round19/bench
