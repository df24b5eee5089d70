#!/usr/bin/env bash
# Round 8 recheck of the category that read lowest (summarization: 0.86-0.96x of bf16 vanilla in the single-run
# table): its 2 questions again, 3 timed runs per question and method (median), same settings otherwise.
set -e
cd "$(dirname "$0")/../../.."
questions=$(mktemp --suffix=.jsonl)
.venv/bin/python -c "
import json, sys
rows = [l for l in open('../shared/data/spec_bench/question.jsonl') if json.loads(l)['category'] == 'summarization']
sys.stdout.write(''.join(rows[:2]))" > "$questions"
.venv/bin/koala bench --questions "$questions" --max-new-tokens 128 --threads 2 --dtype float32 --runs 3 \
  --method pld-bf16=pld:dtype=bf16 --method medusa-koala-bf16=heads/smollm2-135m/medusa-koala:dtype=bf16 \
  --method eagle-bf16=heads/smollm2-135m/eagle:dtype=bf16 \
  --method eagle-koala-bf16=heads/smollm2-135m/eagle-koala:dtype=bf16 \
  --out docs/results/round8-summarization
