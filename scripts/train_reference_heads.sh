#!/usr/bin/env bash
# Re-train the reference heads shipped in heads/smollm2-135m/ with one recipe. Every stage is resumable:
# re-running the script continues where it stopped (distillation per shard, training per checkpoint).
#
#   bash scripts/train_reference_heads.sh                     # EAGLE and EAGLE-KOALA (the default HEADS)
#   HEADS="medusa medusa-koala" STEPS=400 bash scripts/train_reference_heads.sh
#   ABLATION=1 bash scripts/train_reference_heads.sh          # also K in {1,2,3} x adversarial, seeds 0 and 1
#   CONTINUE=1 bash scripts/train_reference_heads.sh          # round 2: continue each head (--init) on more data
#   ROUND3=1 HEADS="eagle eagle-koala medusa medusa-koala" STEPS=1000 bash scripts/train_reference_heads.sh
#                     # round 3: the answers in runs/cache (EAGLE heads: 8,800, from round 2; Medusa: all 10,219, anew)
#   HEADS="eagle3 eagle3-koala" bash scripts/train_reference_heads.sh   # EAGLE-3 heads (caches with aux layers)
#
# Stages: (1) the target answers ShareGPT first turns, keeping its hidden states as it goes (`koala distill`),
# (2) the target answers the Spec-Bench prompts: a held-out set of the answers users would ask for, used only
# for acc@k, (3) train, (4) copy the heads into heads/ (COPY=0 to skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/reference}
DISTILLED=${DISTILLED:-runs/distill}
STEPS=${STEPS:-400}
HEADS=${HEADS:-eagle eagle-koala}
DEVICE=${DEVICE:-cpu}
koala=.venv/bin/koala
mkdir -p "$RUNS" "$DISTILLED"

# bf16 generation with a preallocated KV cache; prompts over 1024 tokens are skipped (counted in the manifest).
# Round 1 of the shipped heads saw the first 3,856 ShareGPT answers (prompts <= 512 tokens); the round-2 data
# (4,560 answers, 1.13M generated tokens) is the same command run longer, stopped at a shard boundary.
if { [ -n "$(echo $HEADS | tr ' ' '\n' | grep -v '^eagle3')" ] && [ "${ROUND3:-0}" != 1 ]; } \
   || [ "${ABLATION:-0}" = 1 ]; then
  $koala distill --data "$DATA/spec_bench/question.jsonl" --out "$DISTILLED/specbench" --max-new-tokens 256 \
    --max-prompt-tokens 1024 --batch-size 64 --dtype bfloat16 --device "$DEVICE"
  $koala distill --data "$DATA/sharegpt/sharegpt_v3_prefix_conversations.jsonl.gz" --out "$DISTILLED/sharegpt" \
    --max-new-tokens 320 --max-prompt-tokens 1024 --batch-size 64 --dtype bfloat16 --device "$DEVICE" \
    ${MAX_CONVERSATIONS:+--max-conversations "$MAX_CONVERSATIONS"}
fi

# EAGLE-3 heads read the inputs to three target layers, which the distillation above did not keep: one teacher-forced
# `koala cache --aux-layers auto` pass over the distilled text shipped in data/ builds their caches (~1,300 tok/s;
# a new distillation can keep them itself with `koala distill --aux-layers auto`).
CACHES=${CACHES:-runs/cache}
if [[ " $HEADS " == *" eagle3"* ]] || [ "${ROUND3:-0}" = 1 ]; then
  for name in specbench-answers:specbench sharegpt-first-turns:sharegpt; do
    [ -f "$CACHES/${name#*:}/manifest.json" ] || $koala cache --data "data/smollm2-135m/${name%%:*}.jsonl.gz" \
      --out "$CACHES/${name#*:}" --aux-layers auto --max-length 1400 --dtype bfloat16 --device "$DEVICE" \
      ${CACHE_SEQUENCES:+--max-sequences "$CACHE_SEQUENCES"}  # the shipped eagle3 heads: CACHE_SEQUENCES=4000
  done
