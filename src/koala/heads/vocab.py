"""Reduced draft vocabularies: the head only scores the most frequent target tokens (cheaper LM-head matmul)."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def draft_vocab_from_counts(counts: torch.Tensor, size: int, keep: Iterable[int] = ()) -> list[int]:
    """The `size` most frequent target ids (most frequent first), always including the ids in `keep` (EOS etc.)."""
    counts = torch.as_tensor(counts).reshape(-1).double()
    keep = sorted({int(i) for i in keep})
    if any(not 0 <= i < counts.numel() for i in keep):
        raise ValueError(f"keep ids must be valid token ids below {counts.numel()} (got {keep}).")
    if not len(keep) <= size <= counts.numel():
        raise ValueError(f"draft vocab size must be between {max(len(keep), 1)} and {counts.numel()}, got {size}.")
    score = counts.clone()
    score[keep] = float("inf")  # forced in, then re-sorted by their real counts below
    chosen = torch.topk(score, size).indices.tolist()
    real = counts.tolist()
    return sorted(chosen, key=lambda i: (-real[i], i))


def vocab_map(draft_vocab: list[int] | None, device: torch.device | str | None = None) -> torch.Tensor | None:
    """Long tensor mapping draft-vocab rows to target ids (None when the head uses the full vocabulary)."""
    return None if draft_vocab is None else torch.tensor(draft_vocab, dtype=torch.long, device=device)


class DraftLMHead(torch.nn.Module):
    """The target's LM head restricted to the draft vocabulary.

    Frozen by default and held as a non-persistent buffer, so it is neither trained nor saved: checkpoints stay
    small and the weights are re-attached from the target at load time. With `trainable=True` it becomes a
    parameter (initialised from the target rows) and is saved with the head.
    """

    frozen_linear = True  # F.linear(x, weight): drafting on CPU may give it koala's kernels (invariant_linear)

    def __init__(self, lm_head_weight: torch.Tensor, draft_vocab: list[int] | None, trainable: bool = False) -> None:
        super().__init__()
        ids = vocab_map(draft_vocab, lm_head_weight.device)
        weight = lm_head_weight.detach() if ids is None else lm_head_weight.detach()[ids]
        self.register_buffer("ids", ids, persistent=False)
        if trainable:
            self.weight = torch.nn.Parameter(weight.clone())
        else:
            self.register_buffer("weight", weight, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(features, self.weight)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocab ids to target ids."""
        return draft_ids if self.ids is None else self.ids[draft_ids]
