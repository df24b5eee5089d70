"""Acceptance rules: small pure functions from (draft tree, target scores at root + every node) to the accepted path.

Row 0 of `logits`/`probs` belongs to the root (the last committed token), row 1+i to tree node i. Each rule returns
the accepted node indices (root to leaf) and the next token the target itself contributes (the "bonus" token).

- `accept_greedy`: lossless for greedy decoding (exact argmax match).
- `accept_sampling`: lossless speculative sampling over trees (recursive rejection sampling across siblings).
- `accept_typical`: Medusa's typical acceptance. LOSSY: it does not preserve the target distribution; opt-in only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from koala.tree import DraftTree


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Accepted:
    path: list[int]  # accepted tree nodes, root to leaf
    next_token: int  # the target's own token after the path


def probs_from_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution the target samples from: temperature, then top-k, then top-p (nucleus), as in HF."""
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= sampling.top_p  # keep the smallest set reaching top_p
        drop[..., 0] = False  # never nothing: a top_p below float precision (1e-300) still keeps the best token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Accepted:
    """Follow the children whose token equals the target's argmax; stop at the first miss."""
    best = logits.argmax(-1).tolist()
    kids, tokens = tree.children(), tree.tokens.tolist()
    node, path = -1, []
    while True:
        want = best[node + 1]
        nxt = next((c for c in kids[node] if tokens[c] == want), None)
        if nxt is None:
            return Accepted(path, want)
        path.append(nxt)
        node = nxt


def _proposal(tree: DraftTree, node: int, vocab: int) -> torch.Tensor | None:
    """Full-vocabulary proposal distribution of a sampled node, or None for a deterministic node."""
    if tree.q is None:
        return None
    q = tree.q[node].float()
    if tree.q_vocab is None:
        return q
    return torch.zeros(vocab, dtype=q.dtype, device=q.device).index_copy_(0, tree.q_vocab, q)


def accept_sampling(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None) -> Accepted:
    """Recursive rejection sampling: the output is distributed exactly as the target's `probs`.

    At a node with target distribution p, try its children in order. Child x drawn from q is accepted with
    probability min(1, p(x)/q(x)); on rejection p becomes normalize(max(p - q, 0)) and the next sibling (drawn
    without replacement, so its q excludes x) is tried. Deterministic children use q = one-hot(x): accept with
    probability p(x), else zero x out. When all children are rejected, the bonus token is sampled from p.
    `probs`, the tree's q and `generator` live on the CPU.
    """
    kids, tokens = tree.children(), tree.tokens.tolist()
    vocab = probs.shape[-1]
    node, path = -1, []
    while True:
        p = probs[node + 1].float()
        moved = False
        for c in kids[node]:
            x = tokens[c]
            q = _proposal(tree, c, vocab)
            qx = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator))
            if qx > 0 and u * qx < float(p[x]):
                path.append(c)
                node, moved = c, True
                break
            if q is None:
                residual = p.clone()
                residual[x] = 0.0
            else:
                residual = (p - q).clamp_min(0.0)
            total = float(residual.sum())
            if total > 1e-12:  # total == 0 only if p == q, where rejection has probability 0
                p = residual / total
        if not moved:
            nxt = int(torch.multinomial(p, 1, generator=generator))
            return Accepted(path, nxt)


def accept_typical(tree: DraftTree, probs: torch.Tensor, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3, generator: torch.Generator | None = None) -> Accepted:
    """Medusa-2's typical acceptance (LOSSY): keep a node when p(x) > min(threshold, alpha * exp(-entropy(p))).

    Returns the deepest fully accepted path; the next token is sampled from the target at its end.
    """
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    limit = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    ok: list[bool] = []
    for i, (x, par) in enumerate(zip(tokens, parents)):
        row = par + 1
        ok.append((par < 0 or ok[par]) and float(probs[row, x]) > float(limit[row]))
    best = max((i for i in range(len(tokens)) if ok[i]), key=lambda i: tree.depth[i], default=-1)
    path = tree.path_to(best) if best >= 0 else []
    nxt = int(torch.multinomial(probs[best + 1].float(), 1, generator=generator))
    return Accepted(path, nxt)
