#!/usr/bin/env bash
# The distilled ShareGPT first-turn answers 4,000-8,799 (data/smollm2-135m/sharegpt-first-turns.jsonl.gz), which
# no eagle3 head saw before round 24, as runs/sharegpt-mid.jsonl.gz; kept if it is there already. Sourced by
# cache-mid.sh here and docs/results/round24/cache.sh (run from the project root).
subset=runs/sharegpt-mid.jsonl.gz
[ -f $subset ] || .venv/bin/python - "$subset" <<'PY'
import gzip, itertools, sys
with gzip.open("data/smollm2-135m/sharegpt-first-turns.jsonl.gz", "rt") as f, gzip.open(sys.argv[1] + ".tmp", "wt") as out:
    out.writelines(itertools.islice(f, 4000, 8800))
PY
[ -f $subset ] || mv $subset.tmp $subset
