"""Batched decoding throughput: vanilla vs prompt-lookup (pld) speculative decoding at several batch sizes.

The same Spec-Bench first turns (chat template, greedy) are decoded at most `size` at a time, waiting prompts
joining as others finish (--static: fixed chunks of `size` prompts, each run to its slowest row). Throughput is
the total new tokens over the total wall time; "forwards" counts batched target forwards. Each method and size is
timed --runs times (best kept) after a warm-up, and every output is checked token-for-token against the first
cell (batch-size-1 vanilla when --sizes starts at 1).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_batch.py --prompts 8 --max-new-tokens 64 --sizes 1 4 8
    ... --head heads/smollm2-135m/eagle-koala   # adds a trained Medusa/EAGLE head as a third method
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from koala.bench import load_questions
from koala.acceptance import Sampling
from koala.decode import generate_batch, stream_batch
from koala.drafters import Drafter, PromptLookupDrafter
from koala.target import load_target

def first_turns(path: str, n: int) -> list[str]:
    """First turns of n questions taken round-robin over the categories, so every task kind is represented."""
    questions, _ = load_questions(path)
    by_cat: dict[str, list[str]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    columns = list(by_cat.values())
    out = [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]
    return out[:n]


def run(target, prompts: list[list[int]], factory: Callable[[], Drafter] | None, size: int, max_new: int,
        static: bool) -> tuple[float, int, int, list]:
    """(seconds, new tokens, batched target forwards, outputs) for all prompts, at most `size` at a time;
    factory None is vanilla decoding."""
    chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)] if static else [prompts]
    outputs: list[list[int]] = []
    forwards = 0
    start = time.perf_counter()
    for chunk in chunks:
        got: list[list[int]] = [[] for _ in chunk]
        drafters = None if factory is None else [factory() for _ in chunk]
        for step in stream_batch(target, chunk, drafters, Sampling(), max_new, max_batch=size):
            forwards += 1
            for out, new in zip(got, step):
                out += new
        outputs += got
    return time.perf_counter() - start, sum(map(len, outputs)), forwards, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--runs", type=int, default=1, help="timed runs per method and size (best kept)")
    ap.add_argument("--static", action="store_true", help="fixed chunks instead of prompts joining as rows free up")
    ap.add_argument("--pld-tokens", type=int, default=8, help="longest pld draft (every row pays the batch's longest)")
    ap.add_argument("--head", default=None, help="also time this trained head directory (its default tree)")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if min(args.sizes) < 1:
        ap.error("--sizes must be positive")

    factories = {"vanilla": None, "pld": lambda: PromptLookupDrafter(num_tokens=args.pld_tokens)}
    target = load_target(args.target, args.device)
    if args.head:
        from koala.drafters.factory import drafter_for_head

        proto = drafter_for_head(args.head, target)  # loads the head and picks the tree size once
        # shallow copies share the head weights; the loop's reset() gives each its own per-sequence state
        factories["head"] = lambda: copy.copy(proto)
    prompts = [target.encode(p) for p in first_turns(args.questions, args.prompts)]
    for factory in factories.values():  # warm-up: kernels, allocator, first-call setup
        generate_batch(target, prompts[:2], factory, max_new_tokens=8)
    reference = None
    rows = []
    for size in args.sizes:
        for method, factory in factories.items():
            best = min((run(target, prompts, factory, size, args.max_new_tokens, args.static)
                        for _ in range(args.runs)),
                       key=lambda r: r[0])
            seconds, tokens, forwards, outputs = best
            reference = reference or outputs  # the first cell is batch size 1 vanilla when --sizes starts at 1
            same = sum(a == b for a, b in zip(outputs, reference))
            rows.append((size, method, tokens, forwards, seconds, tokens / seconds, same))
            print(f"batch {size:>2} {method:<8} {tokens / seconds:7.1f} tok/s", flush=True)
    base = {m: next(r[5] for r in rows if r[1] == m) for m in factories}
    print(f"\n{target.name} on {args.device} ({torch.get_num_threads()} threads), {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens, greedy, {'static' if args.static else 'continuous'} batches")
    print(f"{'batch':>5} {'method':<8} {'tokens':>6} {'forwards':>8} {'seconds':>8} {'tok/s':>7} "
          f"{'vs b=' + str(args.sizes[0]):>7} {'same as ref':>11}")
    for size, method, tokens, forwards, seconds, tps, same in rows:
        print(f"{size:>5} {method:<8} {tokens:>6} {forwards:>8} {seconds:>8.2f} {tps:>7.1f} "
              f"{tps / base[method]:>6.2f}x {same:>5}/{len(prompts)}")


if __name__ == "__main__":
    main()
