"""Draft tree structure and the verification mask."""
import pytest
import torch

from koala.tree import DraftTree, verify_inputs


def test_structure():
    tree = DraftTree(torch.tensor([5, 6, 7, 8]), torch.tensor([-1, -1, 0, 2]))
    assert tree.depth == [1, 1, 2, 3]
    assert tree.children() == {-1: [0, 1], 0: [2], 1: [], 2: [3], 3: []}
    assert tree.path_to(3) == [0, 2, 3]
    assert DraftTree.chain([4, 5, 6]).parents.tolist() == [-1, 0, 1]
    assert len(DraftTree.empty()) == 0


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-2]])
def test_parents_must_come_first(parents):
    with pytest.raises(ValueError, match="parent"):
        DraftTree(torch.arange(len(parents)), torch.tensor(parents))


def test_verify_inputs_mask_and_positions():
    tree = DraftTree(torch.tensor([5, 6, 7]), torch.tensor([-1, -1, 0]))
    ids, pos, mask = verify_inputs(torch.tensor([1, 2]), tree, past_len=3, dtype=torch.float32)
    assert ids.tolist() == [[1, 2, 5, 6, 7]]
    assert pos.tolist() == [[3, 4, 5, 5, 6]]
    seen = (mask[0, 0] == 0).int().tolist()
    assert seen == [[1, 1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 1, 0, 1, 0],
                    [1, 1, 1, 1, 1, 1, 0, 1]]
    _, _, none = verify_inputs(torch.tensor([1, 2]), DraftTree.empty(), 0, torch.float32)
    assert none is None
