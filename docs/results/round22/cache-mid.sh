#!/usr/bin/env bash
# Round 22, for the next trainings: the 4,800 distilled ShareGPT first-turn answers 4,000-8,799
# (data/smollm2-135m/sharegpt-first-turns.jsonl.gz) that no eagle3 head has seen (they trained on answers 0-3,999,
# 8,800-10,218 and the later turns), cached like the others: fp32 target, aux layers 2/15/27, up to 1,400 tokens.
# ~1.9M tokens, ~1.5 h at ~330 tok/s on the AVX2 EPYC. Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
source docs/results/round22/sharegpt-mid.sh  # sets $subset
nice .venv/bin/koala cache --data $subset --out runs/cache/sharegpt-mid --max-length 1400 --dtype float32 \
  --aux-layers 2,15,27
