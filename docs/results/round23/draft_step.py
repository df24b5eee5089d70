"""Round 23: where an eagle3 draft step's time goes (bf16 head on koala's CPU kernels, 2 threads, warm caches):
observe (two committed tokens through the head over a 130-token head cache) and propose (a 2-node depth-1 tree),
timed alone (min / median of 50) and under torch.profiler (30 steps; koala's C kernels are not profiler ops, so the
table lists the torch ops around them).

    .venv/bin/python docs/results/round23/draft_step.py heads/smollm2-135m/eagle3 > docs/results/round23/draft_step.txt
"""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from koala.target import load_target
from koala.drafters import plan as P
from koala.heads.checkpoint import load_head
from koala.fused_layer import use_cpu_kernels
from koala.kinds import kind
torch.set_num_threads(2)
t = load_target(dtype=torch.bfloat16)
head = load_head(sys.argv[1], t); use_cpu_kernels(head)
print("head dtype", next(head.parameters()).dtype)
cls = kind(head.cfg.kind).drafter
d = cls(head, tree="dynamic", depth=1, top_k=4, total_tokens=2, acceptance=head.extra["rank_acceptance"])
width = 576 * max(1, len(d.feature_layers)); g = torch.Generator().manual_seed(0)
ctx = torch.randn(128, width, generator=g).to(torch.bfloat16); ids = torch.randint(49152, (128,), generator=g).tolist()
step = torch.randn(2, width, generator=g).to(torch.bfloat16)
d.reset(ids); d.observe(ctx, ids)
def run():
    d.observe(step, ids[:2]); d.propose(ids)
for _ in range(20): run()
for name, f in (("observe", lambda: d.observe(step, ids[:2])), ("propose", lambda: d.propose(ids)), ("both", run)):
    ts = []
    for _ in range(50):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    print(name, f"min {min(ts)*1e3:.2f} ms, median {sorted(ts)[25]*1e3:.2f}")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(30): run()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
