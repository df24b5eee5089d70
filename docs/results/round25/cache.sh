#!/usr/bin/env bash
# Round 25 (Zen 4 host, as round 24): the hidden-state cache of the distilled ShareGPT first-turn answers
# 6,000-8,799 (data/smollm2-135m/sharegpt-first-turns.jsonl.gz), which no eagle3 head has seen; with round 24's
# runs/cache/sharegpt-mid2k (answers 4,000-5,999) it covers all of 4,000-8,799. bf16 target, eagle3 aux layers.
# Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
subset=runs/sharegpt-6000-8799.jsonl.gz
[ -f $subset ] || { .venv/bin/python - "$subset" <<'PY'
import gzip, itertools, sys
with gzip.open("data/smollm2-135m/sharegpt-first-turns.jsonl.gz", "rt") as f, gzip.open(sys.argv[1] + ".tmp", "wt") as out:
    out.writelines(itertools.islice(f, 6000, 8800))
PY
mv $subset.tmp $subset; }
nice .venv/bin/koala cache --data $subset --out runs/cache/sharegpt-6000-8799 --max-length 1400 --dtype bfloat16 \
  --aux-layers 2,15,27
