"""What one of koala's CPU switches buys, side by side in one run: by default reading a GGUF target's codes (the bf16
target with its linears on the GGUF's Q4_1 / Q8_0 codes, koala.gguf_codes, against the same bf16 target on bf16
weights: KOALA_CODES=0); with --switch KOALA_FUSED_BODY, a decode step's layers in one C call (koala.fused_body)
against the same target running its layers one by one.

Per Spec-Bench first turn (round-robin over the categories, chat template, greedy) and method (vanilla, and each
head given), the two targets run interleaved, order alternating, --runs times each (median kept). The outputs must
be identical token for token (both switches keep the bits); the script says so or fails. Prints tok/s
medians, the per-question paired ratio (switch on / off: median and quartiles), T(n) of both targets, and
plain decoder steps of both interleaved on the first prompt (what a step costs without prefill and sampling).

    .venv/bin/python scripts/bench_codes.py --prompts 26 --heads heads/smollm2-135m/eagle --runs 3
    .venv/bin/python scripts/bench_codes.py --switch KOALA_FUSED_BODY --prompts 13 --heads heads/smollm2-135m/eagle
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench_decode import pick_prompts
from koala.decode import Decoder, Request, generate
from koala.drafters.factory import drafter_for_head
from koala.drafters.plan import measure_latency
from koala.target import load_target

LABELS = {"KOALA_CODES": ("codes", "bf16 weights"), "KOALA_FUSED_BODY": ("fused stack", "layer by layer")}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else xs * 3
    return q[0], statistics.median(xs), q[-1]


def decode_steps(targets: dict, ids: list[int], rounds: int = 40, steps: int = 5) -> None:
    """Plain decoder steps of both targets, interleaved in rounds of `steps` (each its own decoder, same prompt)."""
    decoders = {}
    for name, t in targets.items():
        decoders[name] = Decoder(t)
        decoders[name].add(Request(ids, max_new_tokens=rounds * steps + 10))
        for _ in range(6):
            decoders[name].step()
    ms: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, d in decoders.items():
            start = time.perf_counter()
            for _ in range(steps):
                d.step()
            ms[name].append(1000 * (time.perf_counter() - start) / steps)
    (on, a), (off, b) = ms.items()
    q1, med, q3 = _quartiles([y / x for x, y in zip(a, b)])
    print(f"\nplain step, ms (median of {rounds} rounds of {steps}, interleaved): "
          + ", ".join(f"{name} {statistics.median(v):.2f}" for name, v in ms.items())
          + f"; {off} / {on} per round {q1:.3f} / {med:.3f} / {q3:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--prompts", type=int, default=26)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--heads", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--switch", choices=sorted(LABELS), default="KOALA_CODES", help="what to compare (see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    on_name, off_name = LABELS[args.switch]
    on = load_target(dtype="bfloat16")
    os.environ[args.switch] = "0"
    off = load_target(dtype="bfloat16")
    del os.environ[args.switch]
    targets = {on_name: on, off_name: off}
    print("T(n) ms over a 256-token cache (fastest of 5, interleaved):")
    sizes = (1, 3, 7, 15, 31)
    for name, t in targets.items():
        lat = measure_latency(t, sizes, 5, 256).seconds
        print(f"  {name:13s} " + " ".join(f"T({n + 1})={1000 * lat[n]:.1f}" for n in (0, *sizes)))
    prompts = [on.encode(p) for _, p in pick_prompts(args.questions, args.prompts)]
    decode_steps(targets, prompts[0])
    methods = ["vanilla", *args.heads]
    print(f"\n{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, {args.threads} threads, "
          f"median of {args.runs} runs per prompt\n")
    print(f"| method | {on_name} tok/s | {off_name} tok/s | paired ratio (q1 / median / q3) | identical |")
    print("|---|---|---|---|---|")
    for method in methods:
        drafters = {name: None if method == "vanilla" else drafter_for_head(method, t) for name, t in targets.items()}
        speed: dict[str, list[float]] = {name: [] for name in targets}
        for i, ids in enumerate(prompts):
            runs: dict[str, list[float]] = {name: [] for name in targets}
            tokens = {}
            for r in range(args.runs + 1):  # the first round warms up
                order = list(targets) if (i + r) % 2 == 0 else list(targets)[::-1]
                for name in order:
                    start = time.perf_counter()
                    out = generate(targets[name], ids, drafters[name], max_new_tokens=args.max_new_tokens)
                    if r:
                        runs[name].append(len(out.tokens) / (time.perf_counter() - start))
                    tokens[name] = out.tokens
            if tokens[on_name] != tokens[off_name]:
                raise SystemExit(f"{method}, prompt {i}: the two targets' outputs differ")
            for name in targets:
                speed[name].append(statistics.median(runs[name]))
        ratios = [a / b for a, b in zip(speed[on_name], speed[off_name])]
        q1, med, q3 = _quartiles(ratios)
        print(f"| {method} | {statistics.median(speed[on_name]):.1f} | {statistics.median(speed[off_name]):.1f}"
              f" | {q1:.3f} / {med:.3f} / {q3:.3f} | yes |")


if __name__ == "__main__":
    main()
