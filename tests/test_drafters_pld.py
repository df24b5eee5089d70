"""Prompt lookup drafting."""
import pytest

from koala.drafters.pld import PromptLookupDrafter, lookup


def test_lookup_prefers_longest_and_latest_match():
    ids = [1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 1, 2, 3]
    assert lookup(ids, max_ngram=3, num_tokens=2) == [9, 9]  # '1 2 3' matched at the start
    assert lookup([7, 2, 3, 4, 8, 2, 3, 5, 6, 3], 1, 3) == [5, 6, 3]  # latest '3'
    assert lookup([1, 2, 3], 3, 4) == []


def test_drafter_returns_chain():
    tree = PromptLookupDrafter(max_ngram=2, num_tokens=3).propose([4, 5, 6, 7, 4, 5])
    assert tree.tokens.tolist() == [6, 7, 4] and tree.parents.tolist() == [-1, 0, 1]
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_ngram=0)
