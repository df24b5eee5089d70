import pytest
import torch

from koala.heads import draft_vocab_from_counts


def test_most_frequent_first_and_keep_ids_forced_in():
    counts = torch.tensor([5.0, 0.0, 9.0, 1.0, 7.0, 3.0])
    assert draft_vocab_from_counts(counts, 3) == [2, 4, 0]
    assert draft_vocab_from_counts(counts, 3, keep=[1]) == [2, 4, 1]
    assert draft_vocab_from_counts(counts, 6) == [2, 4, 0, 5, 3, 1]


def test_bad_sizes_are_rejected():
    counts = torch.ones(4)
    with pytest.raises(ValueError):
        draft_vocab_from_counts(counts, 5)
    with pytest.raises(ValueError):
        draft_vocab_from_counts(counts, 1, keep=[0, 1])
    with pytest.raises(ValueError):
        draft_vocab_from_counts(counts, 2, keep=[7])
