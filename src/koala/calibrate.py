"""`koala calibrate`: how often a head's drafts are accepted inside the real decode loop, by depth and rank.

The drafting planner (koala.drafters.plan) predicts each plan's tokens per step from an acceptance model. The rates
a training run reports are teacher-forced top-1 agreement on held-out text, which is not what the loop sees:
prompt lookup takes the repetitive, easy tokens first, so the head drafts the harder rest; Medusa's acc@k is
unconditional, a tree needs the rate given the parent was right; and the second, third... candidates were only
guessed (a(1-a)^r). Round 17 (fp32): the planner picked a 12-node depth-2 tree for the EAGLE head that ran 1.32x
vanilla where a 4-node depth-1 tree ran 1.46x.

Here the head drafts a wide static tree on real prompts with koala's default drafting around it (prompt lookup
first, the head where lookup finds nothing; no gate) and greedy decoding, and every node whose parent was accepted
counts toward q[d][r] = P(the rank-r child at depth d+1 is accepted | its parent was). Under greedy acceptance a
node is accepted exactly when its token is the target's next token, so the counts are exact. The table goes into
the head's config.json (extra.rank_acceptance), where koala.drafters.factory prefers it to the training rates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from koala.args import add_target_args, non_negative_int, positive_int
from koala.atomic import write_json_atomic
from koala.drafters.base import Drafter
from koala.drafters.hybrid import FirstOf
from koala.tree import DraftTree

NODES = 32  # nodes of the calibration tree: every rank < top_k at depth 1, the likely deeper ones
GUESS = (0.6,)  # the acceptance that shapes the calibration tree (only its shape; the counts are measured)


@dataclass
class Counts:
    """Per depth (0-based) and rank: drafted nodes whose parent was accepted, and how many of them were."""

    reached: list[list[int]] = field(default_factory=list)
    accepted: list[list[int]] = field(default_factory=list)
    steps: int = 0  # trees the head drafted

    def add(self, depth: int, rank: int, hit: bool) -> None:
        while len(self.reached) <= depth:
            self.reached.append([])
            self.accepted.append([])
        for row in (self.reached[depth], self.accepted[depth]):
            row.extend([0] * (rank + 1 - len(row)))
        self.reached[depth][rank] += 1
        self.accepted[depth][rank] += hit

    def table(self, min_reached: int = 20) -> list[list[float]]:
        """q[d][r] = accepted / (reached + 1), a rate shrunk toward 0 where it rests on few nodes; a row ends at
        the first rank reached fewer than `min_reached` times, and the table at the first such depth."""
        out = []
        for acc, reached in zip(self.accepted, self.reached):
            row = []
            for a, n in zip(acc, reached):
                if n < min_reached:
                    break
                row.append(a / (n + 1))
            if not row:
                break
            total = sum(row)
            out.append([round(q / max(total, 1.0), 4) for q in row])
        return out


def tally(tree: DraftTree, continuation: list[int], counts: Counts) -> None:
    """Count the nodes of `tree` whose parent was accepted; `continuation` is the target's greedy tokens after the
    pending token (the accepted path and the bonus). Siblings are in rank order in koala's trees."""
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depth
    accepted = {-1}
    rank: dict[int, int] = defaultdict(int)
    for i, (token, parent, depth) in enumerate(zip(tokens, parents, depths)):
        r = rank[parent]
        rank[parent] += 1
        if parent not in accepted or depth > len(continuation):
            continue
        hit = token == continuation[depth - 1]
        counts.add(depth - 1, r, hit)
        if hit:
            accepted.add(i)
    counts.steps += 1


class Tally(Drafter):
    """Wraps a head drafter and counts how its trees fare (see `tally`)."""

    def __init__(self, inner: Drafter, counts: Counts) -> None:
        self.inner, self.counts, self.name = inner, counts, inner.name
        self.tree: DraftTree | None = None

    @property
    def feature_layers(self) -> tuple[int, ...]:  # an EAGLE-3 head must still get the layers it reads
        return self.inner.feature_layers

    def reset(self, prompt_ids: list[int]) -> None:
        self.inner.reset(prompt_ids)
        self.tree = None

    def propose(self, ids: list[int]) -> DraftTree:
        self.tree = self.inner.propose(ids)
        return self.tree

    def observe(self, hidden: torch.Tensor, next_ids: list[int]) -> None:
        if self.tree is not None and len(self.tree):  # after a drafted step next_ids = accepted path + bonus
            tally(self.tree, next_ids, self.counts)
        self.tree = None
        self.inner.observe(hidden, next_ids)


