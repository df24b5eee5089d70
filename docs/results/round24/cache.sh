#!/usr/bin/env bash
# Round 24, on a new host (AMD EPYC Zen 4: AVX-512 with bf16 dot products, no AMX) where runs/ started empty. The
# two caches the eagle3 continuations need, in bf16 (prefill 620 tok/s against fp32's 269 here, 4x512 tokens):
# the held-out Spec-Bench answers (as in docs/results/ablation/command.sh, with the eagle3 aux layers), and the
# first 2,000 of the distilled ShareGPT first-turn answers 4,000-8,799 (no eagle3 head has seen them; ~0.78M
# tokens). Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
source docs/results/round22/sharegpt-mid.sh  # sets $subset
[ -f runs/cache/specbench/manifest.json ] || nice .venv/bin/koala cache \
  --data data/smollm2-135m/specbench-answers.jsonl.gz --out runs/cache/specbench --max-length 1400 --dtype bfloat16 \
  --aux-layers 2,15,27
nice .venv/bin/koala cache --data $subset --out runs/cache/sharegpt-mid2k --max-length 1400 --max-sequences 2000 \
  --dtype bfloat16 --aux-layers 2,15,27
