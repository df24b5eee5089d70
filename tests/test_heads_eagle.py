import json

import pytest
import torch
from transformers import DynamicCache

from koala.heads import EagleHead, HeadConfig
from koala.heads.checkpoint import build_head


def _head(target, layers=2, **kw):
    model = target.model
    return EagleHead(HeadConfig.for_target(target, "eagle", layers, **kw),
                     model.get_input_embeddings().weight, model.get_output_embeddings().weight)


def test_layers_come_from_the_target_family_and_are_distinct(any_target):
    head = _head(any_target, layers=3)
    assert type(head.layers[0]) is type(any_target.body.layers[0])
    assert type(head.rotary) is type(any_target.body.rotary_emb)
    params = [p for layer in head.layers for p in layer.parameters()]
    assert len({id(p) for p in params}) == len(params)
    assert not torch.equal(head.layers[0].self_attn.q_proj.weight, head.layers[1].self_attn.q_proj.weight)
    json.dumps(head.cfg.to_dict())  # the config (with the target config inside) is JSON-serialisable


def test_layers_after_the_first_start_as_identity(llama_target):
    head = _head(llama_target, layers=3)
    x = torch.randn(1, 4, 64)
    pos = torch.arange(4)[None]
    rope = head.rotary(x, pos)
    for layer in head.layers[1:]:
        torch.testing.assert_close(layer(x, position_ids=pos, position_embeddings=rope), x)
    assert head.layers[0].self_attn.o_proj.weight.abs().sum() > 0


def test_shapes_causality_and_cache_match_a_full_forward(any_target):
    head = _head(any_target, layers=2, draft_vocab=list(range(10, 60)))
    feats, ids, pos = torch.randn(1, 7, 64), torch.randint(0, 128, (1, 7)), torch.arange(7)[None]
    out = head(feats, ids, pos)
    assert out.shape == (1, 7, 64) and head.logits(out).shape == (1, 7, 50)
    changed = feats.clone()
    changed[0, 5:] += 1.0
    torch.testing.assert_close(head(changed, ids, pos)[:, :5], out[:, :5])  # no peeking at later positions
    cache = DynamicCache()
    first = head(feats[:, :4], ids[:, :4], pos[:, :4], cache)
    rest = head(feats[:, 4:], ids[:, 4:], pos[:, 4:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), out, atol=1e-4, rtol=1e-4)


def test_only_trainable_weights_are_in_the_state_dict(llama_target):
    head = _head(llama_target, layers=2)
    assert set(head.state_dict()) == {n for n, _ in head.named_parameters()}
    assert not any(k.startswith(("embed", "lm_head", "rotary")) for k in head.state_dict())


def test_eagle_config_needs_the_target_config(llama_target):
    cfg = HeadConfig.for_target(llama_target, "eagle", 1).to_dict()
    cfg["target_config"] = None
    with pytest.raises(ValueError, match="target's config"):
        build_head(HeadConfig.from_dict(cfg), llama_target)


def test_layers_can_start_as_the_targets_last_layers(any_target):
    head = _head(any_target, layers=2)
    head.copy_target_layers(any_target.body)
    for mine, theirs in zip(head.layers, any_target.body.layers[-2:]):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
    x, pos = torch.randn(1, 4, 64), torch.arange(4)[None]
    rope = head.rotary(x, pos)  # and they compute what the target's layer computes
    torch.testing.assert_close(head.layers[1](x, position_ids=pos, position_embeddings=rope),
                               any_target.body.layers[-1](x, position_ids=pos, position_embeddings=rope))
    with pytest.raises(ValueError, match="only"):
        _head(any_target, layers=len(any_target.body.layers) + 1).copy_target_layers(any_target.body)
