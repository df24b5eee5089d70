import pytest
import torch

from conftest import tiny_target
from koala.heads import HeadConfig, MedusaHead


def _head(target, layers=2, **kw):
    return MedusaHead(HeadConfig.for_target(target, "medusa", layers, **kw), target.lm_head.weight)


def test_shapes_and_fresh_head_is_the_base_lm_head(llama_target):
    head = _head(llama_target, layers=1, num_heads=3)
    hidden = torch.randn(2, 5, 64)
    assert head.features(hidden).shape == (2, 5, 3, 64)
    logits = head(hidden)
    assert logits.shape == (2, 5, 3, 128)
    base = llama_target.lm_head(hidden)
    for i in range(3):  # zero-initialised residual blocks: every fresh head starts as the base LM head
        torch.testing.assert_close(logits[:, :, i], base)


def test_k_layers_are_distinct_trainable_parameters(llama_target):
    head = _head(llama_target, layers=3, num_heads=2)
    linears = [m.linear for h in head.heads for m in h]
    assert len(linears) == 6
    assert len({id(p) for m in linears for p in m.parameters()}) == 12  # no block is shared
    names = {n for n, _ in head.named_parameters()}
    assert not any("lm_head" in n for n in names)  # the target LM head is frozen and not a parameter
    assert set(head.state_dict()) == names  # so it is not saved either


def test_every_block_gets_gradient_at_the_zero_init(llama_target):
    head = _head(llama_target, layers=2, num_heads=1)
    head(torch.randn(1, 4, 64)).logsumexp(-1).sum().backward()
    # SiLU'(0) = 1/2, so a zero-initialised block still passes gradient to its weights: deep heads can train
    assert all(block.linear.weight.grad.abs().sum() > 0 for block in head.heads[0])


def test_reduced_vocab_keeps_those_lm_head_rows(llama_target):
    vocab = [9, 4, 100, 1]
    head = _head(llama_target, layers=1, draft_vocab=vocab)
    hidden = torch.randn(1, 3, 64)
    logits = head(hidden)
    assert logits.shape == (1, 3, 4, 4)
    torch.testing.assert_close(logits[:, :, 0], llama_target.lm_head(hidden)[..., vocab])
    assert head.lm_head.to_target(torch.tensor([2, 0])).tolist() == [100, 9]


def test_own_lm_head_is_trainable_and_wrong_config_is_rejected(llama_target):
    head = _head(llama_target, layers=1, own_lm_head=True, draft_vocab=[3, 5])
    assert head.lm_head.weight.requires_grad and head.lm_head.weight.shape == (2, 64)
    with pytest.raises(ValueError, match="kind 'medusa'"):
        MedusaHead(HeadConfig.for_target(llama_target, "eagle", 1), llama_target.lm_head.weight)
    with pytest.raises(ValueError, match="draft_vocab"):
        HeadConfig.for_target(llama_target, "medusa", 1, draft_vocab=[1, 1])
    with pytest.raises(ValueError, match="LM head"):
        MedusaHead(HeadConfig.for_target(tiny_target("llama", vocab=64), "medusa", 1), llama_target.lm_head.weight)