fi

common=(--eval-sequences 96 --draft-vocab 8192 --max-steps "$STEPS" --warmup 20 --batch-size 8 --max-seq-len 512
        --eval-every 100 --adv-start 100 --adv-warmup 100 --device "$DEVICE")
[ "$DEVICE" = cpu ] && common+=(--bf16)

train() {  # NAME HEAD K [flags...]
  local name=$1 head=$2 k=$3; shift 3
  local out="$RUNS/$name" data=(--data "$DISTILLED/sharegpt" --eval-data "$DISTILLED/specbench" --unroll 1)
  [ "${ROUND3:-0}" = 1 ] && data=(--data "$CACHES/sharegpt" --eval-data "$CACHES/specbench" --unroll 1)
  [ "$head" = eagle3 ] && data=(--data "$CACHES/sharegpt" --eval-data "$CACHES/specbench" --unroll 2)
  [ -f "$out/manifest.json" ] && { echo "$name: done"; return; }
  mkdir -p "$(dirname "$out")"
  $koala train --head "$head" --layers "$k" "${data[@]}" "$@" --out "$out" "${common[@]}" --resume > "$out.log" 2>&1 \
    && echo "$name: trained" || { echo "$name: FAILED (see $out.log)"; return 1; }
}

declare -A RECIPE=([medusa]="medusa 1" [medusa-koala]="medusa 2 --adversarial"
                   [eagle]="eagle 1" [eagle-koala]="eagle 2 --adversarial"
                   [eagle3]="eagle3 1" [eagle3-koala]="eagle3 2 --adversarial")
if [ "${ROUND3:-0}" = 1 ]; then  # round 3: every answer in the cache; EAGLE heads go on from round 2, Medusa starts anew
  for name in $HEADS; do
    init=(); [[ $name == eagle* ]] && init=(--init "heads/smollm2-135m/$name" --lr 5e-4)
    # shellcheck disable=SC2086
    train "round3/$name" ${RECIPE[$name]} "${init[@]}"
  done
else
  for name in $HEADS; do
    # shellcheck disable=SC2086
    train "$name" ${RECIPE[$name]}
  done
fi

if [ "${CONTINUE:-0}" = 1 ]; then  # round 2: a warm restart from round 1's heads at half the peak lr, timed
  declare -A MINUTES=([medusa]=15 [medusa-koala]=25 [eagle]=25 [eagle-koala]=35)
  for name in $HEADS; do
    # shellcheck disable=SC2086
    train "round2/$name" ${RECIPE[$name]} --init "$RUNS/$name/head" --lr 5e-4 --max-steps 5000 \
      --max-minutes "${MINUTES[$name]}" --adv-start 0
  done
fi

if [ "${ABLATION:-0}" = 1 ]; then
  for kind in medusa eagle; do
    for k in 1 2 3; do
      seeds="0"; [ "$k" -le 2 ] && seeds="0 1"
      for seed in $seeds; do
        train "ablation/$kind-k$k-s$seed" "$kind" "$k" --seed "$seed"
        train "ablation/$kind-k$k-adv-s$seed" "$kind" "$k" --adversarial --seed "$seed"
      done
    done
  done
fi

if [ "${COPY:-1}" = 1 ]; then
  for name in $HEADS; do
    dest="heads/smollm2-135m/$name" run="$RUNS/$name"
    [ "${CONTINUE:-0}" = 1 ] && run="$RUNS/round2/$name"
    [ "${ROUND3:-0}" = 1 ] && run="$RUNS/round3/$name"
    rm -rf "$dest" && mkdir -p "$dest"
    cp "$run/head/config.json" "$run/head/model.safetensors" "$run/manifest.json" "$dest/"
  done
  echo "heads written to heads/smollm2-135m/"
fi
