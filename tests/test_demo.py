"""`koala demo`: the side-by-side core on a tiny model, its table, and the fallback when no head is shipped."""
from __future__ import annotations

import argparse

from conftest import tiny_target
from test_drafters_medusa import random_head

from koala.demo import pick_drafter, run_demo, table
from koala.drafters import PromptLookupDrafter
from koala.drafters.eagle import EagleDrafter
from koala.heads.checkpoint import save_head

PROMPTS = [("copy", "w5 w6 w7 w8 w5 w6 w7 w8 w5 w6"), ("plain", "w40 w41 w42")]


def test_run_demo_streams_and_matches_vanilla():
    target = tiny_target("llama")
    shown: list[str] = []
    rows = run_demo(target, PromptLookupDrafter(max_ngram=2, num_tokens=4), PROMPTS, max_new_tokens=16,
                    echo=shown.append)
    assert [r.label for r in rows] == ["copy", "plain"]
    for r in rows:
        assert r.same and r.koala_tokens and r.vanilla.tau == 1.0
        assert r.koala.new_tokens == len(r.koala_tokens)
    streamed = "".join(shown)
    for r in rows:  # the KOALA answer is what was streamed
        assert target.decode(r.koala_tokens) in streamed
    text = table(rows, "pld")
    assert "mean" in text and "2/2 identical" in text and text.count("yes") == 2


def test_a_baseline_in_another_dtype_is_the_speed_reference_and_exactness_stays_same_dtype():
    baseline = tiny_target("llama")
    target = baseline.with_dtype("bf16")
    rows = run_demo(target, PromptLookupDrafter(max_ngram=2, num_tokens=4), PROMPTS, max_new_tokens=12,
                    baseline=baseline)
    for r in rows:
        assert r.same and r.baseline is not None and r.baseline.new_tokens > 0
        assert r.speedup == r.koala.tokens_per_s / r.baseline.tokens_per_s
    assert all(r.baseline is None for r in run_demo(baseline, PromptLookupDrafter(), PROMPTS[:1], 8,
                                                     baseline=baseline))  # same target: no second vanilla run


def test_missing_head_falls_back_to_pld(tmp_path, capsys):
    args = argparse.Namespace(drafter=None, head=str(tmp_path / "no-such-head"), tree=None, depth=None,
                              draft_top_k=None, total_tokens="auto")
    drafter, name = pick_drafter(args, tiny_target("llama"))
    assert name == "pld" and isinstance(drafter, PromptLookupDrafter)
    assert "no KOALA head found" in capsys.readouterr().err


def test_head_dir_gives_a_koala_drafter(tmp_path):
    target = tiny_target("llama")
    head = save_head(random_head(target, "eagle", 1), tmp_path / "eagle-koala")
    args = argparse.Namespace(drafter=None, head=str(head), tree="chain", depth=2, draft_top_k=None,
                              total_tokens="auto", gate=True, lookup=0)
    drafter, name = pick_drafter(args, target)
    assert name == "koala" and isinstance(drafter.inner, EagleDrafter) and drafter.paths == [(0,), (0, 0)]
    rows = run_demo(target, drafter, PROMPTS[:1], max_new_tokens=10)
    assert rows[0].same
