"""Where one target forward's time goes: torch.profiler over decode steps, per dtype, top ops by self CPU time.

    .venv/bin/python scripts/profile_forward.py --threads 2 --context 256 --new-tokens 1 --steps 10

Each step runs the target on `--new-tokens` tokens over a `--context`-token KV cache (then crops the cache back),
as a plain decode step (1) or a verify step (more) does, on the cache the decode loop uses (`Target.new_cache`).
koala's C kernels (linears, norms, fused layers, attention) are ctypes calls the profiler does not see as ops, so
the table lists the torch ops around them; the line above it splits a step's wall time (timed without the
profiler) into those ops' self time and the rest (the C kernels and Python). docs/benchmark.md reads the result.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from koala.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=14, help="ops to list")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes:
        target = load_target(args.target, dtype=dtype)
        cache = target.new_cache()
        vocab = target.lm_head.weight.shape[0]
        target.hidden(torch.randint(vocab, (1, args.context)), torch.arange(args.context)[None], cache)
        n = args.new_tokens

        def step() -> None:
            ids = torch.randint(vocab, (1, n))
            hidden = target.hidden(ids, torch.arange(args.context, args.context + n)[None], cache)
            target.logits(hidden)
            cache.crop(-n)

        for _ in range(5):  # warm-up
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        averages = prof.key_averages()
        ops = sum(e.self_cpu_time_total for e in averages) / 1e6 / args.steps
        print(f"\n{dtype}: {args.steps} steps of {n} new token(s) over {args.context} cached, {args.threads} threads: "
              f"{1000 * wall:.1f} ms a step unprofiled; torch ops' self time {1000 * ops:.1f} ms a step (profiled), "
              f"the rest ~{1000 * max(wall - ops, 0.0):.1f} ms is koala's C kernels and Python")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
