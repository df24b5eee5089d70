"""Foundation benchmark: is our decode loop as fast as transformers' own greedy generate?

Times, on the same Spec-Bench first turns (chat template, greedy): our vanilla loop, HF `generate`, HF prompt
lookup decoding, and our pld drafter. Methods are interleaved per prompt (order rotated) after a warm-up, each
prompt is timed --runs times (median kept), and outputs are checked token-for-token against HF generate.

    .venv/bin/python scripts/bench_decode.py --prompts 6 --max-new-tokens 128
    .venv/bin/python scripts/bench_decode.py --profile vanilla   # cProfile of our loop, top functions
    .venv/bin/python scripts/bench_decode.py --physics            # T(n) per dtype and each head's draft cost

--physics prints the cost of one target forward verifying n new tokens over a 128-token cache (or each of
--contexts; fastest of --runs rounds, sizes interleaved), in fp32 and bf16, and for each head the time its drafter
spends per step (propose + observe) next to the verify cost of the tree it proposes: a step gains tau tokens for
T_verify(n) + T_draft, plain decoding one token for T(1).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import torch

from koala.acceptance import Sampling
from koala.bench import MethodSpec, build_runner, load_questions
from koala.decode import Stats, stream_tokens
from koala.drafters.factory import drafter_for_head
from koala.drafters.plan import measure_latency
from koala.heads.checkpoint import read_config
from koala.kinds import kind
from koala.target import load_target

TREE_SIZES = (1, 3, 7, 15, 31, 63)  # tree tokens; with the pending token, 2..64 new tokens per forward
HEADS = ("medusa", "medusa-koala", "eagle", "eagle-koala")

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


def draft_cost(target, head_dir: str, prompts: list[list[int]], max_new: int, **options) -> dict:
    """Seconds per step the drafter spends (propose + observe), mean tree size, tau, over greedy generations, for
    the head with drafter_for_head's `options` (none: the plan koala chooses on this machine)."""
    drafter = drafter_for_head(head_dir, target, gate=False, **options)
    spent = [0.0]

    def timed(method):
        def run(*a):
            t0 = time.perf_counter()
            try:
                return method(*a)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    drafter.propose, drafter.observe = timed(drafter.propose), timed(drafter.observe)
    stats = [Stats() for _ in prompts]
    for ids, st in zip(prompts, stats):
        for _ in stream_tokens(target, ids, drafter, Sampling(), max_new, st):
            pass
    steps = sum(st.target_forwards for st in stats)
    return {"plan": str(drafter.plan), "draft_ms": 1000 * spent[0] / steps,
            "nodes": sum(st.drafted_tokens for st in stats) / steps, "tau": sum(st.new_tokens for st in stats) / steps}


def physics(args) -> None:
    rows = {}
    for dtype in ("float32", "bfloat16"):
        target = load_target(args.target, args.device, dtype)
        for context in args.contexts:  # key n: n tree tokens + 1 pending
            rows[dtype, context] = measure_latency(target, TREE_SIZES, args.runs, context).seconds
    sizes = (0, *TREE_SIZES)
    print(f"T(n): one target forward with n new tokens over a cache of `context` tokens, ms (fastest of "
          f"{args.runs}), torch threads {torch.get_num_threads()}\n")
    print("| dtype | context \\ n | " + " | ".join(str(n + 1) for n in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for (dtype, context), lat in rows.items():
        print(f"| {dtype} | {context} | " + " | ".join(f"{1000 * lat[n]:.0f}" for n in sizes) + " |")
    target = load_target(args.target, args.device, "float32")
    prompts = [target.encode(p) for _, p in pick_prompts(args.questions, args.prompts)]
    lat = rows["float32", args.contexts[0]]
    print(f"\nDraft cost per step, fp32, {len(prompts)} prompts x {args.max_new_tokens} tokens, greedy, no gate\n")
    print("| head | plan | tree nodes/step | draft ms/step | T_verify(nodes) ms | T(1) ms | tau | "
          "model speedup tau*T(1)/(T_verify+T_draft) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fixed in [(h, f) for h in args.heads for f in (True, False)]:
        head_dir = name if Path(name).is_dir() else f"heads/smollm2-135m/{name}"
        options = {}
        if fixed:  # the kind's own tree shape at its full default depth, only the size chosen
            cfg = read_config(head_dir)[0]
            defaults = kind(cfg.kind).drafter.defaults
            options = {"tree": defaults["tree"], "depth": defaults.get("depth") or cfg.num_heads}
        c = draft_cost(target, head_dir, prompts, args.max_new_tokens, **options)
        hi = min((s for s in sizes if s >= c["nodes"]), default=sizes[-1])
        lo = max(s for s in sizes if s <= min(c["nodes"], hi))
        share = (c["nodes"] - lo) / (hi - lo) if hi > lo else 0.0
        verify = 1000 * (lat[lo] + share * (lat[hi] - lat[lo]))  # interpolated between the measured sizes
        speed = c["tau"] * 1000 * lat[0] / (verify + c["draft_ms"])
        print(f"| {name} | {c['plan']} | {c['nodes']:.1f} | {c['draft_ms']:.1f} | {verify:.0f} | "
              f"{1000 * lat[0]:.0f} | {c['tau']:.2f} | {speed:.2f}x |")


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
    ap.add_argument("--physics", action="store_true", help="T(n) per dtype and each head's draft cost instead")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[128],
                    help="--physics: cached tokens the timed forwards attend to, comma-separated (default 128)")
    ap.add_argument("--heads", nargs="+", default=list(HEADS),
                    help="--physics: shipped head names or head directories to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.physics:
        physics(args)
        return

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
