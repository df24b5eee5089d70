"""Tree shapes for head drafters, kept free of any model so they are easy to test.

A static tree is a Medusa-style list of paths of sibling ranks: (0,) is the best first token, (1,) the second best,
(0, 1) the second-best child of (0,), and so on. Dynamic trees (EAGLE-2) are grown from the drafter's own scores.
Drafters plug in through an `Expand` callback that returns the top-k children (target ids and log-probs) of a
batch of same-depth nodes; -1 stands for the root (the pending token).

Static shapes and the "auto" tree size use one acceptance model: q[d][r], the probability that the target's next
token at depth d+1 is the draft's rank-r candidate given the parent was accepted. It is either measured in the
decode loop (`koala calibrate`: a per-depth list of per-rank rates) or guessed from per-depth top-1 rates a_d as
a_d * (1 - a_d)**r. A node is accepted with the product of q along its path, and the expected accepted draft tokens
of a tree is the sum over its nodes. The best tree of n nodes is the n most likely nodes (q is made non-increasing
in rank, so a node is never more likely than its parent or its better-ranked sibling, and that set is a tree).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from koala.tree import DraftTree

Path = tuple[int, ...]
# (candidates so far, same-depth node indices or [-1] for the root, k) -> (tokens (N, k) target ids, logp (N, k))
Expand = Callable[["Candidates", list[int], int], tuple[torch.Tensor, torch.Tensor]]


def chain(depth: int) -> list[Path]:
    """The top-1 path of length `depth`."""
    if depth < 1:
        raise ValueError(f"A chain needs depth >= 1, got {depth}.")
    return [(0,) * d for d in range(1, depth + 1)]


# per-depth top-1 rates, or per-depth lists of per-rank rates (measured)
Acceptance = Sequence[float] | Sequence[Sequence[float]]


def is_measured(acceptance: Acceptance) -> bool:
    """True for per-rank tables (as `koala calibrate` measures them in the loop), False for per-depth top-1 rates."""
    return not all(isinstance(a, (int, float)) for a in acceptance)


def rank_table(acceptance: Acceptance, depth: int, top_k: int) -> list[list[float]]:
    """q[d][r] for d < depth, r < top_k (see the module docstring). Depths past the given ones repeat the last;
    measured ranks past the given ones are 0."""
    if not acceptance:
        raise ValueError("need at least one acceptance rate")
    if not is_measured(acceptance):
        if any(not 0 < a < 1 for a in acceptance):
            raise ValueError(f"acceptance rates must lie strictly between 0 and 1, got {list(acceptance)}")
        rows = [[a * (1 - a) ** r for r in range(top_k)] for a in acceptance]
    else:
        rows = []
        for row in acceptance:
            if (isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row
                    or not all(isinstance(q, (int, float)) and 0 <= q <= 1 for q in row) or sum(row) > 1 + 1e-6):
                raise ValueError(f"a measured acceptance row must list per-rank rates in [0, 1] summing to at most "
                                 f"1, got {row!r}")
            padded = [float(q) for q in row[:top_k]] + [0.0] * (top_k - len(row))
            rows.append([min(padded[:r + 1]) for r in range(top_k)])  # non-increasing in rank
    return [rows[min(d, len(rows) - 1)] for d in range(depth)]


def best_nodes(total_tokens: int, depth: int, top_k: int, acceptance: Acceptance) -> list[tuple[float, Path]]:
    """The `total_tokens` most likely (probability, path) nodes under the acceptance model, best first."""
    if total_tokens < 1 or depth < 1 or top_k < 1:
        raise ValueError("need total_tokens, depth and top_k >= 1")
    q = rank_table(acceptance, depth, top_k)
    heap = [(-q[0][0], (0,), 1.0)]  # (-probability, path, the parent's probability)
    out: list[tuple[float, Path]] = []
    while heap and len(out) < total_tokens:
        neg, path, parent = heapq.heappop(heap)
        out.append((-neg, path))
        level = len(path) - 1
        if path[-1] + 1 < top_k:  # next sibling
            heapq.heappush(heap, (-parent * q[level][path[-1] + 1], path[:-1] + (path[-1] + 1,), parent))
        if len(path) < depth:  # best child
            heapq.heappush(heap, (neg * q[level + 1][0], path + (0,), -neg))
    return out


def static_tree(total_tokens: int, depth: int, top_k: int, acceptance: Acceptance) -> list[Path]:
    """The best static tree of `total_tokens` nodes (sorted parents first) for the given per-depth acceptance."""
    return sort_paths([p for _, p in best_nodes(total_tokens, depth, top_k, acceptance)])


def expected_accepted(total_tokens: int, depth: int, top_k: int, acceptance: Acceptance) -> float:
    """Expected accepted draft tokens per step (tau - 1) of the best tree of that size, under the model."""
    return sum(v for v, _ in best_nodes(total_tokens, depth, top_k, acceptance))


def sort_paths(paths: Sequence[Sequence[int]]) -> list[Path]:
    """Paths sorted parents first; raises if a path's prefix is missing or a rank is negative."""
    out = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    have = set(out)
    for p in out:
        if not p or min(p) < 0:
            raise ValueError(f"tree paths must be non-empty tuples of ranks >= 0, got {p}")
        if len(p) > 1 and p[:-1] not in have:
            raise ValueError(f"tree path {p} has no parent {p[:-1]} in the tree")
    return out


