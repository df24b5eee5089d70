import pytest
import torch

from conftest import tiny_target
from koala.acceptance import Sampling
from koala.decode import generate
from koala.drafters.eagle import EagleDrafter
from test_drafters_medusa import PROMPT, random_head


@pytest.mark.parametrize("arch,layers,tree,reduced", [
    ("llama", 1, "dynamic", False), ("llama", 2, "static", True), ("qwen2", 2, "chain", False),
    ("mistral", 3, "dynamic", True)])
def test_random_eagle_head_is_lossless_under_greedy(arch, layers, tree, reduced):
    target = tiny_target(arch)
    vanilla = generate(target, PROMPT, max_new_tokens=20)
    head = random_head(target, "eagle", layers, list(range(1, 70)) if reduced else None)
    drafter = EagleDrafter(head, tree=tree, depth=3, top_k=3, total_tokens=8)
    out = generate(target, PROMPT, drafter, max_new_tokens=20)
    assert out.tokens == vanilla.tokens
    assert out.stats.drafted_tokens > 0
    assert drafter.cache.get_seq_length() == drafter.committed  # drafting never leaves tree entries behind


class Recording(EagleDrafter):
    """Keeps every node's predicted feature so the test can recompute it without cache or tree mask."""

    def _expand(self, cands, nodes, k):
        out = super()._expand(cands, nodes, k)
        self.seen = getattr(self, "seen", {})
        self.seen.update({i: self._feature[i].clone() for i in nodes if i >= 0})
        self.cands = cands
        return out


def test_tree_drafting_matches_a_plain_forward_along_each_path(llama_target):
    head = random_head(llama_target, "eagle", 2)
    drafter = Recording(head, tree="dynamic", depth=3, top_k=2, total_tokens=6)
    drafter.reset(PROMPT)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        hidden = llama_target.hidden(ids, torch.arange(len(PROMPT))[None], None)[0]
        drafter.observe(hidden, PROMPT[1:] + [7])
        drafter.propose(PROMPT + [7])
        cands = drafter.cands
        assert len(drafter.seen) == 2 + 2  # depth-1 and depth-2 frontiers were run through the head
        for node, feature in drafter.seen.items():
            path = []
            while node >= 0:
                path.insert(0, node)
                node = cands.parents[node]
            feats, toks = [hidden], [torch.tensor(PROMPT[1:] + [7])]
            parent = drafter.root
            for i in path:  # each node's input is its parent's predicted feature and its own token
                feats.append(parent[None])
                toks.append(torch.tensor([cands.tokens[i]]))
                parent = drafter.seen[i]
            f, t = torch.cat(feats)[None], torch.cat(toks)[None]
            full = head(f, t, torch.arange(f.shape[1])[None])[0, -1]
            torch.testing.assert_close(full, feature, atol=1e-4, rtol=1e-4)


def test_eagle_sampling_runs(llama_target):
    head = random_head(llama_target, "eagle", 2, list(range(2, 90)))
    out = generate(llama_target, PROMPT, EagleDrafter(head, depth=3), Sampling(temperature=0.7), max_new_tokens=15,
                   seed=3)
    assert 1 <= len(out.tokens) <= 15
