"""Acceptance rules. The sampling tests are statistical: chi-square of the generated tokens' joint distribution
against the exact target distribution, with enough draws that known-wrong rules fail them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny_target
from koala.acceptance import (Sampling, accept_greedy, accept_sampling, accept_typical, probs_from_logits)
from koala.decode import generate
from koala.drafters import Drafter
from koala.tree import DraftTree

V = 5


def chi2_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value, pooling cells whose expected count is below 5."""
    counts, expected = counts.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    exp = exp[keep] * obs.sum() / exp[keep].sum()
    exp[-1] += obs.sum() - exp.sum()  # remove float rounding so both totals agree exactly
    return float(chisquare(obs[keep], exp).pvalue)


def sample_without_replacement(q: torch.Tensor, k: int, rng: np.random.Generator) -> tuple[list[int], list[np.ndarray]]:
    """k distinct tokens drawn one by one from q, with the (renormalised) distribution each was drawn from.

    In numpy (inverse CDF): torch's per-call overhead on 5-entry vectors was most of these tests' time."""
    tokens, dists, q = [], [], q.numpy().copy()
    for _ in range(k):
        dists.append(q.copy())
        cdf = q.cumsum(dtype=np.float64)
        x = min(int(cdf.searchsorted(rng.random() * cdf[-1], side="right")), len(q) - 1)
        tokens.append(x)
        q[x] = 0
        q /= q.sum()
    return tokens, dists


class World:
    """A random 2-step target (p0, cond[x]) and a different 2-step draft model."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        dirichlet = lambda *s: torch.distributions.Dirichlet(torch.ones(V)).sample(s)  # noqa: E731
        torch.manual_seed(seed)
        self.p0, self.cond = dirichlet(), dirichlet(V)
        self.q0, self.qcond = dirichlet(), dirichlet(V)
        self.gen = g
        self.rng = np.random.default_rng(seed)  # draws the trees; `gen` is what the rule under test consumes

    def sampled_tree(self) -> DraftTree:
        """Two children of the root drawn from q0 without replacement, two grandchildren under each."""
        tokens, parents, qs = [], [], []
        first, d0 = sample_without_replacement(self.q0, 2, self.rng)
        for x, dx in zip(first, d0):
            tokens.append(x), parents.append(-1), qs.append(dx)
            me = len(tokens) - 1
            second, d1 = sample_without_replacement(self.qcond[x], 2, self.rng)
            for y, dy in zip(second, d1):
                tokens.append(y), parents.append(me), qs.append(dy)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), q=torch.from_numpy(np.stack(qs)))

    def deterministic_tree(self) -> DraftTree:
        """Top-2 of q0, and under the first one top-2 of its draft conditional plus a duplicate token."""
        a, b = self.q0.topk(2).indices.tolist()
        c, d = self.qcond[a].topk(2).indices.tolist()
        return DraftTree(torch.tensor([a, c, d, c, b]), torch.tensor([-1, 0, 0, 0, -1]))

    def target_rows(self, tree: DraftTree) -> torch.Tensor:
        return torch.stack([self.p0] + [self.cond[t] for t in tree.tokens.tolist()])

    def two_tokens(self, tree: DraftTree, rule) -> tuple[int, int]:
        """First two output tokens; if nothing was accepted the next step samples the second from the target."""
        acc = rule(tree, self.target_rows(tree), self.gen)
        out = tree.tokens[acc.path].tolist() + [acc.next_token]
        if len(out) == 1:
            out.append(int(torch.multinomial(self.cond[out[0]], 1, generator=self.gen)))
        return out[0], out[1]

    def pvalue(self, make_tree, rule, n: int) -> float:
        counts = np.zeros((V, V))
        for _ in range(n):
            counts[self.two_tokens(make_tree(), rule)] += 1
        expected = (self.p0[:, None] * self.cond).numpy() * n
        return chi2_pvalue(counts, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_sampling_preserves_the_target_distribution(seed):
    world = World(seed)
    assert world.pvalue(world.sampled_tree, accept_sampling, 12000) > 1e-3
    assert world.pvalue(world.deterministic_tree, accept_sampling, 12000) > 1e-3


def test_wrong_rules_are_caught():
    """The same test has the power to reject rules that are not lossless."""
    world = World(0)

    def stale_q(tree, probs, gen):  # forgets that later siblings were drawn without replacement
        rows = [world.q0 if p < 0 else world.qcond[int(tree.tokens[p])] for p in tree.parents.tolist()]
        return accept_sampling(DraftTree(tree.tokens, tree.parents, q=torch.stack(rows)), probs, gen)

    def typical(tree, probs, gen):  # Medusa's typical acceptance, which is lossy by design
        return accept_typical(tree, probs, posterior_threshold=0.05, posterior_alpha=0.1, generator=gen)

    # the rules above pass at p > 1e-3; these must land far below it (stale q is a small bias in this world: 7.6e-7)
    assert world.pvalue(world.sampled_tree, stale_q, 12000) < 1e-5
    assert world.pvalue(world.deterministic_tree, typical, 12000) < 1e-5


class RandomTreeDrafter(Drafter):
    """Proposes sampled 2-level trees from a fixed random draft distribution (not the target's)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.q = torch.distributions.Dirichlet(torch.ones(vocab)).sample((vocab,))
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)  # a drafter that samples owns its randomness

    def propose(self, ids):
        tokens, parents, qs = [], [], []
        first, d0 = sample_without_replacement(self.q[ids[-1]], 2, self.rng)
        for x, dx in zip(first, d0):
            tokens.append(x), parents.append(-1), qs.append(dx)
            me = len(tokens) - 1
            (y,), (dy,) = sample_without_replacement(self.q[x], 1, self.rng)
            tokens.append(y), parents.append(me), qs.append(dy)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), q=torch.from_numpy(np.stack(qs)))


