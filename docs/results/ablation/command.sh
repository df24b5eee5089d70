#!/usr/bin/env bash
# The KOALA ablation (issue 9): training, the table, then the speed of the seed-0 grid's heads in one koala bench
# run (each head alone in bf16 with exact attention: no prompt lookup, no gate; the drafting plan, or none, chosen
# by measured cost; speedups vs the vanilla of each dtype).
#   KINDS="eagle medusa" VARIANTS=0 STEPS=200 bash docs/results/ablation/command.sh   # round 14
set -e
cd "$(dirname "$0")/../../.."
export KINDS=${KINDS:-eagle}
source scripts/setup.sh
# the caches (round 14: 3.3 and 15.6 minutes, bf16, 2 threads): the held-out Spec-Bench answers, and the first 2,200
# distilled ShareGPT first turns (0.85M tokens, more than the 200-step budget reads)
[ -f runs/cache/specbench/manifest.json ] || .venv/bin/koala cache --data data/smollm2-135m/specbench-answers.jsonl.gz \
  --out runs/cache/specbench --max-length 1400 --dtype bfloat16
[ -f runs/cache/sharegpt/manifest.json ] || .venv/bin/koala cache --data data/smollm2-135m/sharegpt-first-turns.jsonl.gz \
  --out runs/cache/sharegpt --max-length 1400 --max-sequences 2200 --dtype bfloat16
bash scripts/ablation.sh   # resumable; runs/ablation/<cell>-s<seed>/ (head/, manifest.json, metrics.jsonl)
m=()
for kind in $KINDS; do
  for cell in k1 k1-adv k2 k2-adv k3 k3-adv; do
    run="runs/ablation/$kind-$cell-s0"
    [ -f "$run/manifest.json" ] && m+=(--method "$kind-$cell-s0=$run/head:lookup=0,gate=off,dtype=bf16")
  done
done
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category "${PER_CATEGORY:-1}" \
  --max-new-tokens 128 --threads 2 "${m[@]}" --out docs/results/ablation/bench
.venv/bin/python scripts/ablation_table.py runs/ablation --bench docs/results/ablation/bench/results.json \
  > docs/results/ablation/table.md
