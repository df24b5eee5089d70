"""Medusa drafting: all heads read the target's hidden state at the last committed position at once.

Head i's top-k tokens fill depth i+1 of the tree, rooted at the pending token (the target's own next token). The
tree is chosen deterministically (q = None), which stays lossless under sampling through accept_sampling.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from koala.drafters.base import HeadDrafter
from koala.drafters.trees import Acceptance, Candidates, Path, grow
from koala.heads.config import HeadConfig
from koala.heads.medusa import MedusaHead
from koala.tree import DraftTree


class MedusaDrafter(HeadDrafter):
    name = "medusa"
    defaults = {"tree": "static", "top_k": 4}  # depth: all the head's Medusa heads
    default_acceptance = (0.6, 0.45, 0.35, 0.3, 0.25)

    def __init__(self, head: MedusaHead, tree: str | Sequence[Path] | None = None, depth: int | None = None,
                 top_k: int | None = None, total_tokens: int | None = None,
                 acceptance: Acceptance | None = None) -> None:
        heads = head.cfg.num_heads
        super().__init__(head, tree, heads if depth is None else min(depth, heads), top_k, total_tokens, acceptance)
        if self.paths is not None and max(len(p) for p in self.paths) > heads:
            raise ValueError(f"The tree is deeper than the head's {heads} Medusa heads.")

    @staticmethod
    def max_depth(cfg: HeadConfig) -> int:
        return cfg.num_heads  # head i drafts depth i+1

    def reset(self, prompt_ids: list[int]) -> None:
        self.logp = None

    @torch.inference_mode()
    def observe(self, hidden: torch.Tensor, next_ids: list[int]) -> None:
        logits = self.head(hidden[-1:].unsqueeze(0).to(self.head.lm_head.weight.dtype))[0, 0]  # (H, Vd)
        self.logp = torch.log_softmax(logits.float(), dim=-1)

    def _expand(self, cands: Candidates, nodes: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        level = 0 if nodes[0] < 0 else cands.depth[nodes[0]]  # head `level` predicts depth level+1
        top = torch.topk(self.logp[level], k)
        tokens = self.head.lm_head.to_target(top.indices).cpu()
        return tokens.expand(len(nodes), k), top.values.cpu().expand(len(nodes), k)

    @torch.inference_mode()
    def propose(self, ids: list[int]) -> DraftTree:
        if self.logp is None:
            return DraftTree.empty()
        return grow(self.paths, self._expand, self.depth, self.top_k, self.total_tokens)
