"""The KOALA ablation as one markdown table: every finished run under a directory (scripts/ablation.sh), its
held-out acc@k (agreement with the target's argmax), the mean and spread (stdev) over seeds, tokens, steps and
training throughput.

    .venv/bin/python scripts/ablation_table.py runs/ablation [--bench runs/bench/ablation/results.json]

With --bench, each cell also gets tau and speedup from a `koala bench` run whose method names are the run names.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def cell_of(name: str) -> tuple[str, str]:
    """'eagle-k2-adv-s1' -> ('eagle-k2-adv', 's1'): runs that differ only in the seed share a cell."""
    m = re.fullmatch(r"(.+)-(s\d+)", name)
    return (m.group(1), m.group(2)) if m else (name, "s0")


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("--bench", help="koala bench results.json with one method per run name")
    args = p.parse_args()
    results = json.loads(Path(args.bench).read_text()) if args.bench else {}
    bench = results.get("methods", {})
    plans = {n: spec.get("plan") for n, spec in results.get("settings", {}).get("method_specs", {}).items()}
    cells: dict[str, list[dict]] = defaultdict(list)
    for manifest in sorted(Path(args.runs).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        name = manifest.parent.name
        cell, seed = cell_of(name)
        cells[cell].append({"seed": seed, "m": m, "bench": bench.get(name), "plan": plans.get(name)})
    cols = ["cell", "seeds", "acc@1", "acc@2", "tokens", "steps", "train tok/s"]
    if bench:
        cols += ["tau", "speedup", "lowest category", "drafting plan"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for cell, runs in sorted(cells.items()):
        acc = {k: [r["m"]["final_eval"][k] for r in runs] for k in ("acc@1", "acc@2")}
        row = [cell, ",".join(r["seed"] for r in runs), fmt(acc["acc@1"]), fmt(acc["acc@2"]),
               f"{statistics.mean(r['m']['tokens_seen'] for r in runs) / 1e6:.2f}M",
               ",".join(sorted({str(r["m"]["steps"]) for r in runs})),
               f"{statistics.mean(r['m']['tokens_seen'] / r['m']['train_seconds'] for r in runs):,.0f}"]
        if bench:
            got = [r["bench"] for r in runs if r["bench"]]
            low = [min(c["speedup"] for c in b["by_category"].values()) for b in got]
            row += [fmt([b["tau"] for b in got], 2), fmt([b["speedup"] for b in got], 2), fmt(low, 2),
                    "; ".join(sorted({r["plan"] for r in runs if r["plan"]}))]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
