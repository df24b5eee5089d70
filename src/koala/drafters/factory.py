"""Turn a saved head directory into a ready drafter, its drafting plan chosen by measurement where left open."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from koala.drafters.base import Drafter
from koala.drafters.gate import GatedDrafter
from koala.drafters.hybrid import FirstOf
from koala.drafters.plan import Plan, candidate_plans, choose_plan
from koala.drafters.pld import PromptLookupDrafter
from koala.drafters.trees import Acceptance, rank_table
from koala.drafters.trees import Path as TreePath
from koala.fused_layer import use_cpu_kernels
from koala.heads.checkpoint import load_head
from koala.heads.config import WEIGHTS
from koala.heads.vocab import DraftLMHead
from koala.kinds import kind


# Prompt lookup of 3-gram matches before the head: on 13 Spec-Bench questions (SmolLM2, fp32, 2 threads) EAGLE
# with lookup ran 1.44x vanilla against 1.12x alone and 1.22x for lookup alone (docs/heads.md).
LOOKUP_MIN_NGRAM = 3


def _acceptance(extra: dict, default: tuple[float, ...], path: str | Path) -> Acceptance:
    """The head's acceptance model: the per-depth, per-rank rates `koala calibrate` measured in the decode loop,
    else the per-depth rates from its training manifest (clamped to (0.01, 0.99)), else the kind's defaults."""
    table = extra.get("rank_acceptance")
    if table is not None:
        try:
            if not isinstance(table, list) or not table or not all(isinstance(row, list) for row in table):
                raise ValueError("it must be a non-empty list of lists")
            rank_table(table, len(table), 1)
        except ValueError as e:
            raise ValueError(f"{path}/config.json: extra.rank_acceptance is not a table of per-depth, per-rank rates "
                             f"({e}); run `koala calibrate {path}` again.") from None
        return table
    rates = extra.get("acceptance")
    if rates is None:
        return list(default)
    if not isinstance(rates, list) or not rates or not all(isinstance(r, (int, float)) for r in rates):
        raise ValueError(f"{path}/config.json: extra.acceptance must be a list of per-depth rates, got {rates!r}.")
    return [min(max(float(r), 0.01), 0.99) for r in rates]


def _total_tokens(value: int | str | None) -> int | None:
    """--total-tokens: a positive count, or None for "auto"."""
    if value in (None, "auto"):
        return None
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"--total-tokens must be a positive integer or 'auto', got {value!r}.") from None
    if size < 1:
        raise ValueError(f"--total-tokens must be >= 1, got {size}.")
    return size


def lookup_drafter(min_ngram: int) -> PromptLookupDrafter:
    """Prompt lookup as koala drafts with it before a head: n-grams of at least `min_ngram` tokens."""
    return PromptLookupDrafter(min_ngram=min_ngram, max_ngram=max(3, min_ngram))


def _file_hash(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()[:20]


def draft_lm_head_codes(head: torch.nn.Module, target) -> dict[str, tuple[int, torch.Tensor]]:
    """{module name: (kind, blocks)} for a head's frozen draft LM head: its rows of the target LM head's GGUF codes
    (a coded kernel reads 9 bits a weight instead of 16, with the same bits; koala.gguf_codes), where the target has
    them."""
    if target.lm_head_codes is None:
        return {}
    kind, blocks = target.lm_head_codes
    return {name: (kind, blocks if m.ids is None else blocks[m.ids.cpu()]) for name, m in head.named_modules()
            if isinstance(m, DraftLMHead) and not isinstance(m.weight, torch.nn.Parameter)}


def drafter_for_head(path: str | Path, target, tree: str | Sequence[TreePath] | None = None, depth: int | None = None,
                     top_k: int | None = None, total_tokens: int | str | None = "auto", gate: bool = True,
                     lookup: int = LOOKUP_MIN_NGRAM) -> Drafter:
    """A drafter for the head saved in `path`; what is left None (or total_tokens "auto") is chosen here.

    The tree shape, depth and size left open are chosen by koala.drafters.plan: the plan with the most expected
    tokens per second given this device's measured verify and draft costs and the head's per-depth acceptance.
    With the shape open, "no drafting" is a candidate too: when it wins the result decodes plainly (a Drafter
    that proposes nothing, named after the head). `drafter.plan` says what was chosen.

    lookup=N > 0 tries prompt lookup of n-grams of at least N tokens first every step, and the head drafts where
    it finds none (koala.drafters.hybrid.FirstOf); 0 drafts with the head alone. gate=True wraps a drafting plan in
    GatedDrafter: it drafts only while drafting measurably beats plain steps.
    """
    if lookup < 0:
        raise ValueError(f"--lookup must be >= 0 (0 = off), got {lookup}.")
    head = load_head(path, target)
    if target.device.type == "cpu":  # the same kernels as the target: faster than torch's at a draft step's rows
        use_cpu_kernels(head, draft_lm_head_codes(head, target))
    cls = kind(head.cfg.kind).drafter
    _, full_depth, top_k = cls.settings(head.cfg, tree, depth, top_k)  # checks what was given; fills the defaults
    acceptance = _acceptance(head.extra, cls.default_acceptance, path)
    size = _total_tokens(total_tokens)

    def build(plan: Plan) -> Drafter:
        return cls(head, tree=plan.tree, depth=plan.depth, top_k=top_k, total_tokens=plan.total_tokens or None,
                   acceptance=acceptance)

    if tree is not None and not isinstance(tree, str):  # explicit paths: nothing to choose
        drafter = cls(head, tree=tree, depth=depth, top_k=top_k, total_tokens=size, acceptance=acceptance)
        plan = Plan("static", drafter.depth, len(drafter.paths))
    else:
        shapes = [tree] if tree else ["none", "chain", cls.defaults["tree"]]
        depths = [full_depth] if depth is not None else list(range(1, full_depth + 1))
        plans = candidate_plans(shapes, depths, top_k, size)
        plan = choose_plan(target, plans, build, lambda: _file_hash(Path(path) / WEIGHTS), top_k, acceptance)
        if plan.tree == "none":
            if lookup:
                return lookup_drafter(lookup)
            plain = Drafter()
            plain.name, plain.plan = cls.name, plan
            return plain
        drafter = build(plan)
    drafter.plan = plan
    if lookup:
        drafter = FirstOf([lookup_drafter(lookup), drafter])
    return GatedDrafter(drafter) if gate else drafter
