"""A run's metrics: one JSON line per logged step or event, and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_metrics(metrics: Path, png: Path) -> None:
    """Loss and acc@k curves (train and held-out), plus D/G losses when adversarial; the last row per step wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[tuple, dict] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "split" in r:
            rows[(r["split"], r["step"])] = r
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rs = sorted((r for (s, _), r in rows.items() if s == split), key=lambda r: r["step"])
        if not rs:
            continue
        steps = [r["step"] for r in rs]
        axes[0].plot(steps, [r["loss"] for r in rs], style, label=f"{split} loss")
        for k in sorted({k for r in rs for k in r if k.startswith("acc@")}):
            axes[1].plot(steps, [r.get(k, 0) for r in rs], style, label=f"{split} {k}")
        for k in ("d_loss", "g_loss"):
            if any(k in r for r in rs):
                axes[2].plot([r["step"] for r in rs if k in r], [r[k] for r in rs if k in r], label=k)
    for ax, title in zip(axes, ("supervised loss", "top-1 agreement with the target", "adversarial (D / head)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "off", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
