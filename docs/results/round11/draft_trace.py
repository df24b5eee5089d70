"""Round 11: what a head's drafts do inside the real decode loop (issue 9), step by step.

    .venv/bin/python docs/results/round11/draft_trace.py calibration heads/smollm2-135m/eagle --depth 6
    .venv/bin/python docs/results/round11/draft_trace.py hybrid heads/smollm2-135m/eagle

calibration: the head drafts a chain of --depth tokens every step (no lookup, no gate); each level's top-1
probability is recorded next to how far the target accepted, giving per-depth acceptance, calibration by
probability bin, and what stopping the chain once its cumulative probability falls below a threshold would yield.
hybrid: koala's default drafting (3-gram prompt lookup first, the head's depth-1 tree of 2 nodes otherwise) without
the gate; per step, which drafter proposed, how many nodes and how many were accepted.

Spec-Bench questions (--per-category of each), 128 new tokens, greedy. Counts only: run it on a busy machine too.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from koala.bench import load_questions
from koala.decode import generate
from koala.drafters.eagle import EagleDrafter
from koala.drafters.factory import drafter_for_head
from koala.drafters.hybrid import FirstOf
from koala.target import load_target

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.01)


def record_levels(log: list[float]) -> None:
    """Make EAGLE drafters append each expanded level's top-1 probability (chains: one node per level) to `log`."""
    children = EagleDrafter._children

    def spy(self, features, k):
        tokens, logp = children(self, features, k)
        log.append(float(logp[0, 0].exp()))
        return tokens, logp
    EagleDrafter._children = spy


def record_sources(log: list[tuple[int, int]]) -> None:
    """Make FirstOf append (index of the drafter that proposed or -1, tree size) to `log` every step."""
    def propose(self, ids):
        for i, d in enumerate(self.drafters):
            tree = d.propose(ids)
            if len(tree):
                log.append((i, len(tree)))
                return tree
        log.append((-1, 0))
        return tree
    FirstOf.propose = propose


def calibration(target, questions, head: str, depth: int) -> None:
    levels: list[float] = []
    record_levels(levels)
    probs, accepted = [], []
    for q in questions:
        levels.clear()
        drafter = drafter_for_head(head, target, tree="chain", depth=depth, top_k=1, gate=False, lookup=0)
        out = generate(target, q["turns"][0], drafter, max_new_tokens=128)
        probs += [levels[i:i + depth] for i in range(0, len(levels), depth)]
        accepted += out.stats.accepted_lengths[1:]  # the first entry is the prompt's step (no draft)
    p, a = np.array(probs), np.array(accepted)
    print(f"{len(a)} drafting steps, mean accepted {a.mean():.3f} (tau {1 + a.mean():.3f})")
    for d in range(depth):
        reached = a >= d
        hit, pd = (a >= d + 1)[reached], p[reached, d]
        cells = " ".join(f"[{lo:.1f},{hi:.1f}) {hit[(pd >= lo) & (pd < hi)].mean():.2f} (n={((pd >= lo) & (pd < hi)).sum()})"
                         for lo, hi in zip(BINS, BINS[1:]) if ((pd >= lo) & (pd < hi)).any())
        print(f"depth {d + 1}: reached {reached.mean():.3f}, accepted when reached {hit.mean():.3f}, "
              f"mean top-1 prob {pd.mean():.3f} | by prob: {cells}")
    cum = np.cumprod(p, axis=1)
    for theta in (0.0, 0.1, 0.2, 0.3, 0.5):
        n = np.maximum(1, (cum >= theta).sum(1))
        print(f"stop below cumulative prob {theta:.1f}: {n.mean():.2f} levels per step, "
              f"tau {1 + np.minimum(a, n).mean():.3f}")


def hybrid(target, questions, head: str) -> None:
    sources: list[tuple[int, int]] = []
    record_sources(sources)
    steps = []
    for q in questions:
        sources.clear()
        drafter = drafter_for_head(head, target, tree="dynamic", depth=1, total_tokens=2, gate=False)
        out = generate(target, q["turns"][0], drafter, max_new_tokens=128)
        steps += [(s, n, a) for (s, n), a in zip(sources, out.stats.accepted_lengths[1:])]
    for source, name in ((0, "prompt lookup"), (1, "head"), (-1, "nothing")):
        rows = [(n, a) for s, n, a in steps if s == source]
        if rows:
            n, a = np.array(rows).T
            print(f"{name}: {len(rows) / len(steps):.3f} of {len(steps)} steps, {n.mean():.2f} nodes, "
                  f"{a.mean():.2f} accepted, none accepted {np.mean(a == 0):.2f}, "
                  f"accepted 0..8: {np.bincount(a, minlength=9)[:9].tolist()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("calibration", "hybrid"))
    p.add_argument("head")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    args = p.parse_args()
    torch.set_num_threads(2)
    target = load_target(dtype=args.dtype)
    questions, _ = load_questions(args.questions, args.per_category)
    if args.mode == "calibration":
        calibration(target, questions, args.head, args.depth)
    else:
        hybrid(target, questions, args.head)


if __name__ == "__main__":
    main()
