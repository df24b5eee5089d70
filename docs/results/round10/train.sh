#!/usr/bin/env bash
# Round 10: two warm restarts of the shipped EAGLE K=1 head over the 2,080 ShareGPT later-turn answers it had never
# seen (runs/cache/sharegpt-later: 1.05M tokens, `koala cache --aux-layers auto --max-length 1400 --dtype bfloat16`
# over data/smollm2-135m/sharegpt-later-turns.jsonl.gz), one pass with a fresh cosine schedule, held-out acc@k on
# the Spec-Bench answers (runs/cache/specbench), fp32 on the AVX2-only host. Results in docs/training.md ("Where the
# heads' acceptance stands"); neither head beat the shipped one, so neither was shipped. Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
common=(--head eagle --layers 1 --init heads/smollm2-135m/eagle --lr 5e-4 --data runs/cache/sharegpt-later
        --eval-data runs/cache/specbench --unroll 1 --eval-sequences 96 --draft-vocab 8192 --max-steps 400
        --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 100 --device cpu --resume)
mkdir -p runs/reference/round4a
.venv/bin/koala train "${common[@]}" --out runs/reference/round4a/eagle
.venv/bin/koala train "${common[@]}" --ce-weight 1.0 --out runs/reference/round4a/eagle-ce1
