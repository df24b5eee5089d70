#!/usr/bin/env bash
# Round 18 on an AVX2-only AMD EPYC (Zen 3; no AVX-512, no AMX): every shipped head calibrated in the decode loop
# (`koala calibrate`, extra.rank_acceptance) against the same head planned from its training rates (a copy of the
# head without the table, runs/uncalibrated/), fp32 and bf16 side by side, each against vanilla and HF generate of
# its dtype; koala's defaults otherwise (plan by measured cost, prompt lookup first, gated). 26 Spec-Bench questions
# (2 per category; calibration used questions 3-4 of each category), 128 new tokens, greedy, 2 threads, one run per
# question, methods interleaved per question.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
for h in eagle medusa; do
  mkdir -p runs/uncalibrated/$h
  cp $H/$h/model.safetensors $H/$h/manifest.json runs/uncalibrated/$h/
  .venv/bin/python - "$H/$h/config.json" "runs/uncalibrated/$h/config.json" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
for key in ("rank_acceptance", "calibration"):
    meta["extra"].pop(key, None)
json.dump(meta, open(sys.argv[2], "w"), indent=1)
PY
done
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype float32 \
  --method hf-generate --method pld \
  --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala \
  --method medusa=$H/medusa --method medusa-koala=$H/medusa-koala \
  --method eagle-train=runs/uncalibrated/eagle --method medusa-train=runs/uncalibrated/medusa \
  --method vanilla-bf16=vanilla:dtype=bf16 --method hf-generate-bf16=hf-generate:dtype=bf16 \
  --method eagle-bf16=$H/eagle:dtype=bf16 --method eagle-koala-bf16=$H/eagle-koala:dtype=bf16 \
  --method medusa-bf16=$H/medusa:dtype=bf16 --method medusa-koala-bf16=$H/medusa-koala:dtype=bf16 \
  --method eagle-train-bf16=runs/uncalibrated/eagle:dtype=bf16 \
  --method medusa-train-bf16=runs/uncalibrated/medusa:dtype=bf16 \
  --out docs/results/round18/bench
