import pytest

from koala.drafters import tree_size
from koala.drafters.tree_size import best_size, choose_total_tokens, latency_profile


def test_best_size_follows_the_hardware():
    acceptance = [0.7, 0.6]
    flat = {0: 1.0, 1: 1.0, 8: 1.0, 32: 1.05, 64: 1.1}  # GPU-like: big trees are nearly free
    linear = {0: 1.0, 1: 1.1, 8: 1.8, 32: 4.2, 64: 7.4}  # CPU-like: every token costs
    assert best_size(flat, depth=6, top_k=8, acceptance=acceptance) == 64
    assert best_size(linear, depth=6, top_k=8, acceptance=acceptance) in (1, 8)
    assert best_size(flat, depth=6, top_k=8, acceptance=acceptance, max_nodes=32) == 32


def test_profile_is_measured_once_and_cached(llama_target, tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_HOME", str(tmp_path))
    calls = []
    real = tree_size.measure_latency
    monkeypatch.setattr(tree_size, "measure_latency", lambda *a, **k: calls.append(1) or real(*a, repeats=1))
    first = latency_profile(llama_target, sizes=(1, 4, 8))
    assert set(first) == {0, 1, 4, 8} and all(v > 0 for v in first.values())
    assert latency_profile(llama_target, sizes=(1, 4, 8)) == first and len(calls) == 1
    assert len(list((tmp_path / "tree_size").glob("*.json"))) == 1
    n = choose_total_tokens(llama_target, depth=4, top_k=2, acceptance=[0.6], sizes=(1, 4, 8))
    assert n in (1, 4, 8) and len(calls) == 1


def test_too_short_context_is_a_clear_error(llama_target):
    with pytest.raises(ValueError, match="too short"):
        tree_size.measure_latency(llama_target, sizes=(300,))
