import pytest
import torch

from koala.acceptance import Sampling
from koala.decode import generate
from koala.drafters.base import Drafter
from koala.drafters.trees import (Candidates, best_nodes, chain, expected_accepted, grow_dynamic, grow_static,
                                  sort_paths, static_tree)


def test_chain_and_static_shapes():
    assert chain(3) == [(0,), (0, 0), (0, 0, 0)]
    tree = static_tree(10, 3, 3, [0.6, 0.5])
    assert len(tree) == 10 and tree == sort_paths(tree)
    assert (0,) in tree and (0, 0) in tree and max(map(len, tree)) <= 3 and max(max(p) for p in tree) < 3
    values = [v for v, _ in best_nodes(10, 3, 3, [0.6, 0.5])]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no parent"):
        sort_paths([(0,), (1, 0)])


def test_expected_accepted_grows_with_size_and_acceptance():
    small, big = expected_accepted(4, 5, 4, [0.6]), expected_accepted(32, 5, 4, [0.6])
    assert 0.6 < small < big < 5
    assert expected_accepted(5, 5, 1, [0.5]) == pytest.approx(0.5 + 0.25 + 0.125 + 0.0625 + 0.03125)
    assert expected_accepted(8, 4, 4, [0.9]) > expected_accepted(8, 4, 4, [0.5])


def _fixed_expand(cands, nodes, k):
    """Children ranked 0..k-1; token = 10 * depth + rank, log-prob = -rank - depth."""
    level = 0 if nodes[0] < 0 else cands.depth[nodes[0]]
    tokens = torch.tensor([[10 * (level + 1) + r for r in range(k)]] * len(nodes))
    return tokens, -(torch.arange(k, dtype=torch.float) + level).expand(len(nodes), k)


def test_grow_static_follows_the_paths():
    cands = grow_static([(0,), (1,), (0, 0), (0, 2), (1, 0)], _fixed_expand)
    tree = cands.tree()
    assert tree.tokens.tolist() == [10, 11, 20, 22, 20]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1]


def test_grow_dynamic_keeps_best_nodes_and_their_ancestors():
    cands, keep = grow_dynamic(_fixed_expand, depth=3, top_k=2, total_tokens=5)
    assert len(cands.tokens) == 2 + 4 + 4 and len(keep) == 5
    kept = set(keep)
    assert all(cands.parents[i] in kept or cands.parents[i] < 0 for i in keep)
    assert sorted((cands.scores[i] for i in keep), reverse=True) == sorted(cands.scores, reverse=True)[:5]
    tree = cands.tree(keep)  # scores 0, -1 (depth 1); -1, -2, -2 (depth 2); depth-3 nodes score <= -3
    assert tree.tokens.tolist() == [10, 11, 20, 21, 20] and tree.parents.tolist() == [-1, -1, 0, 0, 1]

    def sharp(cands, nodes, k):  # the top child is certain: the best chain goes to full depth
        tokens, _ = _fixed_expand(cands, nodes, k)
        return tokens, -10 * torch.arange(k, dtype=torch.float).expand(len(nodes), k)

    cands, keep = grow_dynamic(sharp, depth=3, top_k=2, total_tokens=4)
    assert max(cands.tree(keep).depth) == 3


def test_grow_dynamic_skips_levels_deeper_than_the_kept_tree():
    calls = []

    def counting(cands, nodes, k):
        calls.append(len(nodes))
        return _fixed_expand(cands, nodes, k)

    cands, keep = grow_dynamic(counting, depth=5, top_k=2, total_tokens=2)
    assert len(calls) == 2 and len(keep) == 2  # two kept nodes are at most two levels deep


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation (as the best-ranked child everywhere)."""

    name = "oracle"

    def __init__(self, target, tree, depth):
        self.target, self.tree, self.depth = target, tree, depth

    def propose(self, ids):
        def expand(cands: Candidates, nodes, k):
            rows = []
            for node in nodes:
                path = [] if node < 0 else [cands.tokens[i] for i in _path(cands, node)]
                seq = torch.tensor([ids + path])
                rows.append(self.target.model(seq).logits[0, -1].topk(k).indices)
            # sharp made-up scores: the greedy child is far ahead, so the dynamic tree always keeps it
            return torch.stack(rows), -torch.arange(k, dtype=torch.float).expand(len(nodes), k) * 5

        with torch.inference_mode():
            if self.tree == "dynamic":
                cands, keep = grow_dynamic(expand, self.depth, 3, 2 * self.depth)
                return cands.tree(keep)
            paths = chain(self.depth) if self.tree == "chain" else static_tree(8, self.depth, 3, [0.6])
            return grow_static(paths, expand).tree()


def _path(cands, node):
    out = []
    while node >= 0:
        out.append(node)
        node = cands.parents[node]
    return out[::-1]


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_oracle_drafter_reaches_tau_depth_plus_one(llama_target, tree):
    depth = 3
    prompt = list(range(10, 22))
    vanilla = generate(llama_target, prompt, max_new_tokens=25)
    out = generate(llama_target, prompt, OracleDrafter(llama_target, tree, depth), max_new_tokens=25)
    assert out.tokens == vanilla.tokens
    # the prompt forward gives 1 token, every later forward depth + 1 (only the last may be cut by EOS/budget)
    n = len(out.tokens)
    assert n > 2 * (depth + 1)
    assert out.stats.accepted_lengths[1:] == [depth] * (len(out.stats.accepted_lengths) - 1)
    assert out.stats.target_forwards == 1 + -(-(n - 1) // (depth + 1))


def test_oracle_under_sampling_stays_valid(llama_target):
    out = generate(llama_target, list(range(10, 22)), OracleDrafter(llama_target, "static", 2),
                   Sampling(temperature=0.8), max_new_tokens=12, seed=0)
    assert 1 <= len(out.tokens) <= 12
