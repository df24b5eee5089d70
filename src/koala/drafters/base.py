"""The drafter interface. The base class proposes an empty tree, which makes the decode loop plain decoding."""
from __future__ import annotations

import copy

import torch

from koala.tree import DraftTree


class Drafter:
    """Proposes a draft tree continuing the committed tokens.

    The loop calls `reset` once per generation, then alternates `propose` (before each target forward) and
    `observe` (after it). Drafters that read the target's features (Medusa, EAGLE) get them through `observe`:
    `hidden[i]` is the target's final hidden state at the i-th newly committed position and `next_ids[i]` the
    token that follows it (so `next_ids[-1]` is the token the next tree must continue).
    """

    name = "vanilla"

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
