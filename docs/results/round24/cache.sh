#!/usr/bin/env bash
# Round 24, on a new host (AMD EPYC Zen 4: AVX-512 with bf16 dot products, no AMX) where runs/ started empty. The
# two caches the eagle3 K=2 catch-up needs, in bf16 (prefill 620 tok/s against fp32's 269 here, 4x512 tokens):
# the held-out Spec-Bench answers (as in docs/results/ablation/command.sh, with the eagle3 aux layers), and the
# first 2,000 of the distilled ShareGPT first-turn answers 4,000-8,799 (no eagle3 head has seen them; ~0.78M
# tokens). Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
subset=runs/sharegpt-mid.jsonl.gz
[ -f $subset ] || .venv/bin/python - "$subset" <<'PY'
import gzip, itertools, sys
with gzip.open("data/smollm2-135m/sharegpt-first-turns.jsonl.gz", "rt") as f, gzip.open(sys.argv[1] + ".tmp", "wt") as out:
    out.writelines(itertools.islice(f, 4000, 8800))
PY
[ -f $subset ] || mv $subset.tmp $subset
[ -f runs/cache/specbench/manifest.json ] || nice .venv/bin/koala cache \
  --data data/smollm2-135m/specbench-answers.jsonl.gz --out runs/cache/specbench --max-length 1400 --dtype bfloat16 \
  --aux-layers 2,15,27
nice .venv/bin/koala cache --data $subset --out runs/cache/sharegpt-mid2k --max-length 1400 --max-sequences 2000 \
  --dtype bfloat16 --aux-layers 2,15,27
