"""Held-out acc@k of saved heads: top-1 agreement with the target's own argmax on a cache the heads never saw
(e.g. the target's answers to Spec-Bench prompts), so old and new heads compare on one footing:

    .venv/bin/python scripts/eval_heads.py heads/smollm2-135m/* --data runs/distill/specbench
"""
from __future__ import annotations

import argparse
import json

import torch

from koala.heads.checkpoint import load_head
from koala.hidden_cache import HiddenCache
from koala.losses import DraftVocab
from koala.target import load_target
from koala.train import TrainConfig
from koala.train.data import coverage, greedy_counts, split_indices, windows
from koala.train.loop import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heads", nargs="+")
    p.add_argument("--data", required=True, nargs="+", help="held-out cache directories")
    p.add_argument("--depth", type=int, default=3, help="EAGLE draft steps to score (unrolled on its own features)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--eval-sequences", type=int, default=96,
                   help="the same fixed held-out subset `koala train --eval-data` scores (0 = all)")
    args = p.parse_args()
    target = load_target()
    source = HiddenCache(args.data)
    idx = list(range(len(source)))
    if 0 < args.eval_sequences < len(source):
        idx = split_indices(len(source), args.eval_sequences)[1]
    counts = greedy_counts(source, idx, int(target.config.vocab_size))
    for path in args.heads:
        head = load_head(path, target).float()
        kind = head.cfg.kind
        cfg = TrainConfig(head=kind, layers=head.cfg.layers, num_heads=head.cfg.num_heads, unroll=args.depth - 1)
        items = windows(source, idx, args.max_seq_len, cfg.depth + 1)
        batches = [items[i:i + 8] for i in range(0, len(items), 8)]
        with torch.no_grad():
            res = evaluate(head, source, batches, DraftVocab.build(target, head.cfg.draft_vocab, "cpu"), cfg, "cpu")
        print(json.dumps({"head": path, "kind": kind, "layers": head.cfg.layers,
                          "draft_vocab_coverage": round(coverage(counts, head.cfg.draft_vocab), 4),
                          **{k: round(v, 4) for k, v in res.items() if k.startswith("acc@")}}), flush=True)


if __name__ == "__main__":
    main()
