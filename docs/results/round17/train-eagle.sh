#!/usr/bin/env bash
# Round 17: the shipped EAGLE K=1 head continued on every distilled ShareGPT first turn (10,219 answers; round 3 saw
# 8,800) plus the 538 Spec-Bench-shaped task answers (summarize, rag), on the faster loss kernels: a budget of
# 50 minutes (the cosine schedule planned from measured throughput so it anneals inside it), lr 5e-4 as round 3,
# unroll 1, bf16 autocast, 2 threads. Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../../.."
koala=.venv/bin/koala
INIT=runs/eagle-round3  # the round-3 head this run started from (heads/ now holds its result), from git history
mkdir -p $INIT
for f in config.json manifest.json model.safetensors; do
  [ -f $INIT/$f ] || git show 4d8fcfd:heads/smollm2-135m/eagle/$f > $INIT/$f
done
for name in specbench-answers:specbench sharegpt-first-turns:sharegpt task-answers:tasks; do
  [ -f "runs/cache/${name#*:}/manifest.json" ] || nice $koala cache --data "data/smollm2-135m/${name%%:*}.jsonl.gz" \
    --out "runs/cache/${name#*:}" --max-length 1400 --dtype bfloat16
done
nice $koala train --head eagle --layers 1 --init $INIT --lr 5e-4 \
  --data runs/cache/sharegpt runs/cache/tasks --eval-data runs/cache/specbench --eval-sequences 96 \
  --unroll 1 --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 200 --max-steps 100000 \
  --max-minutes "${MINUTES:-50}" --bf16 --out runs/round17/eagle --resume
