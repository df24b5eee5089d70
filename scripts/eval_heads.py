"""Held-out acc@k of saved heads: top-1 agreement with the target's own argmax on a cache the heads never saw
(e.g. the target's answers to Spec-Bench prompts), so old and new heads compare on one footing:

    .venv/bin/python scripts/eval_heads.py heads/smollm2-135m/* --data runs/distill/specbench

With --categories QUESTIONS (the question file the cached answers reply to, e.g. Spec-Bench's), every cached
answer is scored and acc@1 is also reported per question category.
"""
from __future__ import annotations

import argparse
import json

import torch

from koala.data import read_conversations
from koala.heads.checkpoint import load_head
from koala.hidden_cache import HiddenCache, shard_records
from koala.losses import DraftVocab
from koala.target import load_target
from koala.train import TrainConfig
from koala.train.data import coverage, greedy_counts, split_indices, windows
from koala.train.loop import evaluate


def by_category(source: HiddenCache, questions: str) -> dict[str, list[int]]:
    """Cache sequences grouped by the category of the question they answer: cache record key -> position in the
    distilled file the cache was built from -> its question id -> the question file's category."""
    rows = [json.loads(line) for line in open(questions) if line.strip()]
    category = {str(r["question_id"]): r.get("category", "?") for r in rows}
    groups: dict[str, list[int]] = {}
    i = 0
    for path, manifest in zip(source.paths, source.manifests):
        qid = {c.index: c.id for c in read_conversations(manifest["source"])}
        for rec in shard_records(path, manifest["shards"]):
            groups.setdefault(category.get(qid.get(int(rec["key"])), "?"), []).append(i)
            i += 1
    return dict(sorted(groups.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heads", nargs="+")
    p.add_argument("--data", required=True, nargs="+", help="held-out cache directories")
    p.add_argument("--depth", type=int, default=3, help="EAGLE draft steps to score (unrolled on its own features)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--eval-sequences", type=int, default=96,
                   help="the same fixed held-out subset `koala train --eval-data` scores (0 = all)")
    p.add_argument("--categories", metavar="QUESTIONS", help="question file: score all answers, and per category")
    args = p.parse_args()
    target = load_target()
    source = HiddenCache(args.data)
    idx = list(range(len(source)))
    groups = by_category(source, args.categories) if args.categories else {}
    if 0 < args.eval_sequences < len(source) and not groups:
        idx = split_indices(len(source), args.eval_sequences)[1]
    counts = greedy_counts(source, idx, int(target.config.vocab_size))
    for path in args.heads:
        head = load_head(path, target).float()
        kind = head.cfg.kind
        cfg = TrainConfig(head=kind, layers=head.cfg.layers, num_heads=head.cfg.num_heads, unroll=args.depth - 1)
        vocab = DraftVocab.build(target, head.cfg.draft_vocab, "cpu")

        def score(seqs: list[int]) -> dict:
            items = windows(source, seqs, args.max_seq_len, cfg.depth + 1)
            with torch.no_grad():
                res = evaluate(head, source, [items[i:i + 8] for i in range(0, len(items), 8)], vocab, cfg, "cpu")
            return {k: round(v, 4) for k, v in res.items() if k.startswith("acc@")}

        print(json.dumps({"head": path, "kind": kind, "layers": head.cfg.layers,
                          "draft_vocab_coverage": round(coverage(counts, head.cfg.draft_vocab), 4), **score(idx),
                          **({"acc@1_by_category": {c: score(s)["acc@1"] for c, s in groups.items()}}
                             if groups else {})}), flush=True)


if __name__ == "__main__":
    main()
