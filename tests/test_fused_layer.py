"""Decoder layers in three C calls: the bits of their own forward, checked per layer at load."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from koala import cpu_kernels
from koala.decode import generate
from koala.drafters import PromptLookupDrafter
from koala.fused_layer import _same_bits, fused_forward, use_fused_layers
from koala.kvcache import ReservedCache
from koala.target import Target

from conftest import tiny_target, tiny_tokenizer

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no C kernels here: {cpu_kernels.why()}")


def _fused(layer) -> bool:
    return getattr(layer.forward, "__func__", None) is None  # an instance attribute, not the class's method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_every_layer_is_fused_and_a_tree_verify_has_the_own_forwards_bits(arch, dtype):
    target = tiny_target(arch)
    target = Target(target.model.to(dtype), target.tokenizer, target.name)
    assert all(_fused(layer) for layer in target.body.layers)
    torch.manual_seed(0)
    prompt, block = torch.randint(2, 100, (2, 9)), torch.randint(2, 100, (2, 6))
    allowed = torch.ones(2, 1, 6, 15, dtype=torch.bool)
    allowed[:, :, :, 9:] = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0],
                                         [1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    depth = torch.tensor([0, 1, 1, 2, 2, 3])
    outs = []
    for fused in (True, False):
        if not fused:
            for layer in target.body.layers:
                layer.forward = type(layer).forward.__get__(layer)
        cache = target.new_cache()
        first = target.hidden(prompt, torch.arange(9).expand(2, 9), cache)
        outs.append((first, target.hidden(block, (9 + depth).expand(2, 6), cache, mask)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_greedy_speculation_stays_lossless_on_fused_layers():
    target = tiny_target("llama")
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    plain = generate(target, prompt, max_new_tokens=24)
    assert generate(target, prompt, PromptLookupDrafter(), max_new_tokens=24).tokens == plain.tokens


def test_the_probe_rejects_a_forward_one_rounding_step_off():
    layer = tiny_target("llama").body.layers[0]
    forward = fused_forward(layer)
    assert _same_bits(layer, forward)

    def off(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.view(-1)[3] = torch.nextafter(out.view(-1)[3], torch.tensor(float("inf")))
        return out
    assert not _same_bits(layer, off)


def test_a_layer_of_another_shape_keeps_its_own_forward():
    """Qwen3 normalises q and k per head: its layers do not fit the fused forward, which the probe sees."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    target = Target(model, tiny_tokenizer(), "tiny-qwen3")
    assert not any(_fused(layer) for layer in target.body.layers)
    assert use_fused_layers(target.model) == 0
    out = target.hidden(torch.tensor([[3, 4, 5]]), torch.arange(3)[None], ReservedCache())
    assert out.shape == (1, 3, 64)


def test_a_copy_in_another_dtype_computes_with_its_own_weights(monkeypatch):
    """A copy whose layers are not fused (here: the probe says no) must not keep the original's fused forwards,
    which read the original's weights."""
    target = tiny_target("llama")
    assert all(_fused(layer) for layer in target.body.layers)
    monkeypatch.setattr("koala.fused_layer._same_bits", lambda layer, forward: False)
    copy = target.with_dtype("bf16")
    fresh = Target(tiny_target("llama").model.to(torch.bfloat16), target.tokenizer, "fresh")
    assert not any(_fused(layer) for layer in copy.body.layers)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(copy.hidden(ids, torch.arange(4)[None], copy.new_cache()),
                       fresh.hidden(ids, torch.arange(4)[None], fresh.new_cache()))
