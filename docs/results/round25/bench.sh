#!/usr/bin/env bash
# Round 25 (Zen 4 host): what the GGUF's codes buy, and the heads on them. Nothing else running.
# 1. scripts/bench_codes.py: the bf16 target on the GGUF's Q4_1 / Q8_0 codes against the same target on bf16
#    weights, side by side (13 Spec-Bench questions, one per category; vanilla and the shipped EAGLE head; outputs
#    checked identical), -> codes.txt.
# 2. The round-25 eagle3 continuation calibrated in the loop (bf16), then `koala bench` as in round 24 (26
#    questions, 128 tokens, greedy, bf16, 2 threads, two timed runs per question) with HF generate (on koala's
#    kernels, codes included) and plain transformers (hf-stock) as the baselines a user compares against. Run
#    before the continuation was shipped: `eagle3` was round 24's head then.
set -e  # FINAL=1: step 3 only
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=runs/round25
if [ -z "$FINAL" ]; then
.venv/bin/python scripts/bench_codes.py --prompts 13 --heads $H/eagle --runs 2 | tee docs/results/round25/codes.txt
new=()
if [ -f $R/eagle3/head/config.json ]; then
  .venv/bin/koala calibrate $R/eagle3/head --dtype bfloat16 | tail -4 > $R/calibrate-eagle3.txt
  new+=(--method "eagle3-r25=$R/eagle3/head")
fi
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 2 \
  --method hf-generate --method hf-stock --method eagle=$H/eagle --method eagle3=$H/eagle3 "${new[@]}" \
  --out docs/results/round25/bench
fi
# 3. After the final kernel change (bf16 panels kept for calls of more than 8 rows): the shipped heads again, in
#    one run with vanilla and HF generate -> bench-final/.
if [ -n "$FINAL" ]; then
  .venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
    --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 2 \
    --method hf-generate --method eagle=$H/eagle --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala \
    --out docs/results/round25/bench-final
fi
