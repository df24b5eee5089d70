"""The drafter interface. The base class proposes an empty tree, which makes the decode loop plain decoding."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from koala.drafters.trees import Acceptance, Path, tree_paths
from koala.heads.config import HeadConfig
from koala.tree import DraftTree


class Drafter:
    """Proposes a draft tree continuing the committed tokens.

    The loop calls `reset` once per generation, then alternates `propose` (before each target forward) and
    `observe` (after it). Drafters that read the target's features (Medusa, EAGLE) get them through `observe`:
    `hidden[i]` is the target's final hidden state at the i-th newly committed position and `next_ids[i]` the
    token that follows it (so `next_ids[-1]` is the token the next tree must continue). A drafter whose
    `feature_layers` names target layers gets the inputs to those layers instead, concatenated (EAGLE-3).
    """

    name = "vanilla"
    plan = None  # for head drafters: the koala.drafters.plan.Plan they draft with
    feature_layers: tuple[int, ...] = ()  # () = the final hidden state; else the inputs to these target layers

    def fork(self) -> Drafter:
        """A drafter with the same settings (sharing weights) for another sequence decoding at the same time."""
        return copy.copy(self)  # per-sequence state is (re)made by `reset`

    def reset(self, prompt_ids: list[int]) -> None:
        """Forget everything about the previous generation."""

    def propose(self, ids: list[int]) -> DraftTree:
        """A tree continuing `ids` (all committed tokens, ending with the one not yet verified)."""
        return DraftTree.empty()

    def observe(self, hidden: torch.Tensor, next_ids: list[int]) -> None:
        """Target features of the newly committed positions (see the class docstring)."""


class HeadDrafter(Drafter):
    """What the trained-head drafters share: the head and the tree policy (shape, depth, children per node, size).

    `defaults` (tree, depth, top_k) and `default_acceptance` (per-depth rates for sizing trees when the head's
    manifest has none) are the kind's drafting defaults, declared once on its class.
    """

    defaults: dict = {"tree": "dynamic", "depth": 5, "top_k": 4}
    default_acceptance: tuple[float, ...] = (0.7, 0.65, 0.6, 0.55, 0.5)

    def __init__(self, head: torch.nn.Module, tree: str | Sequence[Path] | None = None, depth: int | None = None,
                 top_k: int | None = None, total_tokens: int | None = None,
                 acceptance: Acceptance | None = None) -> None:
        self.head = head
        tree, self.depth, self.top_k = self.settings(head.cfg, tree, depth, top_k)
        self.total_tokens = total_tokens or 16
        self.tree = tree if isinstance(tree, str) else "static"  # the tree's shape: chain, static or dynamic
        self.paths = tree_paths(tree, self.depth, self.top_k, self.total_tokens, acceptance or self.default_acceptance)
        self.reset([])

    @classmethod
    def settings(cls, cfg: HeadConfig, tree: str | Sequence[Path] | None = None, depth: int | None = None,
                 top_k: int | None = None) -> tuple[str | Sequence[Path], int, int]:
        """(tree, depth, top_k) with the kind's defaults for the ones left None, checked against the head's config
        (no weights needed, so a caller can plan before loading them)."""
        tree = tree or cls.defaults["tree"]
        depth = depth if depth is not None else cls.defaults.get("depth") or cfg.num_heads
        top_k = top_k if top_k is not None else cls.defaults["top_k"]
        if depth < 1 or top_k < 1:
            raise ValueError(f"--depth and --top-k-draft must be >= 1 (got {depth}, {top_k}).")
        limit = cls.max_depth(cfg)
        if limit is not None and depth > limit:
            raise ValueError(f"--depth {depth} is deeper than this {cfg.kind} head can draft ({limit}).")
        return tree, depth, top_k

    @staticmethod
    def max_depth(cfg: HeadConfig) -> int | None:
        """The deepest tree this head can draft (None: no limit)."""
        return None
