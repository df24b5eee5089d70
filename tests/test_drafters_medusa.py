import pytest
import torch

from conftest import tiny_target
from koala.acceptance import Sampling
from koala.decode import generate
from koala.drafters.medusa import MedusaDrafter
from koala.heads import HeadConfig
from koala.heads.checkpoint import build_head

PROMPT = list(range(5, 25))  # no EOS within 30 greedy tokens on the tiny targets


def random_head(target, kind, layers, draft_vocab=None, scale=0.1, num_heads=3):
    torch.manual_seed(layers)
    head = build_head(HeadConfig.for_target(target, kind, layers, num_heads=num_heads, draft_vocab=draft_vocab),
                      target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn_like(p))
    return head.eval()


@pytest.mark.parametrize("arch,layers,tree,reduced", [
    ("llama", 1, "static", False), ("llama", 2, "chain", True), ("qwen2", 3, "dynamic", True),
    ("mistral", 2, "static", True)])
def test_random_medusa_head_is_lossless_under_greedy(arch, layers, tree, reduced):
    target = tiny_target(arch)
    vanilla = generate(target, PROMPT, max_new_tokens=20)
    head = random_head(target, "medusa", layers, list(range(1, 70)) if reduced else None)
    out = generate(target, PROMPT, MedusaDrafter(head, tree=tree, total_tokens=10), max_new_tokens=20)
    assert out.tokens == vanilla.tokens
    assert out.stats.drafted_tokens > 0


def test_medusa_tree_is_rooted_at_the_pending_token(llama_target):
    head = random_head(llama_target, "medusa", 1, scale=0.0)  # fresh heads = the base LM head
    drafter = MedusaDrafter(head, tree="chain", depth=2)
    drafter.reset(PROMPT)
    with torch.inference_mode():
        hidden = llama_target.hidden(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], None)[0]
    drafter.observe(hidden, PROMPT[1:] + [5])
    tree = drafter.propose(PROMPT + [5])
    # every fresh head predicts the base model's next token from the same hidden state
    best = int(llama_target.logits(hidden[-1]).argmax())
    assert tree.tokens.tolist() == [best, best] and tree.parents.tolist() == [-1, 0]


def test_medusa_sampling_runs(llama_target):
    head = random_head(llama_target, "medusa", 2, list(range(2, 90)))
    out = generate(llama_target, PROMPT, MedusaDrafter(head), Sampling(temperature=0.9, top_p=0.9),
                   max_new_tokens=15, seed=1)
    assert 1 <= len(out.tokens) <= 15


def test_bad_medusa_trees_are_rejected(llama_target):
    head = random_head(llama_target, "medusa", 1)
    with pytest.raises(ValueError, match="Unknown tree"):
        MedusaDrafter(head, tree="bushy")
    with pytest.raises(ValueError, match="deeper than"):
        MedusaDrafter(head, tree=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)])
