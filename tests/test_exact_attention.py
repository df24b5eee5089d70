"""Attention that gives each query row the same bits whatever else shares the call."""
import pytest
import torch

from koala.decode import generate
from koala.drafters import PromptLookupDrafter
from koala import cpu_kernels
from koala.exact_attention import _float64, _rows, exact_attention
from koala.invariant_linear import amx_bf16

from conftest import tiny_target


class _Attn(torch.nn.Module):
    num_key_value_groups = 3


def _qkv(seed, q, length, heads=6, kv_heads=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, q, d, generator=g).bfloat16(), torch.randn(1, kv_heads, length, d, generator=g).bfloat16(),
            torch.randn(1, kv_heads, length, d, generator=g).bfloat16())


@pytest.mark.parametrize("cache", [torch.float64, torch.float32])  # float64 path; the C kernel (fp32 cache)
@pytest.mark.parametrize("seed", range(5))
def test_a_row_is_the_same_alone_and_inside_a_tree_verify(seed, cache):
    past, n = 40 + 7 * seed, 16
    q, k, v = _qkv(seed, n, past + n)
    k, v = k.to(cache), v.to(cache)
    parents = [-1] + [torch.randint(0, i, (1,), generator=torch.Generator().manual_seed(seed * 100 + i)).item()
                      for i in range(1, n)]
    allowed = torch.zeros(n, past + n, dtype=torch.bool)
    allowed[:, :past] = True
    for i, p in enumerate(parents):  # each node sees the cache, its ancestors and itself
        allowed[i, past + i] = True
        while p >= 0:
            allowed[i, past + p] = True
            p = parents[p]
    mask = torch.zeros(1, 1, n, past + n, dtype=torch.bfloat16).masked_fill_(~allowed, torch.finfo(torch.bfloat16).min)
    tree, _ = exact_attention(_Attn(), q, k, v, mask)
    for i in range(n):  # the same row computed as a one-token step over exactly the keys it may see
        keys = allowed[i].nonzero().squeeze(1)
        alone, _ = exact_attention(_Attn(), q[:, :, i:i + 1], k[:, :, keys], v[:, :, keys], None)
        assert torch.equal(alone[0, 0], tree[0, i])


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no C kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_kernel_agrees_with_float64_and_keeps_rows_apart(dtype):
    q, k, v = (t.float() for t in _qkv(3, 12, 50))
    q = q.to(dtype)
    mask = torch.zeros(1, 1, 12, 50).masked_fill_(torch.ones(12, 50, dtype=torch.bool).tril(38).logical_not(),
                                                   torch.finfo(torch.float32).min)
    for m in (None, mask, mask == 0):  # causal, additive, boolean
        fast = _rows(q, k, v, m, 0.25)
        assert fast.dtype == dtype
        torch.testing.assert_close(fast.float(), _float64(q, k.double(), v.double(), m, 0.25).float(),
                                   atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
        for i in (0, 5, 11):  # each row alone over the keys it may see
            alone = _rows(q[:, :, i:i + 1], k[:, :, :39 + i], v[:, :, :39 + i], None, 0.25)
            assert torch.equal(alone[0, 0], fast[0, i])


@pytest.mark.parametrize("additive", [False, True])
def test_a_prompt_gets_the_same_sdpa_bits_alone_and_beside_a_tree_verify(additive):
    from koala.tree import DraftTree, batch_verify_inputs

    width, m = 7, 5  # row 0 joins with a 5-token prompt; row 1 has 7 cached tokens and verifies a 6-node tree
    tree = DraftTree(torch.arange(6), torch.tensor([-1, 0, 0, 1, -1, 4]))
    _, _, mask = batch_verify_inputs([torch.arange(m), torch.tensor([3])], [DraftTree.empty(), tree], [0, width],
                                     width, torch.bfloat16)
    if not additive:
        mask = mask == 0
    q, k, v = _qkv(3, 7, width + 7)
    q, k, v = torch.cat([q, q.flip(2)]), torch.cat([k, k.flip(2)]), torch.cat([v, v.flip(2)])
    both, _ = exact_attention(_Attn(), q, k.double(), v.double(), mask)  # the float64 cache a bf16 target keeps
    cols = slice(width, width + m)
    alone, _ = exact_attention(_Attn(), q[:1, :, :m], k[:1, :, cols].double(), v[:1, :, cols].double(), None)
    assert torch.equal(both[0, :m], alone[0])
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[:1, :, :m], k[:1, :, cols].repeat_interleave(3, 1), v[:1, :, cols].repeat_interleave(3, 1), is_causal=True)
    assert torch.equal(alone[0], sdpa[0].transpose(0, 1))  # SDPA, not the float64 path, reads prompts
    assert not both[0, m:].any()  # its padding rows
    tree_row, _ = exact_attention(_Attn(), q[1:], k[1:].double(), v[1:].double(), mask[1:])
    assert torch.equal(both[1], tree_row[0])


