"""Foundation benchmark: is our decode loop as fast as transformers' own greedy generate?

Times, on the same Spec-Bench first turns (chat template, greedy): our vanilla loop, HF `generate`, HF prompt
lookup decoding, and our pld drafter. Methods are interleaved per prompt (order rotated) after a warm-up, each
prompt is timed --runs times (median kept), and outputs are checked token-for-token against HF generate.

    .venv/bin/python scripts/bench_decode.py --prompts 6 --max-new-tokens 128
    .venv/bin/python scripts/bench_decode.py --profile vanilla   # cProfile of our loop, top functions
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import torch

from koala.acceptance import Sampling
from koala.bench import MethodSpec, build_runner, load_questions
from koala.target import load_target

METHODS = {"hf-generate": "hf-generate", "vanilla": "vanilla", "hf-prompt-lookup": "hf-prompt-lookup", "pld": "pld"}


def pick_prompts(path: str, n: int) -> list[tuple[str, str]]:
    """First turns of n questions spread round-robin over the categories (Spec-Bench has 13)."""
    questions, _ = load_questions(path)
    by_cat: dict[str, list[str]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_cat.values()):
        out += [(c, v[i]) for c, v in by_cat.items() if i < len(v)]
        i += 1
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per prompt and method (median kept)")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--profile", choices=list(METHODS), default=None, help="cProfile one method instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = load_target(args.target, args.device)
    runners = {name: build_runner(MethodSpec(name, kind), target) for name, kind in METHODS.items()}
    prompts = [(c, target.encode(p)) for c, p in pick_prompts(args.questions, args.prompts)]
    greedy = Sampling()
    for name, run in runners.items():  # warm-up: kernels, allocator, HF's first-call setup
        run(prompts[0][1], greedy, 16, None)

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _, ids in prompts:
            runners[args.profile](ids, greedy, args.max_new_tokens, None)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return

    names = list(runners)
    rows = []
    for i, (cat, ids) in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        times: dict[str, list[float]] = {n: [] for n in names}
        outs: dict[str, object] = {}
        for _ in range(args.runs):
            for name in order:
                r = runners[name](ids, greedy, args.max_new_tokens, None)
                times[name].append(r.seconds)
                outs[name] = r
        rows.append((cat, len(ids), {n: (outs[n], statistics.median(times[n])) for n in names}))

    ref = "hf-generate"
    print(f"target {target.name} on {target.device}, torch threads {torch.get_num_threads()}, "
          f"{len(prompts)} prompts, max {args.max_new_tokens} new tokens, greedy, median of {args.runs} runs\n")
    print(f"{'prompt':<16}{'len':>5}" + "".join(f"{n:>18}" for n in names))
    for cat, n_in, res in rows:
        cells = []
        for n in names:
            run, sec = res[n]
            same = "=" if run.tokens == res[ref][0].tokens else "!"
            cells.append(f"{len(run.tokens) / sec:8.1f} t/s {len(run.tokens):>3}{same}")
        print(f"{cat[:15]:<16}{n_in:>5}" + "".join(f"{c:>18}" for c in cells))
    print("\n('=' token-identical to hf-generate, '!' differs; the number after t/s is new tokens)\n")
    print(f"{'method':<18}{'tok/s':>8}{'vs hf-generate':>16}{'tau':>7}{'identical':>11}")
    for n in names:
        tok = sum(len(res[n][0].tokens) for _, _, res in rows)
        sec = sum(res[n][1] for _, _, res in rows)
        ratio = statistics.fmean((len(res[n][0].tokens) / res[n][1]) / (len(res[ref][0].tokens) / res[ref][1])
                                 for _, _, res in rows)
        fwd = sum(res[n][0].forwards or 0 for _, _, res in rows)
        same = sum(res[n][0].tokens == res[ref][0].tokens for _, _, res in rows)
        print(f"{n:<18}{tok / sec:8.1f}{ratio:15.2f}x{tok / fwd if fwd else float('nan'):7.2f}"
              f"{same:>6}/{len(rows)}")


if __name__ == "__main__":
    main()
