#!/usr/bin/env bash
# Round 13: the round-12 and round-13 gate rules replayed over the same per-step traces (output: gate_replay.txt).
# traces/eagle-bf16.json and eagle-fp32.json were recorded with `gate_replay.py trace traces/eagle-DTYPE.json DTYPE
# heads/smollm2-135m/eagle`;
# the other two with the same code before it moved into gate_replay.py (medusa-bf16: heads/smollm2-135m/medusa;
# eagle-fp32-24nodes: float32, '{"tree": "dynamic", "depth": 4, "total_tokens": 24, "lookup": 0}').
set -e
cd "$(dirname "$0")/../../.."
git show db15d57:src/koala/drafters/gate.py > /tmp/gate_round12.py
for f in docs/results/round13/traces/*.json; do
  .venv/bin/python docs/results/round13/gate_replay.py replay "$f" /tmp/gate_round12.py src/koala/drafters/gate.py
done
