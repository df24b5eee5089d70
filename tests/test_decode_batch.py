"""Batched decoding (stream_batch / generate_batch): every sequence's greedy output equals batch-size-1 greedy,
whatever its prompt length, drafter, acceptance lengths and finishing time; the batched mask and cache
compaction give each row the logits it would get alone; bad input is refused clearly."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_target
from koala.acceptance import Sampling
from koala.decode import Stats, generate, generate_batch, stream_batch
from koala.kvcache import keep_paths
from koala.drafters import Drafter, PromptLookupDrafter
from koala.drafters.eagle import EagleDrafter
from koala.drafters.medusa import MedusaDrafter
from koala.tree import DraftTree, batch_verify_inputs, verify_inputs
from test_decode import NoisyOracle
from test_drafters_medusa import random_head

PROMPTS = [[3, 5, 6, 7, 8, 5, 6], [10, 11, 12, 13, 10, 11, 12, 13, 10, 11], [40], list(range(20, 60)), [7, 7, 9]]
N = 20


def references(target, prompts, n=N):
    return [generate(target, p, max_new_tokens=n).tokens for p in prompts]


@pytest.mark.parametrize("size", [1, 3, 5])
def test_greedy_matches_batch_size_one(any_target, size):
    any_target.eos_ids = set()
    prompts = PROMPTS[:size]
    refs = references(any_target, prompts)
    factories = {"vanilla": None, "pld": lambda: PromptLookupDrafter(max_ngram=2, num_tokens=4)}
    for name, factory in factories.items():
        out = generate_batch(any_target, prompts, factory, max_new_tokens=N)
        assert [o.tokens for o in out] == refs, name
    oracles = [NoisyOracle(p, r, 128, seed=i) for i, (p, r) in enumerate(zip(prompts, refs))]
    out = generate_batch(any_target, prompts, oracles, max_new_tokens=N)
    assert [o.tokens for o in out] == refs
    assert all(o.stats.tau > 1.5 for o in out)  # rows really advanced by different, multi-token amounts


def test_sequences_finish_at_different_times(llama_target):
    llama_target.eos_ids = set()
    long = references(llama_target, PROMPTS, 30)
    eos = long[1][6]  # ends row 1 early; other rows end wherever this token first shows up, if ever
    llama_target.eos_ids = {eos}
    refs = references(llama_target, PROMPTS, 30)
    assert len({len(r) for r in refs}) > 1
    out = generate_batch(llama_target, PROMPTS, lambda: PromptLookupDrafter(max_ngram=2, num_tokens=4),
                         max_new_tokens=30)
    assert [o.tokens for o in out] == refs
    assert out[1].tokens[-1] == eos and out[1].stats.target_forwards < max(o.stats.target_forwards for o in out)
    mixed = generate_batch(llama_target, PROMPTS[:3], max_new_tokens=30)
    assert [o.tokens for o in mixed] == refs[:3]


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_waiting_prompts_join_as_rows_finish(llama_target, max_batch):
    llama_target.eos_ids = set()
    eos = references(llama_target, PROMPTS[1:2], 30)[0][6]
    llama_target.eos_ids = {eos}  # rows finish at different steps, so waiting prompts join mid-flight
    refs = references(llama_target, PROMPTS, 30)
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    stats = [Stats() for _ in PROMPTS]
    drafters = [PromptLookupDrafter(max_ngram=2, num_tokens=4) for _ in PROMPTS]
    steps = 0
    for step in stream_batch(llama_target, PROMPTS, drafters, max_new_tokens=30, stats=stats, max_batch=max_batch):
        assert sum(bool(new) for new in step) <= max_batch
        for got, new in zip(tokens, step):
            got += new
        steps += 1
    assert tokens == refs
    forwards = sum(s.target_forwards for s in stats)
    assert steps == forwards if max_batch == 1 else steps < forwards  # sequences shared target forwards
    out = generate_batch(llama_target, PROMPTS, max_new_tokens=30, batch_size=max_batch)
    assert [o.tokens for o in out] == refs
    with pytest.raises(ValueError, match="max_batch"):
        list(stream_batch(llama_target, PROMPTS, max_batch=0))


def test_per_row_budgets_and_context_limit(llama_target):
    llama_target.eos_ids = set()
    prompts = [[5] * 250, [6, 7, 8]]  # the first row hits the 256-token context after 6 tokens
    out = generate_batch(llama_target, prompts, lambda: PromptLookupDrafter(), max_new_tokens=12)
    assert [o.stats.new_tokens for o in out] == [6, 12]
    assert out[1].tokens == generate(llama_target, prompts[1], max_new_tokens=12).tokens
    steps = list(stream_batch(llama_target, prompts, max_new_tokens=0))
    assert steps == []


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_head_drafters_per_row(kind):
    target = tiny_target("qwen2")
    target.eos_ids = set()
    refs = references(target, PROMPTS[:3])
    head = random_head(target, kind, 2)
    cls = MedusaDrafter if kind == "medusa" else EagleDrafter
    out = generate_batch(target, PROMPTS[:3], lambda: cls(head, tree="dynamic", depth=3, top_k=2, total_tokens=6),
                         max_new_tokens=N)
    assert [o.tokens for o in out] == refs
    assert all(o.stats.drafted_tokens > 0 for o in out)


def test_batched_tree_logits_equal_single_row_logits(any_target):
    """Rows of different cache lengths (stale columns after the shorter one), different pending and trees."""
    prompts = [[4, 9, 16, 25, 36, 49, 64], [5, 6]]
    trees = [DraftTree(torch.tensor([7, 8, 9]), torch.tensor([-1, -1, 1])), DraftTree.empty()]
    pending = [torch.tensor([50]), torch.tensor([51, 52])]
    cache = DynamicCache()
    ids, pos, mask = batch_verify_inputs([torch.tensor(p) for p in prompts], [DraftTree.empty()] * 2, [0, 0], 0,
                                         torch.float32)
    any_target.hidden(ids, pos, cache, mask)
    lengths = keep_paths(cache, [0, 0], 0, [list(range(7)), [0, 1]])
    assert lengths == [7, 2] and cache.get_seq_length() == 7
    ids, pos, mask = batch_verify_inputs(pending, trees, lengths, 7, torch.float32)
    assert ids.shape == (2, 4) and mask.shape == (2, 1, 4, 11)
    batched = any_target.logits(any_target.hidden(ids, pos, cache, mask))
    for b in range(2):
        alone = DynamicCache()
        ids, pos, _ = verify_inputs(torch.tensor(prompts[b]), DraftTree.empty(), 0, torch.float32)
        any_target.hidden(ids, pos, alone)
        ids, pos, mask = verify_inputs(pending[b], trees[b], len(prompts[b]), torch.float32)
        ref = any_target.logits(any_target.hidden(ids, pos, alone, mask))[0]
        assert torch.allclose(batched[b, :len(ref)], ref, atol=1e-4), b


def test_sampling_rows_use_their_own_seed(llama_target):
    s = Sampling(temperature=1.0)
    out = generate_batch(llama_target, PROMPTS[:3], lambda: PromptLookupDrafter(), s, 12, seed=7)
    for b, p in enumerate(PROMPTS[:3]):
        assert out[b].tokens == generate(llama_target, p, PromptLookupDrafter(), s, 12, seed=7 + b).tokens


def test_should_stop_interrupts_the_batch(llama_target):
    calls = []
    steps = list(stream_batch(llama_target, PROMPTS[:2], should_stop=lambda: len(calls) >= 3 or calls.append(1)))
    assert len(steps) == 3 and all(len(step) == 2 for step in steps)


def test_bad_input(llama_target):
    with pytest.raises(ValueError, match="No prompts"):
        generate_batch(llama_target, [])
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        generate_batch(llama_target, [[5], []])
    with pytest.raises(ValueError, match="one drafter per prompt"):
        generate_batch(llama_target, [[5], [6]], [Drafter()])
    with pytest.raises(ValueError, match="one drafter per prompt"):
        list(stream_batch(llama_target, [[5], [6]], Drafter()))
    with pytest.raises(ValueError, match="one Stats per prompt"):
        list(stream_batch(llama_target, [[5], [6]], stats=[Stats()]))
    shared = PromptLookupDrafter()
    with pytest.raises(ValueError, match="twice"):
        generate_batch(llama_target, [[5], [6]], [shared, shared])


@pytest.mark.slow
def test_smollm2_batch_matches_one_at_a_time(smollm2):
    prompts = [smollm2.encode(p) for p in ["Summarize: the cat sat on the mat. The cat was happy on the mat.",
                                           "Write a Python function that adds two numbers.", "Hi"]]
    refs = [generate(smollm2, p, max_new_tokens=32).tokens for p in prompts]
    out = generate_batch(smollm2, prompts, PromptLookupDrafter, max_new_tokens=32, batch_size=2)
    assert [o.tokens for o in out] == refs
