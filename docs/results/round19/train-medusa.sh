#!/usr/bin/env bash
# Round 19 (AVX2 EPYC, 2 cores): both shipped Medusa heads (round 3: 2.62M tokens from scratch) continued on the same
# data with the same steps: the 1,419 distilled ShareGPT first-turn answers they never saw (answers 8,800-10,218 of
# data/smollm2-135m/sharegpt-first-turns.jsonl.gz, 545K tokens), 400 steps of batch 8 x 512 (~1.2M tokens, ~2.2
# epochs), lr 5e-4 with 20 warm-up steps then cosine, fp32 (this CPU has no bf16 units). Held out: the 96-window
# split of the Spec-Bench answer cache (the init head is scored at step 0 on it). Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
koala=.venv/bin/koala
python3 - <<'PY'
import gzip, pathlib
out = pathlib.Path("runs/sharegpt-new.jsonl.gz")
if not out.exists():
    lines = gzip.open("data/smollm2-135m/sharegpt-first-turns.jsonl.gz", "rt").read().splitlines()
    out.parent.mkdir(exist_ok=True)
    with gzip.open(out, "wt") as f:
        f.write("\n".join(lines[8800:]) + "\n")
PY
cache() { [ -f "runs/cache/$2/manifest.json" ] || nice $koala cache --data "$1" --out "runs/cache/$2" --max-length 1400 \
  --dtype float32 --aux-layers 2,15,27; }
cache data/smollm2-135m/specbench-answers.jsonl.gz specbench
cache runs/sharegpt-new.jsonl.gz sharegpt-new
for spec in medusa:1: medusa-koala:2:--adversarial; do
  IFS=: read -r name k adv <<< "$spec"
  nice $koala train --head medusa --layers "$k" $adv --init "heads/smollm2-135m/$name" --lr 5e-4 \
    --data runs/cache/sharegpt-new --eval-data runs/cache/specbench --eval-sequences 96 --draft-vocab 8192 \
    --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 100 --adv-start 100 --adv-warmup 100 \
    --max-steps 400 --dtype float32 --out "runs/round19/$name" --resume
done
