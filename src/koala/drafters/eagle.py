"""EAGLE drafting (also EAGLE-3 style heads): the head runs autoregressively on its own features, with a small KV
cache of its own.

After each verify, `observe` feeds the head the true (feature_t, token_{t+1}) pairs of the newly committed
positions, extending the head cache; its last output predicts the feature of the pending token, whose logits give
depth 1 of the tree. Deeper levels feed predicted features back, one head forward per level with a tree mask, and
the cache is cropped back to the committed length afterwards (accepted positions are re-ingested with the target's
true features on the next observe).
"""
from __future__ import annotations

import torch

from koala.drafters.base import HeadDrafter
from koala.drafters.trees import Candidates, grow
from koala.kvcache import ReservedCache
from koala.tree import DraftTree


class EagleDrafter(HeadDrafter):
    name = "eagle"
    defaults = {"tree": "dynamic", "depth": 5, "top_k": 4}
    default_acceptance = (0.7, 0.65, 0.6, 0.55, 0.5)

    def reset(self, prompt_ids: list[int]) -> None:
        self.cache = ReservedCache()
        self.committed = 0  # positions in the head cache (all with true target features)
        self.root: torch.Tensor | None = None  # predicted feature of the pending token, (d,)
        self._feature: dict[int, torch.Tensor] = {}
        self._slot: dict[int, int] = {}

    @property
    def _dtype(self) -> torch.dtype:
        return self.head.fc.weight.dtype

    @torch.inference_mode()
    def observe(self, hidden: torch.Tensor, next_ids: list[int]) -> None:
        m = hidden.shape[0]
        device = hidden.device
        ids = torch.tensor(next_ids, dtype=torch.long, device=device)[None]
        pos = torch.arange(self.committed, self.committed + m, device=device)[None]
        out = self.head(hidden[None].to(self._dtype), ids, pos, self.cache)
        self.root = out[0, -1]
        self.committed += m

    def _children(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(self.head.logits(features).float(), dim=-1)
        top = torch.topk(logp, k, dim=-1)
        return self.head.lm_head.to_target(top.indices).cpu(), top.values.cpu()

    def _expand(self, cands: Candidates, nodes: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if nodes == [-1]:
            return self._children(self.root[None], k)
        device = self.root.device
        past, n = self.cache.get_seq_length(), len(nodes)
        parent_feat = torch.stack([self.root if cands.parents[i] < 0 else self._feature[cands.parents[i]]
                                   for i in nodes])
        ids = torch.tensor([cands.tokens[i] for i in nodes], dtype=torch.long, device=device)
        # node at depth d continues the pending token at position committed-1+d; its input sits one position back
        pos = torch.tensor([self.committed - 1 + cands.depth[i] for i in nodes], device=device)
        allowed = torch.zeros(n, past + n, dtype=torch.bool)
        allowed[:, :self.committed] = True
        for j, i in enumerate(nodes):
            allowed[j, past + j] = True
            a = cands.parents[i]
            while a >= 0:
                allowed[j, self._slot[a]] = True
                a = cands.parents[a]
        out = self.head(parent_feat[None], ids[None], pos[None], self.cache, allowed.to(device)[None, None])[0]
        for j, i in enumerate(nodes):
            self._feature[i], self._slot[i] = out[j], past + j
        return self._children(out, k)

    @torch.inference_mode()
    def propose(self, ids: list[int]) -> DraftTree:
        if self.root is None:
            return DraftTree.empty()
        try:
            return grow(self.paths, self._expand, self.depth, self.top_k, self.total_tokens)
        finally:
            self.cache.crop(self.committed - self.cache.get_seq_length())  # negative = tokens to drop
            self._feature.clear()
            self._slot.clear()


class Eagle3Drafter(EagleDrafter):
    """The same drafting on an EAGLE-3 style head: `observe` gets the inputs to the head's target layers (the
    head fuses them), and deeper levels feed back the head's own pre-norm states."""

    name = "eagle3"

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.head.cfg.aux_layers)
