#!/usr/bin/env bash
# Round 26 (Zen 4 host): a decode step's layers in one C call (koala.fused_body). Nothing else running.
# 1. scripts/bench_codes.py --switch KOALA_FUSED_BODY: the fused stack against the same target running its layers
#    one by one, side by side (13 Spec-Bench questions, one per category; vanilla, EAGLE, eagle3; outputs checked
#    identical) -> fused.txt.
# 2. `koala bench` as in rounds 24-25 (26 questions, 2 per category, 128 tokens, greedy, bf16, 2 threads, two timed
#    runs per question, median kept) with HF generate (transformers' loop and layer forwards on koala's kernels),
#    prompt lookup and every shipped head -> bench/.
# 3. The same after the Q4 codes were grouped four steps to a load (and the draft LM head put on Q8_0 codes, one
#    mask call dropped): SKIP_AB=1 OUT=docs/results/round26/bench-final bash docs/results/round26/bench.sh
# 4. Plain transformers (hf-stock: its own layer forwards and SDPA, none of koala's kernels) beside vanilla, one
#    timed run per question: STOCK=1 bash docs/results/round26/bench.sh -> bench-stock/.
# 5. After the non-temporal prefetch (the round's last kernel): SKIP_AB=1 OUT=docs/results/round26/bench-nta bash
#    docs/results/round26/bench.sh
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
if [ -n "$STOCK" ]; then
  exec .venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
    --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 1 --method hf-stock --out docs/results/round26/bench-stock
fi
[ -n "$SKIP_AB" ] || .venv/bin/python scripts/bench_codes.py --switch KOALA_FUSED_BODY --prompts 13 \
  --heads $H/eagle $H/eagle3 --runs 2 | tee docs/results/round26/fused.txt
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 2 \
  --method hf-generate --method pld --method eagle=$H/eagle --method eagle-koala=$H/eagle-koala \
  --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala --method medusa=$H/medusa \
  --method medusa-koala=$H/medusa-koala --out "${OUT:-docs/results/round26/bench}"
