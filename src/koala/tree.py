"""Draft trees: what every drafter returns and what the verifier checks in one target forward.

Node i holds a proposed token and the index of its parent (-1 = the root, i.e. the last committed token, whose
target logits decide the first level). Parents always come before children, so depth and masks follow in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # (n,) long
    parents: torch.Tensor  # (n,) long, -1 for children of the root
    # (n, V) distribution each node was *sampled* from (given its earlier siblings were rejected); None means the
    # nodes were chosen deterministically (argmax / top-k), which the sampling rule treats as one-hot proposals.
    q: torch.Tensor | None = None
    # optional map from draft-vocab rows of q to target token ids (reduced draft vocabulary)
    q_vocab: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.tokens = self.tokens.long().reshape(-1)
        self.parents = self.parents.long().reshape(-1)
        if self.tokens.shape != self.parents.shape:
            raise ValueError("tokens and parents must have the same length")
        plist = self.parents.tolist()
        if any(p >= i or p < -1 for i, p in enumerate(plist)):
            raise ValueError("each node's parent must come before it (or be -1 for the root)")
        depth: list[int] = []
        for p in plist:
            depth.append(1 if p < 0 else depth[p] + 1)
        self._depth = depth
        self._plist = plist

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "DraftTree":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return cls(z, z.clone())

    @classmethod
    def chain(cls, tokens: list[int] | torch.Tensor, device: torch.device | str = "cpu") -> "DraftTree":
        t = torch.as_tensor(tokens, dtype=torch.long, device=device).reshape(-1)
        return cls(t, torch.arange(-1, len(t) - 1, device=device))

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def depth(self) -> list[int]:
        """Depth of each node (children of the root have depth 1)."""
        return self._depth

    def children(self) -> dict[int, list[int]]:
        """node -> its children in order (key -1 is the root)."""
        kids: dict[int, list[int]] = {-1: []}
        for i, p in enumerate(self._plist):
            kids.setdefault(p, []).append(i)
            kids.setdefault(i, [])
        return kids

    def path_to(self, node: int) -> list[int]:
        """Node indices from the first level down to `node` inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self._plist[node]
        return path[::-1]

    def ancestor_matrix(self) -> torch.Tensor:
        """(n, n) bool: [i, j] is True when j is i or an ancestor of i."""
        n = len(self)
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self._plist):
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        return anc


def verify_inputs(pending: torch.Tensor, tree: DraftTree, past_len: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Input ids, position ids and 4D additive mask for one forward over `pending` tokens followed by the tree.

    `pending` are committed tokens not yet in the KV cache (the prompt at first, then the last bonus token);
    they attend causally. Tree nodes sit at position (last pending position + depth) and see all of the cache,
    all pending tokens, their ancestors and themselves. With an empty tree the mask is None (plain causal).
    """
    return batch_verify_inputs([pending], [tree], [past_len], past_len, dtype)


def batch_verify_inputs(pending: list[torch.Tensor], trees: list[DraftTree], lengths: list[int], width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`verify_inputs` for a batch whose rows share one KV cache `width` columns wide.

    Row b's history is cache columns [0, lengths[b]) (later columns are stale and masked out), so rows may hold
    different lengths. Its block is its pending tokens then its tree, padded to the longest block with dummy
    slots that only see themselves and that nothing sees. Returns (B, q) ids and positions and a (B, 1, q,
    width + q) mask, or None when the forward is plain causal (equal lengths, equal pending, no trees).
    """
    device = pending[0].device
    sizes = [p.numel() + len(t) for p, t in zip(pending, trees)]
    q = max(sizes)
    ids = torch.zeros(len(trees), q, dtype=torch.long, device=device)
    pos = torch.zeros(len(trees), q, dtype=torch.long, device=device)
    plain = all(n == width and size == q and not len(t) for n, size, t in zip(lengths, sizes, trees))
    allowed = None if plain else torch.zeros(len(trees), q, width + q, dtype=torch.bool, device=device)
    for b, (p, tree, past, size) in enumerate(zip(pending, trees, lengths, sizes)):
        m = p.numel()
        ids[b, :m] = p
        pos[b, :m] = torch.arange(past, past + m, device=device)
        if len(tree):
            ids[b, m:size] = tree.tokens.to(device)
            pos[b, m:size] = torch.tensor(tree.depth, dtype=torch.long, device=device) + (past + m - 1)
        if size < q:
            pos[b, size:] = past
        if allowed is None:
            continue
        row, block = allowed[b], allowed[b, :, width:]
        row[:size, :past] = True
        block[:m, :m] = torch.ones(m, m, dtype=torch.bool, device=device).tril()
        block[m:size, :m] = True
        block[m:size, m:size] = tree.ancestor_matrix().to(device)
        block[size:, size:] = torch.eye(q - size, dtype=torch.bool, device=device)
    if allowed is None:
        return ids, pos, None
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask[:, None]
