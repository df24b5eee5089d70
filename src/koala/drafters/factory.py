"""Turn a saved head directory into a ready drafter with sensible per-kind defaults."""
from __future__ import annotations

from pathlib import Path

from koala.drafters.base import Drafter
from koala.drafters.gate import GatedDrafter
from koala.heads.checkpoint import load_head
from koala.kinds import kind


def _acceptance(extra: dict, default: tuple[float, ...], path: str | Path) -> list[float]:
    """Per-depth acceptance rates from the training manifest (clamped to (0.01, 0.99)), else the kind's defaults."""
    rates = extra.get("acceptance")
    if rates is None:
        return list(default)
    if not isinstance(rates, list) or not rates or not all(isinstance(r, (int, float)) for r in rates):
        raise ValueError(f"{path}/config.json: extra.acceptance must be a list of per-depth rates, got {rates!r}.")
    return [min(max(float(r), 0.01), 0.99) for r in rates]


def _max_nodes(tree: str, depth: int, top_k: int) -> int:
    if tree == "dynamic":
        return top_k + (depth - 1) * top_k * top_k
    return sum(top_k ** d for d in range(1, depth + 1))


def drafter_for_head(path: str | Path, target, tree: str | None = None, depth: int | None = None,
                     top_k: int | None = None, total_tokens: int | str | None = "auto", gate: bool = True) -> Drafter:
    """A Medusa or EAGLE drafter for the head saved in `path`; None arguments take the head type's defaults.

    gate=True wraps it in GatedDrafter: it drafts only while measured drafting throughput beats plain decoding.

    total_tokens "auto" (or None) times the target on this device and picks the tree size with the best expected
    throughput (see koala.drafters.tree_size); it is ignored for chains, whose size is the depth.
    """
    head = load_head(path, target)
    cls = kind(head.cfg.kind).drafter
    tree, depth, top_k = cls.settings(head, tree, depth, top_k)
    acceptance = _acceptance(head.extra, cls.default_acceptance, path)
    size: int | None
    if tree == "chain":
        size = None
    elif total_tokens in (None, "auto"):
        from koala.drafters.tree_size import choose_total_tokens

        size = choose_total_tokens(target, depth, top_k, acceptance, _max_nodes(tree, depth, top_k))
    else:
        try:
            size = int(total_tokens)
        except ValueError:
            raise ValueError(f"--total-tokens must be a positive integer or 'auto', got {total_tokens!r}.") from None
        if size < 1:
            raise ValueError(f"--total-tokens must be >= 1, got {size}.")
    drafter = cls(head, tree=tree, depth=depth, top_k=top_k, total_tokens=size, acceptance=acceptance)
    return GatedDrafter(drafter) if gate else drafter
