"""Draft with the first of several drafters that has something to propose.

Prompt lookup is free and right when the answer repeats the prompt or itself (summaries, RAG, code edits); a
trained head is right elsewhere. `FirstOf([PromptLookupDrafter(min_ngram=2), head])` proposes the lookup's chain
when the recent n-gram occurred before and the head's tree otherwise. Every drafter observes every step, so a head
keeps its feature cache complete while lookup has the floor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from koala.drafters.base import Drafter
from koala.tree import DraftTree


class FirstOf(Drafter):
    def __init__(self, drafters: Sequence[Drafter]) -> None:
        if not drafters:
            raise ValueError("FirstOf needs at least one drafter.")
        self.drafters = list(drafters)
        self.name = "+".join(d.name for d in self.drafters)

    @property
    def plan(self):
        return next((d.plan for d in self.drafters if d.plan is not None), None)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        wanted = {d.feature_layers for d in self.drafters if d.feature_layers}
        if len(wanted) > 1:
            raise ValueError(f"FirstOf's drafters read different target layers {sorted(wanted)}; they would need "
                             f"different features.")
        return wanted.pop() if wanted else ()

    def fork(self) -> FirstOf:
        return FirstOf([d.fork() for d in self.drafters])

    def reset(self, prompt_ids: list[int]) -> None:
        for d in self.drafters:
            d.reset(prompt_ids)

    def propose(self, ids: list[int]) -> DraftTree:
        for d in self.drafters:
            tree = d.propose(ids)
            if len(tree):
                return tree
        return tree

    def observe(self, hidden: torch.Tensor, next_ids: list[int]) -> None:
        for d in self.drafters:
            d.observe(hidden, next_ids)
