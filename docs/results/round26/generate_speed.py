"""Vanilla and EAGLE tok/s over 13 Spec-Bench first turns (one per category, 128 tokens, greedy, bf16, 2 threads), one
process per call: round 26 ran it alternately on kernel sources differing only in the prefetch hint (T0 / NTA).

    .venv/bin/python docs/results/round26/generate_speed.py
"""
import json
import time

import torch

from koala.decode import generate
from koala.drafters.factory import drafter_for_head
from koala.target import load_target

torch.set_num_threads(2)
target = load_target(dtype="bfloat16")
seen, prompts = set(), []
for line in open("../shared/data/spec_bench/question.jsonl"):
    q = json.loads(line)
    if q["category"] not in seen:
        seen.add(q["category"])
        prompts.append(target.encode(q["turns"][0]))
out = []
for name, drafter in (("vanilla", None), ("eagle", drafter_for_head("heads/smollm2-135m/eagle", target))):
    generate(target, prompts[0], drafter, max_new_tokens=32)  # warm-up
    start, n = time.perf_counter(), 0
    for p in prompts:
        n += len(generate(target, p, drafter, max_new_tokens=128).tokens)
    out.append(f"{name} {n / (time.perf_counter() - start):.1f} tok/s")
print(" | ".join(out))
