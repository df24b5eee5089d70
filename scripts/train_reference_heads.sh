#!/usr/bin/env bash
# Re-train the reference heads shipped in heads/smollm2-135m/ with one recipe, plus the Medusa K x adversarial
# ablation. Every step is resumable: re-running the script continues where it stopped.
#
#   bash scripts/train_reference_heads.sh            # everything (hours on 2 CPU cores; minutes on a GPU)
#   STEPS=150 DISTILL_CONVERSATIONS=700 bash scripts/train_reference_heads.sh
#
# Stages: (1) self-distil ShareGPT first turns with the target, (2) cache the target's hidden states for the
# distilled conversations, then append original ShareGPT conversations (soft targets still come from the target),
# (3) train the four heads and the ablation with the same data and steps, (4) copy the heads into heads/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

SHAREGPT=${SHAREGPT:-../shared/data/sharegpt/sharegpt_v3_prefix_conversations.jsonl.gz}
RUNS=${RUNS:-runs/reference}
STEPS=${STEPS:-150}
DISTILL_CONVERSATIONS=${DISTILL_CONVERSATIONS:-700}
ORIGINAL_CONVERSATIONS=${ORIGINAL_CONVERSATIONS:-600}
PARALLEL=${PARALLEL:-2}  # training runs at once (one thread each on CPU)
DEVICE=${DEVICE:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
koala=.venv/bin/koala
mkdir -p "$RUNS"

$koala distill --data "$SHAREGPT" --out "$RUNS/distilled.jsonl" --max-conversations "$DISTILL_CONVERSATIONS" \
  --max-turns 1 --max-new-tokens 192 --max-prompt-tokens 512 --batch-size 64 --pool-factor 1 \
  --dtype bfloat16 --device "$DEVICE"
$koala cache --data "$RUNS/distilled.jsonl" --out "$RUNS/cache" --max-length 768 --dtype bfloat16 \
  --device "$DEVICE" --append
$koala cache --data "$SHAREGPT" --out "$RUNS/cache" --max-length 768 --dtype bfloat16 --device "$DEVICE" \
  --append --max-sequences "$ORIGINAL_CONVERSATIONS"

common=(--data "$RUNS/cache" --draft-vocab 8192 --max-steps "$STEPS" --warmup 10 --batch-size 8
        --eval-sequences 24 --eval-every 50 --adv-start 40 --adv-warmup 40 --device "$DEVICE")
[ "$DEVICE" = cpu ] && common+=(--bf16)

train() {  # NAME HEAD K [--adversarial]
  local name=$1 head=$2 k=$3; shift 3
  local out="$RUNS/$name"
  [ -f "$out/manifest.json" ] && { echo "$name: done"; return; }
  $koala train --head "$head" --layers "$k" "$@" --out "$out" "${common[@]}" --resume > "$out.log" 2>&1 \
    && echo "$name: trained" || { echo "$name: FAILED (see $out.log)"; return 1; }
}

jobs_list=(
  "eagle-koala eagle 2 --adversarial"
  "medusa medusa 1"
  "medusa-koala medusa 2 --adversarial"
  "eagle eagle 1"
  "ablation/medusa-k1-adv medusa 1 --adversarial"
  "ablation/medusa-k2 medusa 2"
  "ablation/medusa-k3 medusa 3"
  "ablation/medusa-k3-adv medusa 3 --adversarial"
  "ablation/medusa-k4 medusa 4"
  "ablation/medusa-k4-adv medusa 4 --adversarial"
)
mkdir -p "$RUNS/ablation"
for job in "${jobs_list[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 5; done
  # shellcheck disable=SC2086
  train $job &
done
wait

for name in medusa medusa-koala eagle eagle-koala; do
  dest="heads/smollm2-135m/$name"
  rm -rf "$dest" && mkdir -p "$dest"
  cp "$RUNS/$name/head/config.json" "$RUNS/$name/head/model.safetensors" "$dest/"
  cp "$RUNS/$name/manifest.json" "$dest/manifest.json"
done
echo "heads written to heads/smollm2-135m/"
