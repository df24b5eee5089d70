"""Round 23: does a plan's timed draft cost depend on where it sits in measure_draft's round? The same four plans of
the shipped eagle3 head (bf16, 2 threads), measured five times at repeats=7, each cost as a share of the plain forward
timed beside it (mean ± sd over the five), in the default order and with the first two swapped (`--swap`).

    .venv/bin/python docs/results/round23/draft_order.py [--swap]
"""
import statistics as st
import sys

import torch

from koala.drafters import plan as P
from koala.fused_layer import use_cpu_kernels
from koala.heads.checkpoint import load_head
from koala.kinds import kind
from koala.target import load_target

torch.set_num_threads(2)
t = load_target(dtype=torch.bfloat16)
head = load_head("heads/smollm2-135m/eagle3", t)
use_cpu_kernels(head)
cls = kind(head.cfg.kind).drafter
acc = head.extra["rank_acceptance"]


def build(p: P.Plan):
    return cls(head, tree=p.tree, depth=p.depth, top_k=4, total_tokens=p.total_tokens or None, acceptance=acc)


plans = [P.Plan("chain", 1, 1), P.Plan("dynamic", 1, 2), P.Plan("dynamic", 1, 4), P.Plan("dynamic", 2, 4)]
if "--swap" in sys.argv:
    plans[:2] = plans[1::-1]
res = {p: [] for p in plans}
for _ in range(5):
    tm = P.measure_draft(t, build, plans, repeats=7)
    for p in plans:
        res[p].append(tm.seconds[p] / tm.seconds[P.REFERENCE])
print("  ".join(f"{p.key}: {st.mean(v) * 1e2:.2f}±{st.stdev(v) * 1e2:.2f}% T0" for p, v in res.items()))