@dataclass
class Candidates:
    """Nodes proposed so far: target token, parent index (-1 = root), cumulative draft log-prob, depth."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)

    def add(self, parent: int, token: int, logp: float) -> int:
        base = 0.0 if parent < 0 else self.scores[parent]
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.scores.append(base + float(logp))
        self.depth.append(1 if parent < 0 else self.depth[parent] + 1)
        return len(self.tokens) - 1

    def tree(self, keep: Sequence[int] | None = None, device: torch.device | str = "cpu") -> DraftTree:
        """A DraftTree of the kept nodes (all by default); parents must be kept with their children."""
        keep = sorted(range(len(self.tokens)) if keep is None else keep)
        new = {old: i for i, old in enumerate(keep)}
        parents = [-1 if self.parents[i] < 0 else new[self.parents[i]] for i in keep]
        return DraftTree(torch.tensor([self.tokens[i] for i in keep], dtype=torch.long, device=device),
                         torch.tensor(parents, dtype=torch.long, device=device))


def grow_static(paths: Sequence[Path], expand: Expand) -> Candidates:
    """Fill a static tree level by level: node (.., r) is the rank-r child its parent's expansion returned."""
    paths = sort_paths(paths)
    cands, index = Candidates(), {(): -1}
    for level in range(1, max(len(p) for p in paths) + 1):
        here = [p for p in paths if len(p) == level]
        parents = list(dict.fromkeys(p[:-1] for p in here))
        nodes = [index[p] for p in parents]
        tokens, logp = expand(cands, nodes, max(p[-1] for p in here) + 1)
        row = {p: i for i, p in enumerate(parents)}
        for p in here:
            r, j = row[p[:-1]], p[-1]
            index[p] = cands.add(index[p[:-1]], int(tokens[r, j]), float(logp[r, j]))
    return cands


def grow_dynamic(expand: Expand, depth: int, top_k: int, total_tokens: int) -> tuple[Candidates, list[int]]:
    """EAGLE-2: expand the top_k nodes of each level by cumulative log-prob, then keep the total_tokens best.

    Returns all candidates and the kept indices. A child's score is at most its parent's and parents are created
    first, so ranking by (score desc, index asc) keeps every kept node's ancestors.
    """
    if depth < 1 or top_k < 1 or total_tokens < 1:
        raise ValueError(f"need depth, top_k and total_tokens >= 1 (got {depth}, {top_k}, {total_tokens})")
    cands = Candidates()
    frontier = [-1]
    for _ in range(min(depth, total_tokens)):  # a kept tree of n nodes is at most n deep: skip useless levels
        tokens, logp = expand(cands, frontier, top_k)
        new = [cands.add(node, int(tokens[r, j]), float(logp[r, j]))
               for r, node in enumerate(frontier) for j in range(tokens.shape[1])]
        frontier = sorted(new, key=lambda i: (-cands.scores[i], i))[:top_k]
    keep = sorted(range(len(cands.tokens)), key=lambda i: (-cands.scores[i], i))[:total_tokens]
    return cands, sorted(keep)


TREES = ("chain", "static", "dynamic")


def tree_paths(tree: str | Sequence[Path], depth: int, top_k: int, total_tokens: int,
               acceptance: Acceptance) -> list[Path] | None:
    """The paths for a drafter's --tree: fixed paths for chain/static/an explicit list, None for dynamic."""
    if not isinstance(tree, str):
        return list(tree)
    if tree not in TREES:
        raise ValueError(f"Unknown tree {tree!r}; choose one of {TREES} or give a list of paths.")
    if tree == "dynamic":
        return None
    return chain(depth) if tree == "chain" else static_tree(total_tokens, depth, top_k, acceptance)


def grow(paths: list[Path] | None, expand: Expand, depth: int, top_k: int, total_tokens: int) -> DraftTree:
    """The draft tree: along fixed `paths`, or EAGLE-2 dynamic growth when paths is None."""
    if paths is not None:
        return grow_static(paths, expand).tree()
    cands, keep = grow_dynamic(expand, depth, top_k, total_tokens)
    return cands.tree(keep)
