"""Log the gated drafter's per-step decisions on chosen Spec-Bench questions (first turns, bf16, 2 threads):
for each, vanilla and the gated head alternate 3 times; prints wall seconds, forwards, and every timed step as
D<gained>:<ms> (drafted) or p1:<ms> (plain).

    .venv/bin/python docs/results/round22/gate_log.py heads/smollm2-135m/eagle-koala 161,162,242
"""
import sys
import time

import torch

from koala.acceptance import Sampling
from koala.bench import load_questions
from koala.decode import stream_tokens, Stats
from koala.drafters import Drafter
from koala.drafters.factory import drafter_for_head
from koala.drafters.gate import GatedDrafter
from koala.target import load_target

torch.set_num_threads(2)
target = load_target(dtype="bfloat16")
qs, _ = load_questions("../shared/data/spec_bench/question.jsonl", 2)
want = [int(x) for x in sys.argv[2].split(",")]
head = sys.argv[1]
gate = drafter_for_head(head, target)
print("plan", gate.plan, flush=True)
log = []
rec = GatedDrafter._record


def logged(self, now):
    if self.started is not None and self.steps > 1 and self.gained:
        log.append(("D" if self.drafting else "p") + f"{self.gained}:{(now - self.started) * 1e3:.0f}")
    rec(self, now)


GatedDrafter._record = logged


def run(d, ids):
    st, t = Stats(), time.perf_counter()
    n = sum(len(x) for x in stream_tokens(target, ids, d, Sampling(), 128, st))
    return n, time.perf_counter() - t, st.target_forwards


for q in qs:
    if q["question_id"] not in want:
        continue
    ids = target.encode([{"role": "user", "content": q["turns"][0]}])
    run(Drafter(), ids)
    for r in range(3):
        n, tv, fv = run(Drafter(), ids)
        log.clear()
        n2, tg, fg = run(gate, ids)
        print(q["question_id"], f"prompt {len(ids)} new {n} vanilla {tv:.2f}s/{fv} gate {tg:.2f}s/{fg} "
              f"x{tv / tg:.2f}", flush=True)
        print("   ", " ".join(log), flush=True)
