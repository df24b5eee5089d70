"""Round 11, checked and dropped (docs/training.md): how well does an n-gram store of the target's own greedy
answers predict its answers to new prompts?

    .venv/bin/python docs/results/round11/ngram_store.py

The store holds every distilled answer in data/smollm2-135m except the Spec-Bench ones; for each position of the
target's Spec-Bench answers it proposes the most frequent continuation of the longest context (orders 1-6) seen
in the store. Printed: top-1 agreement overall, by the store's confidence and by matched order; the tokens an
8-token chain from the store would get accepted; and koala's 3-gram prompt lookup on the same positions. Counts
per position (not per decoding step), so the last two are only comparable with each other.
"""
from __future__ import annotations

import gzip
import json
import time

import numpy as np

from koala.drafters.pld import lookup
from koala.target import load_target

STORE = ("data/smollm2-135m/sharegpt-first-turns.jsonl.gz", "data/smollm2-135m/sharegpt-later-turns.jsonl.gz",
         "data/smollm2-135m/task-answers.jsonl.gz")
HELD_OUT = "data/smollm2-135m/specbench-answers.jsonl.gz"
ORDERS = 6
CHAIN = 8
MIX = 1000003  # n-gram keys: a polynomial hash of the ids, modulo 2**64


def turns(path: str):
    """(user turn, the target's answer) pairs of a distilled file."""
    for line in gzip.open(path, "rt"):
        conv = json.loads(line)["conversations"]
        for i, m in enumerate(conv):
            if m["from"] == "gpt":
                yield (conv[i - 1]["value"] if i else ""), m["value"]


def build_tables(flat: np.ndarray) -> dict[int, dict[int, tuple[int, float]]]:
    """Per order n: hashed n-gram -> (most frequent next token, its share of the n-gram's continuations).
    -1 in `flat` separates answers; no n-gram spans it."""
    tables = {}
    for n in range(1, ORDERS + 1):
        idx = np.arange(n, len(flat))
        ctx = np.stack([flat[idx - n + j] for j in range(n)], 1)
        ok = (ctx >= 0).all(1) & (flat[idx] >= 0)
        ctx, nxt = ctx[ok], flat[idx][ok]
        key = np.zeros(len(ctx), dtype=np.uint64)
        for j in range(n):
            key = key * np.uint64(MIX) + ctx[:, j].astype(np.uint64)
        pairs, counts = np.unique(np.stack([key.view(np.int64), nxt], 1), axis=0, return_counts=True)
        order = np.lexsort((-counts, pairs[:, 0]))  # per key, the most frequent next token first
        pairs, counts = pairs[order], counts[order]
        keys, first = np.unique(pairs[:, 0], return_index=True)
        share = counts[first] / np.add.reduceat(counts, first)
        tables[n] = dict(zip(keys.tolist(), zip(pairs[first, 1].tolist(), share.tolist())))
    return tables


def hashed(ids: list[int]) -> int:
    """The key build_tables gives these ids (the same uint64 arithmetic, read as int64)."""
    k = 0
    for t in ids:
        k = (k * MIX + t) % (1 << 64)
    return int(np.array([k], dtype=np.uint64).view(np.int64)[0])


def predict(tables, hist: list[int]) -> tuple[int, float, int] | None:
    """(next token, its share, the order matched) from the longest context the store knows, or None."""
    for n in range(min(ORDERS, len(hist)), 0, -1):
        hit = tables[n].get(hashed(hist[-n:]))
        if hit:
            return hit[0], hit[1], n
    return None


def accepted(proposal: list[int], truth: list[int]) -> int:
    """Leading tokens of `proposal` that equal `truth`."""
    n = 0
    while n < len(proposal) and n < len(truth) and proposal[n] == truth[n]:
        n += 1
    return n


def main() -> None:
    t0 = time.time()
    tok = load_target().tokenizer
    flat = np.array([t for f in STORE for _, a in turns(f) for t in tok.encode(a, add_special_tokens=False) + [-1]],
                    dtype=np.int64)
    tables = build_tables(flat)
    print(f"store: {len(flat)} tokens, {sum(map(len, tables.values()))} n-grams ({time.time() - t0:.0f} s)")
    hit, share, order, chain_acc, pld_fired, pld_acc = [], [], [], [], [], []
    for question, answer in turns(HELD_OUT):
        hist = tok.encode(question, add_special_tokens=False)
        y = tok.encode(answer, add_special_tokens=False)
        for i in range(len(y)):
            first = predict(tables, hist)
            hit.append(first is not None and first[0] == y[i])
            share.append(first[1] if first else 0.0)
            order.append(first[2] if first else 0)
            chain, h = [], hist[:]
            while len(chain) < CHAIN and (e := predict(tables, h)) is not None:
                chain.append(e[0])
                h.append(e[0])
            chain_acc.append(accepted(chain, y[i:]))
            copied = lookup(hist, 3, CHAIN, min_ngram=3)
            pld_fired.append(bool(copied))
            pld_acc.append(accepted(copied, y[i:]))
            hist.append(y[i])
    hit, share, order = np.array(hit), np.array(share), np.array(order)
    pld_fired, pld_acc = np.array(pld_fired), np.array(pld_acc)
    print(f"{len(hit)} positions; top-1 agreement (any order): {hit.mean():.3f}")
    for lo, hi in [(0, .2), (.2, .4), (.4, .6), (.6, .8), (.8, .95), (.95, 1.01)]:
        m = (share >= lo) & (share < hi)
        print(f"  share [{lo}, {hi}): n={m.sum()} agreement {hit[m].mean():.3f}")
    for n in range(1, ORDERS + 1):
        m = order == n
        print(f"  order {n}: n={m.sum()} ({m.mean():.3f} of positions) agreement {hit[m].mean():.3f}")
    print(f"{CHAIN}-token chain from the store, accepted per position: {np.mean(chain_acc):.3f}")
    print(f"3-gram prompt lookup: proposes at {pld_fired.mean():.3f} of positions, accepted {pld_acc[pld_fired].mean():.2f}"
          f" there, {pld_acc.mean():.2f} per position")


if __name__ == "__main__":
    main()
