import torch
from transformers import DynamicCache

from koala.kvcache import ReservedCache, add_rows, drop_rows, keep_paths


def _append(cache, b, n, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)
    for layer in range(2):
        cache.update(k + layer, v - layer, layer)


@torch.inference_mode()
def test_reserved_cache_holds_what_a_dynamic_cache_holds_through_every_edit():
    caches = [DynamicCache(), ReservedCache(), ReservedCache(torch.float64)]  # float32 states fit float64 exactly
    edits = [lambda c: _append(c, 2, 5, 0), lambda c: _append(c, 2, 3, 1),
             lambda c: keep_paths(c, [5, 4], 5, [[2, 0], [1]]), lambda c: _append(c, 2, 300, 2),
             lambda c: drop_rows(c, [1], 305), lambda c: add_rows(c, 2), lambda c: _append(c, 3, 1, 3),
             lambda c: keep_paths(c, [300, 0, 0], 305, [[0], [], [0]])]
    for edit in edits:
        for cache in caches:
            edit(cache)
        for a, b, c in zip(*(cache.layers for cache in caches)):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert torch.equal(a.keys.double(), c.keys) and torch.equal(a.values.double(), c.values)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == caches[2].get_seq_length() == 301


@torch.inference_mode()
def test_appending_writes_in_place_instead_of_copying_the_cache():
    cache = ReservedCache()
    _append(cache, 1, 10, 0)
    first = cache.layers[0].keys.data_ptr()
    for step in range(20):
        _append(cache, 1, 1, step + 1)
        assert cache.layers[0].keys.data_ptr() == first  # no new tensor: the old columns were not copied
    keep_paths(cache, [25], 25, [[0, 3]])  # a verify block of 5, two nodes kept: still the same storage
    _append(cache, 1, 1, 99)
    assert cache.layers[0].keys.data_ptr() == first and cache.get_seq_length() == 28


def test_targets_with_exact_attention_keep_the_cache_it_reads():
    from conftest import tiny_target

    from koala.exact_attention import cache_dtype

    target = tiny_target("llama", seed=1)
    assert target.new_cache().layer_class_to_replicate().storage == cache_dtype()  # fp32 (C kernel) or float64
    sdpa = type(target)(target.model, target.tokenizer, target.name, exact_attention=False)
    assert sdpa.new_cache().layer_class_to_replicate().storage is None
    bf16 = tiny_target("llama", seed=1).with_dtype("bf16")
    cache = bf16.new_cache()
    with torch.inference_mode():
        bf16.hidden(torch.tensor([[5, 9, 13]]), torch.arange(3)[None], cache)
    assert cache.layers[0].keys.dtype == cache_dtype()  # exact attention reads it without converting