def measure(target, head_path: str | Path, prompts: list[list[int]], max_new_tokens: int = 128,
            nodes: int = NODES, lookup: int | None = None, progress: bool = True) -> Counts:
    """Decode `prompts` greedily with the head drafting a static tree of `nodes` nodes (prompt lookup first unless
    lookup=0) and count the head's per-depth, per-rank acceptance."""
    from koala.decode import stream_tokens
    from koala.drafters.factory import LOOKUP_MIN_NGRAM, drafter_for_head, lookup_drafter
    from koala.drafters.trees import static_tree
    from koala.heads.checkpoint import read_config
    from koala.kinds import kind

    cfg, _ = read_config(head_path)  # the tree needs only the config; drafter_for_head loads the weights once
    _, depth, top_k = kind(cfg.kind).drafter.settings(cfg)
    paths = static_tree(nodes, depth, top_k, GUESS)
    inner = drafter_for_head(head_path, target, tree=paths, gate=False, lookup=0)
    counts = Counts()
    lookup = LOOKUP_MIN_NGRAM if lookup is None else lookup
    drafter = FirstOf([lookup_drafter(lookup), Tally(inner, counts)]) if lookup else Tally(inner, counts)
    for ids in tqdm(prompts, desc="calibrating", unit="prompt", disable=not progress):
        for _ in stream_tokens(target, ids, drafter, max_new_tokens=max_new_tokens):
            pass
    return counts


def save(head_path: str | Path, table: list[list[float]], about: dict) -> None:
    """Store the table in the head's config.json (atomically), next to what it was measured on."""
    file = Path(head_path) / "config.json"
    meta = json.loads(file.read_text())
    meta.setdefault("extra", {}).update({"rank_acceptance": table, "calibration": about})
    write_json_atomic(file, meta)


def _run(args: argparse.Namespace) -> int:
    from koala.bench import load_questions
    from koala.build import target_from_args
    from koala.drafters.factory import LOOKUP_MIN_NGRAM

    target = target_from_args(args)
    questions, _ = load_questions(args.questions, args.limit_per_category, args.skip_per_category)
    prompts = [target.encode(q["turns"][0], chat=True) for q in questions]
    start = time.perf_counter()
    counts = measure(target, args.head, prompts, args.max_new_tokens, args.nodes, args.lookup)
    table = counts.table()
    if not table:
        raise RuntimeError(f"The head drafted too rarely to calibrate ({counts.steps} trees); give more questions.")
    for d, (row, reached) in enumerate(zip(table, counts.reached)):
        rates = " ".join(f"{q:.3f}" for q in row)
        print(f"depth {d + 1}: {rates}  (parent accepted {reached[0]} times)")
    about = {"questions": str(args.questions), "prompts": len(prompts), "skip_per_category": args.skip_per_category,
             "max_new_tokens": args.max_new_tokens, "nodes": args.nodes,
             "lookup": LOOKUP_MIN_NGRAM if args.lookup is None else args.lookup,
             "trees": counts.steps, "dtype": str(target.dtype).replace("torch.", ""),
             "seconds": round(time.perf_counter() - start, 1)}
    if args.dry_run:
        print("(not saved: --dry-run)", file=sys.stderr)
    else:
        save(args.head, table, about)
        print(f"saved to {Path(args.head) / 'config.json'} (extra.rank_acceptance)", file=sys.stderr)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("calibrate", help="measure a head's per-depth, per-rank acceptance in the decode loop and "
                                         "store it for the drafting planner")
    p.add_argument("head", help="a trained head directory (its config.json is updated)")
    p.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl",
                   help="MT-bench-form questions (default: Spec-Bench)")
    p.add_argument("--skip-per-category", type=non_negative_int, default=2,
                   help="leave out the first N of each category (default 2: the ones `koala bench "
                        "--limit-per-category 2` uses, so the bench does not judge a plan on the text that chose it)")
    p.add_argument("--limit-per-category", type=positive_int, default=2)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--nodes", type=positive_int, default=NODES, help="nodes of the calibration tree")
    p.add_argument("--lookup", type=non_negative_int, default=None, metavar="N",
                   help="prompt lookup first, as when decoding (default: koala's; 0 = the head alone)")
    p.add_argument("--dry-run", action="store_true", help="print the table without saving it")
    add_target_args(p)
    p.set_defaults(func=_run)