def test_no_mask_means_causal_and_long_inputs_are_chunked(monkeypatch):
    q, k, v = _qkv(0, 12, 20)
    full, _ = exact_attention(_Attn(), q, k, v, None)
    monkeypatch.setattr("koala.exact_attention.CHUNK", 5)
    chunked, _ = exact_attention(_Attn(), q, k, v, None)
    assert torch.equal(full, chunked)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1),
        attn_mask=torch.ones(12, 20, dtype=torch.bool).tril(8))
    torch.testing.assert_close(full.float(), ref.transpose(1, 2), atol=1e-2, rtol=1e-2)


def _bf16(seed):
    target = tiny_target("llama", seed=seed)
    return type(target)(target.model.bfloat16(), target.tokenizer, target.name)


def _mismatches(target) -> int:
    prompts = [[5, 9, 13, 5, 9, 13, 5, 9], [7, 8, 9, 10, 7, 8, 9, 10, 7], [20, 21, 22, 23, 20, 21]]
    return sum(generate(target, ids, max_new_tokens=40).tokens
               != generate(target, ids, drafter=PromptLookupDrafter(min_ngram=1), max_new_tokens=40).tokens
               for ids in prompts)


def test_bf16_targets_on_cpu_use_it_and_speculation_stays_lossless():
    targets = [_bf16(seed) for seed in (1, 4)]  # models where SDPA's bf16 verification changes the output
    assert all(t.model.config._attn_implementation == "koala_exact" for t in targets)
    assert sum(map(_mismatches, targets)) == 0


@pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no C kernels here: {cpu_kernels.why()}")
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_precision_cache_koala_did_not_make_gets_the_same_bits(half):
    q, k, v = _qkv(3, 5, 60)  # HF generate's own cache holds K/V in the model's dtype, koala's in fp32
    q, k, v = q.float(), k.to(half), v.to(half)  # fp32 rows out, so any difference in the sums shows
    mask = torch.zeros(1, 1, 5, 60).masked_fill_(~torch.ones(5, 60, dtype=torch.bool).tril(55), -1e30)
    assert torch.equal(_rows(q, k, v, mask, 0.25), _rows(q, k.float(), v.float(), mask, 0.25))


def test_the_control_sdpa_verification_is_not_lossless_where_its_kernels_group_rows():
    targets = [_bf16(seed) for seed in (1, 4)]
    for target in targets:  # torch 2.13 on a Xeon (AVX-512/AMX): these models change their output with SDPA
        target.model.set_attn_implementation("sdpa")
    if not amx_bf16():
        pytest.skip("measured on AMX CPUs only; on an AVX2-only AMD EPYC SDPA's bf16 rows agree for these models")
    assert sum(map(_mismatches, targets)) > 0


def test_work_that_verifies_nothing_can_keep_sdpa():
    target = tiny_target("llama", seed=1)
    fast = type(target)(target.model, target.tokenizer, target.name, exact_attention=False).with_dtype("bf16")
    assert fast.dtype == torch.bfloat16  # distill / cache / train: faster, and they verify no drafts
    assert fast.model.config._attn_implementation == "sdpa"
    assert target.with_dtype("bf16").model.config._attn_implementation == "koala_exact"


def test_bf16_batches_give_each_row_its_single_sequence_tokens(monkeypatch):
    import koala.exact_attention as ea
    from koala.decode import generate_batch

    target = _bf16(4)  # with SDPA its batched rows drift from the single-sequence ones
    prompts = [[5, 9, 13, 5, 9, 13, 5, 9], [7, 8, 9, 10, 7, 8, 9, 10, 7], [20, 21, 22, 23, 20, 21], [30, 31]]
    alone = [generate(target, ids, max_new_tokens=24).tokens for ids in prompts]
    prompt_rows = []
    real = ea._prompt
    monkeypatch.setattr(ea, "_prompt", lambda q, *a: prompt_rows.append(q.shape[2]) or real(q, *a))
    batched = generate_batch(target, prompts, lambda: PromptLookupDrafter(min_ngram=1), max_new_tokens=24,
                             batch_size=3)  # the fourth joins a running batch
    assert [r.tokens for r in batched] == alone
    layers = target.model.config.num_hidden_layers
    assert sorted(prompt_rows) == sorted([len(p) for p in prompts] * layers)  # each prompt by SDPA, once per layer


@pytest.mark.parametrize("masked", ["none", "bool", "additive"])
def test_long_prefill_chunks_skip_unseen_keys_without_changing_the_result(monkeypatch, masked):
    q, k, v = _qkv(7, 40, 50)
    k, v = k.double(), v.double()  # a float64 cache: the chunked float64 path (the fallback without C kernels)
    allowed = torch.ones(40, 50, dtype=torch.bool).tril(10)
    mask = {"none": None, "bool": allowed[None, None],
            "additive": torch.zeros(1, 1, 40, 50, dtype=torch.bfloat16).masked_fill_(
                ~allowed, torch.finfo(torch.bfloat16).min)}[masked]
    whole, _ = exact_attention(_Attn(), q, k, v, mask)  # one chunk: every key
    monkeypatch.setattr("koala.exact_attention.CHUNK", 8)
    seen = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: seen.append(b.shape[-1]) or real(a, b))
    chunked, _ = exact_attention(_Attn(), q, k, v, mask)
    assert torch.equal(whole, chunked)
    assert seen[0::2] == [18, 26, 34, 42, 50]  # QK^T per chunk: only the keys its rows may see
