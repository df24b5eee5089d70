"""PNG plots for `koala bench`: speedup by category, tau per question, and how deep drafts get accepted."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("Plots need matplotlib: pip install 'koala[bench]'.") from e
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def write_plots(summary: dict, raw: dict, out: Path) -> list[Path]:
    """Write speedup_by_category.png, tau.png and acceptance_by_depth.png; returns the paths written."""
    plt = _pyplot()
    written = []
    methods = summary["methods"]
    cats = list(next(iter(methods.values()))["by_category"])

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) + 2), 4))
    width = 0.8 / len(methods)
    for j, (name, m) in enumerate(methods.items()):
        vals = [m["by_category"][c]["speedup"] or 0.0 for c in cats]
        ax.bar([i + j * width for i in range(len(cats))], vals, width, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("speedup vs vanilla")
    ax.legend(fontsize="small")
    written.append(_save(fig, out / "speedup_by_category.png"))

    taus = {n: [r.tau for r in rs] for n, rs in raw.items() if rs and all(r.tau is not None for r in rs)}
    fig, ax = plt.subplots(figsize=(6, 4))
    if taus:
        ax.boxplot(list(taus.values()), tick_labels=list(taus))
    ax.set_ylabel("tau (new tokens per target forward), per question")
    written.append(_save(fig, out / "tau.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in raw.items():
        lengths = [a for r in rs for a in r.accepted_lengths]
        if not lengths or max(lengths) == 0:
            continue
        depths = range(1, max(lengths) + 1)
        ax.plot(list(depths), [sum(a >= d for a in lengths) / len(lengths) for d in depths], marker="o", label=name)
    ax.set_xlabel("draft depth d")
    ax.set_ylabel("share of steps accepting >= d draft tokens")
    if ax.lines:
        ax.legend(fontsize="small")
    written.append(_save(fig, out / "acceptance_by_depth.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