def test_decode_loop_sampling_is_lossless():
    """End to end: the joint law of the first three generated tokens matches the target's (tokens 2 and 3 come
    out of tree acceptance)."""
    vocab = 6
    target = tiny_target("llama", vocab=vocab, initializer_range=0.05)
    target.eos_ids = set()
    prompt = [2, 3]
    grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    with torch.no_grad():
        p1 = target.model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = target.model(torch.tensor([prompt + [x] for x in range(vocab)])).logits[:, -1].softmax(-1)
        ctx = torch.cat([torch.tensor(prompt).expand(len(grid), 2), grid], 1)
        p3 = target.model(ctx).logits[:, -1].softmax(-1).reshape(vocab, vocab, vocab)
    expected = (p1[:, None, None] * p2[:, :, None] * p3).numpy()
    counts = np.zeros((vocab,) * 3)
    drafter = RandomTreeDrafter(vocab)
    n = 1500
    for seed in range(n):
        res = generate(target, prompt, drafter, Sampling(temperature=1.0), max_new_tokens=3, seed=seed)
        counts[tuple(res.tokens)] += 1
    assert chi2_pvalue(counts, expected * n) > 1e-3


def test_greedy_acceptance_follows_argmax():
    tree = DraftTree(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, -1, 1, 1]))
    logits = torch.full((5, 6), -5.0)
    for row, best in enumerate([2, 0, 4, 5, 1]):
        logits[row, best] = 5.0
    acc = accept_greedy(tree, logits)
    assert acc.path == [1, 3] and acc.next_token == 1  # root->2 (node 1), node1->4 (node 3), node3 -> 1
    acc = accept_greedy(DraftTree.empty(), logits)
    assert acc.path == [] and acc.next_token == 2


def test_probs_from_logits_top_k_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = probs_from_logits(logits, Sampling(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)[0]
    p = probs_from_logits(logits, Sampling(temperature=1.0, top_p=0.8))
    kept = int((full.cumsum(0) - full < 0.8).sum())  # smallest prefix reaching 0.8
    assert (p[0, :kept] > 0).all() and (p[0, kept:] == 0).all()
    p = probs_from_logits(logits, Sampling(temperature=0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1))
    with pytest.raises(ValueError):
        Sampling(temperature=-1)
