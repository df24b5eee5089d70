#!/usr/bin/env bash
# Round 11: warm restarts of the shipped EAGLE-3 heads (K=1, and K=2 + adversarial) over the 2,080 ShareGPT
# later-turn answers they had never seen (runs/cache/sharegpt-later: 1.05M tokens with aux layers 2/15/27, built by
# `koala cache --aux-layers auto --max-length 1400 --dtype bfloat16` over data/smollm2-135m/sharegpt-later-turns.jsonl.gz),
# one pass with a fresh cosine schedule, fp32 on the AVX2-only host, held-out acc@k on the Spec-Bench answers
# (runs/cache/specbench). Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
common=(--head eagle3 --lr 5e-4 --data runs/cache/sharegpt-later --eval-data runs/cache/specbench --unroll 2
        --eval-sequences 96 --draft-vocab 8192 --max-steps 400 --warmup 20 --batch-size 8 --max-seq-len 512
        --eval-every 100 --device cpu --resume)
mkdir -p runs/reference/round11
.venv/bin/koala train "${common[@]}" --layers 1 --init heads/smollm2-135m/eagle3 --out runs/reference/round11/eagle3
.venv/bin/koala train "${common[@]}" --layers 2 --init heads/smollm2-135m/eagle3-koala --adversarial --adv-start 100 \
  --adv-warmup 100 --out runs/reference/round11/eagle3-koala
