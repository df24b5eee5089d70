#!/usr/bin/env bash
# Round 19 (AVX2 EPYC, 2 cores): the shipped eagle3 K=1 head (1.83M tokens: the first 4,000 ShareGPT first-turn
# answers) continued on the 1,419 answers it never saw (answers 8,800-10,218, the aux-layer cache that
# train-medusa.sh builds), lr 5e-4 with 20 warm-up steps, cosine planned from throughput inside ${MINUTES:-35}
# minutes, unroll 2 as before, fp32. Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
nice .venv/bin/koala train --head eagle3 --layers 1 --init heads/smollm2-135m/eagle3 --lr 5e-4 \
  --data runs/cache/sharegpt-new --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192 \
  --warmup 20 --batch-size 8 --max-seq-len 512 --unroll 2 --eval-every 100 --max-steps 100000 \
  --max-minutes "${MINUTES:-35}" --dtype float32 --out runs/round19/eagle3 --resume
