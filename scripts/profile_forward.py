"""Where one target forward's time goes: torch.profiler over decode steps, per dtype, top ops by self CPU time.

    .venv/bin/python scripts/profile_forward.py --threads 2 --context 256 --new-tokens 1 --steps 10

Each step runs the target on `--new-tokens` tokens over a `--context`-token KV cache (then crops the cache back),
as a plain decode step (1) or a verify step (more) does. docs/benchmark.md reads the result.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

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
        cache = DynamicCache()
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
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(f"\n{dtype}: {args.steps} steps of {n} new token(s) over {args.context} cached, {args.threads} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
