"""A decode step's decoder stack in one C call: the model's own bits (outputs, layer inputs, KV cache), checked at
load, and lossless decoding on it."""
import copy

import pytest
import torch

from koala import cpu_kernels
from koala.decode import Decoder, Request, generate, generate_batch
from koala.drafters import PromptLookupDrafter
from koala.fused_body import activation_table, fused_body
from koala.target import Target

from conftest import tiny_target

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no C kernels here: {cpu_kernels.why()}")


def _target(arch: str, dtype: torch.dtype) -> Target:
    t = tiny_target(arch)
    return Target(t.model.to(dtype), t.tokenizer, t.name)


def _unfused(target: Target) -> Target:
    twin = copy.copy(target)  # the same model, without the fused stack
    twin.fused = None
    return twin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_plain_tree_and_batched_steps_have_the_models_own_bits(arch, dtype):
    target = _target(arch, dtype)
    assert target.fused is not None
    own = _unfused(target)
    torch.manual_seed(1)
    caches = target.new_cache(), own.new_cache()
    prompt = torch.randint(2, 100, (2, 7))
    for t, cache in zip((target, own), caches):
        t.hidden(prompt, torch.arange(7).expand(2, 7), cache)
    allowed = torch.zeros(2, 1, 4, 11, dtype=torch.bool)
    allowed[:, :, :, :7] = True
    allowed[1, :, :, 5:7] = False  # row 0 sees its whole history, row 1 only its first 5 columns
    allowed[:, :, :, 7:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    steps = [(torch.randint(2, 100, (2, 1)), None, ()),
             (torch.randint(2, 100, (2, 3)), None, (1,)),
             (torch.randint(2, 100, (2, 4)), "tree", (0, 1))]
    for ids, mask, layers in steps:
        past = caches[0].layers[0].keys.shape[-2]
        pos = torch.arange(past, past + ids.shape[1]).expand(2, -1)
        if mask == "tree":
            full = torch.ones(2, 1, 4, past + 4, dtype=torch.bool)
            full[:, :, :, past - 7:] = allowed
            mask = torch.zeros(full.shape, dtype=dtype).masked_fill_(~full, torch.finfo(dtype).min)
        got = target.fused(ids, pos, caches[0], mask, layers)  # None would mean: not applied
        want = own.features(ids, pos, caches[1], mask, layers)
        assert got is not None
        assert torch.equal(got[0], want[0])
        assert (got[1] is None and want[1] is None) or torch.equal(got[1], want[1])
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_greedy_decoding_alone_in_a_batch_and_speculative_is_the_same_on_the_fused_stack():
    target = _target("llama", torch.bfloat16)
    own = _unfused(target)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11], [20, 21, 22, 23, 24, 25]]
    plain = [generate(own, p, max_new_tokens=24).tokens for p in prompts]
    assert [generate(target, p, max_new_tokens=24).tokens for p in prompts] == plain
    assert [generate(target, p, PromptLookupDrafter(), max_new_tokens=24).tokens for p in prompts] == plain
    batch = generate_batch(target, prompts, PromptLookupDrafter, max_new_tokens=24, batch_size=2)
    assert [r.tokens for r in batch] == plain


def test_the_probe_rejects_an_activation_one_bit_off(monkeypatch):
    target = _target("llama", torch.bfloat16)
    assert fused_body(target.body) is not None

    def off(act, dtype):
        table = real(act, dtype).clone()
        table[table != 0] += 1  # one ulp off wherever the output is not zero
        return table
    real = activation_table
    monkeypatch.setattr("koala.fused_body.activation_table", off)
    assert fused_body(target.body) is None


def test_where_it_does_not_apply_the_models_own_forward_runs(monkeypatch):
    assert _target("llama", torch.float32).fused is None  # no 16-bit activation table for fp32
    target = _target("llama", torch.bfloat16)
    ids = torch.tensor([[3, 4, 5]])
    assert target.fused(ids, torch.arange(3)[None], target.new_cache(), None) is None  # a fresh prompt: SDPA
    monkeypatch.setenv("KOALA_FUSED_BODY", "0")
    assert fused_body(target.body) is None
    windowed = tiny_target("mistral", sliding_window=4)
    assert Target(windowed.model.to(torch.bfloat16), windowed.tokenizer, "w").fused is None


def test_rows_that_finish_leave_and_join_keep_their_answers_on_the_fused_stack():
    """Rows of other budgets finish and leave the batch (their cache rows dropped), a queued one joins with its
    prompt (a fresh prompt: the model's own forward for that step), one is cancelled: every answer is still the
    one it gets alone without the fused stack."""
    target = _target("llama", torch.bfloat16)
    own = _unfused(target)
    asks = [([5, 6, 7, 5, 6, 7], 5), ([9, 10, 11], 17), ([20, 21, 22, 23], 11), ([30, 31], 9)]
    decoder = Decoder(target, max_batch=3)
    rows = [decoder.add(Request(ids, max_new_tokens=n, drafter=PromptLookupDrafter())) for ids, n in asks]
    cancelled = decoder.add(Request([40, 41, 42], max_new_tokens=30))
    for _ in range(3):
        decoder.step()
    decoder.cancel(cancelled)
    while decoder.busy:
        decoder.step()
    for row, (ids, n) in zip(rows, asks):
        assert row.ids[len(ids):] == generate(own, ids, max_new_tokens=n).tokens
