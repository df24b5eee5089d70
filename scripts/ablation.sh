#!/usr/bin/env bash
# The KOALA ablation: K in {1,2,3} x adversarial {off,on} on one cache, one recipe and one step budget, two
# seeds for the K=1 and K=2 cells, then (unless VARIANTS=0) adversarial variants and target-initialised
# layers at K=2. Every run
# resumes where it stopped (re-run the script); finished runs are skipped. Then a table of held-out acc@k,
# tokens and steps per cell:
#
#   bash scripts/ablation.sh                         # EAGLE cells on runs/cache/{sharegpt,specbench}
#   KINDS="eagle medusa" STEPS=200 bash scripts/ablation.sh
#   .venv/bin/python scripts/ablation_table.py runs/ablation     # the table again (markdown)
#
# Speed of the resulting heads: `koala bench` with one --method per head (docs/results/ablation/command.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

CACHES=${CACHES:-runs/cache}
RUNS=${RUNS:-runs/ablation}
STEPS=${STEPS:-200}
KINDS=${KINDS:-eagle}
DEVICE=${DEVICE:-cpu}
mkdir -p "$RUNS"

common=(--data "$CACHES/sharegpt" --eval-data "$CACHES/specbench" --eval-sequences 96 --draft-vocab 8192
        --max-steps "$STEPS" --warmup 20 --batch-size 8 --max-seq-len 512 --eval-every 50 --unroll 1
        --adv-start 40 --adv-warmup 40 --device "$DEVICE")
[ "$DEVICE" = cpu ] && common+=(--bf16)

train() {  # NAME KIND K [flags...]
  local name=$1 kind=$2 k=$3; shift 3
  local out="$RUNS/$name"
  [ -f "$out/manifest.json" ] && { echo "$name: done"; return; }
  echo "$name: training ($(date -u +%H:%M))"
  # a cell's own flags come after the common ones, so they win (e.g. a later --adv-start)
  .venv/bin/koala train --head "$kind" --layers "$k" --out "$out" "${common[@]}" "$@" --resume > "$out.log" 2>&1 \
    || { echo "$name: FAILED (see $out.log)"; return 1; }
}

for kind in $KINDS; do  # the seed-0 grid of every kind first
  for k in 1 2 3; do
    train "$kind-k$k-s0" "$kind" "$k" --seed 0
    train "$kind-k$k-adv-s0" "$kind" "$k" --adversarial --seed 0
  done
done
for kind in $KINDS; do  # then the second seed of the K=1 and K=2 cells
  for k in 1 2; do
    train "$kind-k$k-s1" "$kind" "$k" --seed 1
    train "$kind-k$k-adv-s1" "$kind" "$k" --adversarial --seed 1
  done
done
if [ "${VARIANTS:-1}" = 1 ]; then
  for kind in $KINDS; do  # then the adversarial variants and target-initialised layers at K=2
    train "$kind-k2-advpos-s0" "$kind" 2 --adversarial --adv-level position --seed 0
    train "$kind-k2-advhinge-s0" "$kind" 2 --adversarial --adv-loss hinge --seed 0
    if [ "$kind" = eagle ]; then
      train "$kind-k2-advfeat-s0" "$kind" 2 --adversarial --adv-features --seed 0
      train "$kind-k2-tinit-s0" "$kind" 2 --init-from-target --seed 0  # layers start as the target's last two
      train "$kind-k2-advlate-s0" "$kind" 2 --adversarial --adv-start 150 --adv-warmup 20 --seed 0  # in the cosine's tail
      for seed in 0 1; do
        train "$kind-k2-advsmall-s$seed" "$kind" 2 --adversarial --adv-weight 0.02 --seed "$seed"  # lambda / 5
      done
    fi
  done
fi
.venv/bin/python scripts/ablation_table.py "$RUNS"
