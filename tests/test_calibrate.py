"""`koala calibrate`: per-depth, per-rank acceptance counted in the real decode loop, and the table's use."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_target
from test_bench import write_questions
from test_drafters_medusa import PROMPT, random_head
from test_eagle3 import eagle3_head

from koala.bench import load_questions
from koala.calibrate import GUESS, Counts, Tally, measure, tally
from koala.cli import main
from koala.decode import Stats, stream_tokens
from koala.drafters.base import Drafter
from koala.drafters.factory import drafter_for_head
from koala.drafters.trees import best_nodes, expected_accepted, grow_static, rank_table, static_tree
from koala.heads.checkpoint import save_head
from koala.tree import DraftTree


def test_rank_table_from_top1_rates_is_the_geometric_guess():
    table = rank_table([0.5, 0.2], 3, 3)
    assert [q for row in table for q in row] == pytest.approx([0.5, 0.25, 0.125] + [0.2, 0.16, 0.128] * 2)


def test_measured_table_is_padded_and_made_non_increasing():
    assert rank_table([[0.4, 0.1], [0.3, 0.35]], 3, 3) == [[0.4, 0.1, 0.0], [0.3, 0.3, 0.0], [0.3, 0.3, 0.0]]
    for bad in ([[0.7, 0.5]], [[1.2]], [[]], [["x"]], [0.5, [0.2]]):
        with pytest.raises(ValueError):
            rank_table(bad, 2, 2)


def test_a_measured_table_reshapes_trees_and_their_value():
    # in the loop the second candidate was rarely right (0.05, not the guessed 0.5 * 0.5): depth beats width
    measured = [[0.5, 0.05], [0.5, 0.05]]
    assert static_tree(3, 3, 2, measured) == [(0,), (0, 0), (0, 0, 0)]
    assert static_tree(3, 3, 2, [0.5]) == [(0,), (1,), (0, 0)]
    assert expected_accepted(3, 3, 2, measured) == pytest.approx(0.5 + 0.25 + 0.125)
    assert [p for _, p in best_nodes(4, 2, 2, measured)] == [(0,), (0, 0), (1,), (0, 1)]


def test_tally_counts_nodes_whose_parent_was_accepted():
    # root children: 7 (rank 0), 8 (rank 1); 7's children 9, 3; 8's child 4
    tree = DraftTree(torch.tensor([7, 8, 9, 3, 4]), torch.tensor([-1, -1, 0, 0, 1]))
    counts = Counts()
    tally(tree, [7, 3, 5], counts)  # the target continued 7, 3 (bonus 5): node 3 (depth 2, rank 1) accepted
    assert counts.reached == [[1, 1], [1, 1]] and counts.accepted == [[1, 0], [0, 1]]
    tally(tree, [8, 4], counts)  # rank 1 at depth 1, then its only child (rank 0 under 8)
    assert counts.reached == [[2, 2], [2, 1]] and counts.accepted == [[1, 1], [1, 1]]
    tally(tree, [6], counts)  # a miss: nothing deeper is reached
    assert counts.reached == [[3, 3], [2, 1]] and counts.steps == 3
    assert Counts(reached=[[30, 30], [10]], accepted=[[15, 3], [9]]).table() == [[0.4839, 0.0968]]


class RotatedOracle(Drafter):
    """A static tree of the target's own top-3 children, their order rotated every step, so the target's token
    sits at rank 0, 1 or 2 at depth 1 and at rank 0 or 1 deeper, sometimes where the tree has no node."""

    name = "rotated"

    def __init__(self, target):
        self.target, self.step = target, 0

    def propose(self, ids):
        self.step += 1

        def expand(cands, nodes, k):
            rows = []
            for node in nodes:
                path, level = [], 0
                while node >= 0:
                    path.insert(0, cands.tokens[node])
                    node, level = cands.parents[node], level + 1
                top = self.target.model(torch.tensor([ids + path])).logits[0, -1].topk(3).indices
                rows.append(top.roll(self.step % (3 if level == 0 else 2))[:k])
            return torch.stack(rows), torch.zeros(len(nodes), k)

        with torch.inference_mode():
            return grow_static(static_tree(8, 3, 3, [0.6]), expand).tree()


def test_counts_in_the_loop_agree_with_the_loops_own_acceptance(llama_target):
    counts, accepted = Counts(), []
    for ids in (PROMPT, PROMPT[::-1]):
        stats = Stats()
        for _ in stream_tokens(llama_target, ids, Tally(RotatedOracle(llama_target), counts), max_new_tokens=30,
                               stats=stats):
            pass
        accepted += stats.accepted_lengths[1:]  # the prefill step drafts nothing
    assert counts.steps == len(accepted) and counts.reached[0][0] == counts.steps
    assert sum(map(sum, counts.accepted)) == sum(accepted)  # every accepted node counted once, at its depth
    assert [sum(counts.accepted[d]) for d in range(3)] == [sum(a > d for a in accepted) for d in range(3)]
    assert counts.accepted[0][1] and counts.accepted[0][2] and 0 < sum(counts.accepted[1]) < counts.steps


def test_tally_hands_an_eagle3_head_the_layers_it_reads(llama_target, tmp_path):
    save_head(eagle3_head(llama_target), tmp_path / "e3")
    inner = drafter_for_head(tmp_path / "e3", llama_target, tree="chain", depth=2, gate=False, lookup=0)
    assert inner.feature_layers and Tally(inner, Counts()).feature_layers == inner.feature_layers


class AlwaysOne(Drafter):
    def propose(self, ids):
        return DraftTree(torch.tensor([5]), torch.tensor([-1]))


def test_measure_drafts_the_calibration_tree_with_lookup_first(llama_target, tmp_path, monkeypatch):
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e")
    alone = measure(llama_target, tmp_path / "e", [PROMPT], max_new_tokens=20, nodes=6, lookup=0, progress=False)
    assert len(alone.reached[0]) == sum(len(p) == 1 for p in static_tree(6, 5, 4, GUESS))  # the tree's ranks
    assert alone.steps == 19  # every step but the prompt's: the random head never hits, one token a step
    monkeypatch.setattr("koala.drafters.factory.lookup_drafter", lambda n: AlwaysOne())
    assert measure(llama_target, tmp_path / "e", [PROMPT], max_new_tokens=20, nodes=6, progress=False).steps == 0


def test_calibration_questions_leave_out_the_bench_ones(tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl")
    assert [q["question_id"] for q in load_questions(qfile, 5, skip_per_category=1)[0]] == [2]
    assert [q["question_id"] for q in load_questions(qfile, 1)[0]] == [1, 3]  # the bench's, unchanged
    with pytest.raises(ValueError, match="skip-per-category"):
        load_questions(qfile, 1, skip_per_category=2)


def test_cli_stores_the_table_and_the_factory_prefers_it(saved_tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("koala.calibrate.Counts.table", lambda self, min_reached=20: [[0.3, 0.01], [0.5]])
    qfile = write_questions(tmp_path / "q.jsonl")
    target = tiny_target("llama")
    head = save_head(random_head(target, "medusa", 1), tmp_path / "m", extra={"acceptance": [0.5, 0.4, 0.3]})
    argv = ["calibrate", str(head), "--questions", str(qfile), "--target", str(saved_tiny_dir), "--skip-per-category",
            "0", "--max-new-tokens", "6", "--nodes", "5", "--dtype", "float32"]
    assert main(argv + ["--dry-run"]) == 0
    assert "rank_acceptance" not in json.loads((head / "config.json").read_text())["extra"]
    assert main(argv) == 0
    extra = json.loads((head / "config.json").read_text())["extra"]
    assert extra["rank_acceptance"] == [[0.3, 0.01], [0.5]] and extra["calibration"]["prompts"] == 3
    assert extra["acceptance"] == [0.5, 0.4, 0.3]  # the training rates stay beside it
    drafter = drafter_for_head(head, target, tree="static", depth=3, total_tokens=3, gate=False, lookup=0)
    assert drafter.paths == [(0,), (0, 0), (0, 0, 0)]  # the training rates would have put (1,) second


def test_a_damaged_table_fails_naming_the_fix(llama_target, tmp_path):
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e", extra={"rank_acceptance": [[0.9, 0.9]]})
    with pytest.raises(ValueError, match="koala calibrate"):
        drafter_for_head(tmp_path / "e", llama_target, tree="chain", depth=2)
