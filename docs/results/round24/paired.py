"""Paired per-question speed of method pairs in a `koala bench` run (its partial.jsonl): the mean of
log(time of A / time of B) over questions, with +-2 standard errors, as a "B is x times faster" ratio; each pair
is given as B:A.

    .venv/bin/python docs/results/round24/paired.py docs/results/round24/bench eagle3-r24:eagle3 ...
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def paired(rows: list[dict], a: str, b: str) -> str:
    """How much faster b runs than a per question (each method's median seconds per token of that question)."""
    logs = []
    for r in rows:
        ma, mb = r["methods"][a], r["methods"][b]
        ta = ma["seconds"] / sum(map(len, ma["tokens"]))
        tb = mb["seconds"] / sum(map(len, mb["tokens"]))
        logs.append(math.log(ta / tb))
    mean, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    wins = sum(x > 0 for x in logs)
    return (f"{b} vs {a}: {math.exp(mean):.3f}x faster ({math.exp(mean - 2 * se):.3f}-{math.exp(mean + 2 * se):.3f}), "
            f"faster on {wins}/{len(logs)} questions")


def main() -> None:
    rows = [json.loads(line) for line in (Path(sys.argv[1]) / "partial.jsonl").read_text().splitlines() if line]
    for pair in sys.argv[2:]:
        b, a = pair.split(":")
        print(paired(rows, a, b))


if __name__ == "__main__":
    main()
