#!/usr/bin/env bash
# Round 10 heads: each shipped EAGLE head goes on (--init) over the 2,080 ShareGPT later-turn answers it has never
# seen (runs/cache/sharegpt-later: 1.05M tokens, built by `koala cache` from data/smollm2-135m/
# sharegpt-later-turns.jsonl.gz), one pass with a fresh cosine schedule, held-out acc@k on the Spec-Bench answers.
# fp32 on this AVX2-only CPU (bf16 autocast has no native bf16 arithmetic here). Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
common=(--lr 5e-4 --data runs/cache/sharegpt-later --eval-data runs/cache/specbench --unroll 1 --eval-sequences 96
        --draft-vocab 8192 --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 100 --adv-start 100
        --adv-warmup 100 --device cpu --resume)
mkdir -p runs/reference/round4a
.venv/bin/koala train --head eagle --layers 1 --init heads/smollm2-135m/eagle --max-steps 400 \
  --out runs/reference/round4a/eagle "${common[@]}"
.venv/bin/koala train --head eagle --layers 2 --adversarial --init heads/smollm2-135m/eagle-koala --max-steps 400 \
  --out runs/reference/round4a/eagle-koala "${common[@]}"
