"""The decode loop: lossless greedy output, tree verification, cache compaction, stats and bad input."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from koala.acceptance import Sampling
from koala.decode import generate, stream_tokens
from koala.kvcache import keep_paths
from koala.drafters import Drafter, PromptLookupDrafter
from koala.tree import DraftTree, verify_inputs

PROMPTS = [[3, 5, 6, 7, 8, 5, 6], [10, 11, 12, 13, 10, 11, 12, 13, 10, 11], [40], list(range(20, 60))]


def hf_greedy(target, ids: list[int], n: int) -> list[int]:
    out = target.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


class NoisyOracle(Drafter):
    """Knows the true greedy continuation; proposes trees that are right for a random prefix, with wrong
    siblings and wrong tails mixed in, so every acceptance length from 0 to the full depth is exercised."""

    name = "noisy-oracle"

    def __init__(self, prompt: list[int], reference: list[int], vocab: int, seed: int = 0) -> None:
        self.full, self.start, self.vocab = prompt + reference, len(prompt), vocab
        self.rng = random.Random(seed)

    def propose(self, ids) -> DraftTree:
        truth = self.full[len(ids):len(ids) + 6]
        if not truth:
            return DraftTree.empty()
        right = self.rng.randint(0, len(truth))
        tokens, parents, parent = [], [], -1
        for depth, tok in enumerate(truth):
            wrong = (tok + self.rng.randint(1, self.vocab - 1)) % self.vocab
            tokens.append(wrong)  # a wrong sibling first, so the right child is not always the first one
            parents.append(parent)
            tokens.append(tok if depth < right else wrong)
            parents.append(parent)
            parent = len(tokens) - 1
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_lossless(any_target, prompt):
    n = 24
    reference = hf_greedy(any_target, prompt, n)
    vanilla = generate(any_target, prompt, None, max_new_tokens=n)
    assert vanilla.tokens == reference
    assert vanilla.stats.target_forwards == len(reference) and vanilla.stats.tau == 1.0
    for drafter in (PromptLookupDrafter(max_ngram=2, num_tokens=4), NoisyOracle(prompt, reference, 128)):
        spec = generate(any_target, prompt, drafter, max_new_tokens=n)
        assert spec.tokens == reference, drafter.name


def test_noisy_oracle_is_partly_accepted(llama_target):
    prompt = PROMPTS[0]
    reference = hf_greedy(llama_target, prompt, 40)
    res = generate(llama_target, prompt, NoisyOracle(prompt, reference, 128, seed=3), max_new_tokens=40)
    lengths = set(res.stats.accepted_lengths[1:])
    assert res.tokens == reference
    assert 0 in lengths and max(lengths) >= 4  # both rejections and long acceptances happened
    assert res.stats.tau > 1.5


def test_tree_logits_equal_sequential_forwards(any_target):
    prompt = torch.tensor([4, 9, 16, 25, 36])
    tree = DraftTree(torch.tensor([7, 8, 9, 10, 11, 12]), torch.tensor([-1, -1, 0, 0, 2, 1]))
    cache = DynamicCache()
    ids, pos, mask = verify_inputs(prompt, tree, 0, torch.float32)
    logits = any_target.logits(any_target.hidden(ids, pos, cache, mask))[0]
    for node in range(len(tree)):
        path = prompt.tolist() + tree.tokens[tree.path_to(node)].tolist()
        with torch.no_grad():
            ref = any_target.model(torch.tensor([path])).logits[0, -1]
        assert torch.allclose(logits[len(prompt) + node], ref, atol=1e-4), node
    with torch.no_grad():
        root = any_target.model(prompt[None]).logits[0, -1]
    assert torch.allclose(logits[len(prompt) - 1], root, atol=1e-4)


def test_tree_on_top_of_cache_and_compaction(any_target):
    """Verify a tree over a warm cache, keep a non-contiguous path, continue: same logits as a fresh forward."""
    prompt = [4, 9, 16, 25, 36]
    cache = DynamicCache()
    ids, pos, _ = verify_inputs(torch.tensor(prompt), DraftTree.empty(), 0, torch.float32)
    any_target.hidden(ids, pos, cache)
    pending = torch.tensor([50])
    tree = DraftTree(torch.tensor([7, 8, 9, 10]), torch.tensor([-1, -1, 1, 2]))
    ids, pos, mask = verify_inputs(pending, tree, len(prompt), torch.float32)
    tree_logits = any_target.logits(any_target.hidden(ids, pos, cache, mask))[0]
    keep_paths(cache, [len(prompt) + 1], len(prompt) + 1, [[1, 2, 3]])  # 8 -> 9 -> 10, skipping node 0
    text = prompt + [50, 8, 9, 10]
    assert cache.get_seq_length() == len(text)
    with torch.no_grad():
        fresh = any_target.model(torch.tensor([text + [77]])).logits[0]
    assert torch.allclose(tree_logits[-1], fresh[-2], atol=1e-4)
    ids, pos, _ = verify_inputs(torch.tensor([77]), DraftTree.empty(), len(text), torch.float32)
    cont = any_target.logits(any_target.hidden(ids, pos, cache))[0, -1]
    assert torch.allclose(cont, fresh[-1], atol=1e-4)


def test_max_new_tokens_and_eos(llama_target):
    prompt = PROMPTS[1]
    llama_target.eos_ids = set()
    reference = generate(llama_target, prompt, max_new_tokens=30).tokens
    assert len(reference) == 30
    for n in (1, 5, 17):
        res = generate(llama_target, prompt, PromptLookupDrafter(), max_new_tokens=n)
        assert res.tokens == reference[:n] and res.stats.new_tokens == n
    eos = reference[6]
    llama_target.eos_ids = {eos}
    res = generate(llama_target, prompt, NoisyOracle(prompt, reference, 128), max_new_tokens=30)
    assert res.tokens == reference[:reference.index(eos) + 1]


def test_context_limit(llama_target):
    with pytest.raises(ValueError, match="context"):
        generate(llama_target, list(range(3, 120)) * 3, max_new_tokens=4)
    res = generate(llama_target, [5] * 250, PromptLookupDrafter(), max_new_tokens=50)
    assert res.stats.new_tokens == 256 - 250  # stops at the context limit, never past it


def test_bad_input(llama_target):
    with pytest.raises(ValueError, match="empty"):
        generate(llama_target, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        generate(llama_target, "   ", max_new_tokens=4)
    with pytest.raises(ValueError, match="rule"):
        generate(llama_target, [5, 6], rule="bogus")


def test_text_prompt_uses_chat_template(llama_target):
    ids = llama_target.encode("w5 w6")
    assert ids == llama_target.tokenizer.convert_tokens_to_ids(["<user>", "w5", "w6", "</s>", "<assistant>"])
    res = generate(llama_target, "w5 w6", max_new_tokens=3)
    assert res.tokens == generate(llama_target, ids, max_new_tokens=3).tokens


def test_should_stop_interrupts(llama_target):
    calls = []
    out = list(stream_tokens(llama_target, [5, 6], should_stop=lambda: len(calls) >= 3 or calls.append(1)))
    assert len(out) == 3


def test_sampling_is_reproducible_with_seed(llama_target):
    s = Sampling(temperature=1.0, top_p=0.9)
    a = generate(llama_target, [5, 6, 7], PromptLookupDrafter(), s, 20, seed=7)
    b = generate(llama_target, [5, 6, 7], PromptLookupDrafter(), s, 20, seed=7)
    assert a.tokens == b.tokens


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2):
    for prompt in ["Summarize: the cat sat on the mat. The cat was happy on the mat.",
                   "Write a Python function that adds two numbers."]:
        ids = smollm2.encode(prompt)
        reference = hf_greedy(smollm2, ids, 48)
        for drafter in (None, PromptLookupDrafter()):
            assert generate(smollm2, ids, drafter, max_new_tokens=48).tokens == reference


@pytest.mark.parametrize("style", ["byte-level", "metaspace"])
def test_text_stream_pieces_add_up_to_the_full_decode(style):
    """TextStream re-decodes only a short window: on a GPT-2 style byte-level BPE (multi-byte characters split
    across tokens) and a SentencePiece style one (leading-space marker), the pieces, however the ids arrive, join to
    exactly the text of decoding all ids at once."""
    import random
    import types

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from koala.decode import TextStream

    corpus = ["héllo wörld, 你好! 🙂🙂 the  cat\n\tsat on the mat.", "naïve café 🚀 résumé — ok", "a b c"] * 20
    tok = Tokenizer(models.BPE())
    if style == "byte-level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, initial_alphabet=alphabet))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    target = types.SimpleNamespace(decode=lambda ids: fast.decode(ids, skip_special_tokens=True))
    ids = fast.encode(" ".join(corpus[:3]) * 2)
    rng = random.Random(0)
    for _ in range(20):
        stream, pieces, i = TextStream(target), [], 0
        while i < len(ids):
            j = i + rng.randint(1, 5)
            pieces.append(stream.feed(ids[i:j]))
            i = j
        pieces.append(stream.flush())
        assert "".join(pieces) == target.decode(ids)
