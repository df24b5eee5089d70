import pytest

from koala.decode import generate
from koala.drafters import Drafter, plan
from koala.drafters.eagle import EagleDrafter
from koala.drafters.factory import LOOKUP_MIN_NGRAM, drafter_for_head
from koala.drafters.gate import GatedDrafter
from koala.drafters.medusa import MedusaDrafter
from koala.drafters.plan import Plan
from koala.drafters.pld import PromptLookupDrafter
from koala.heads.checkpoint import save_head
from test_drafters_medusa import PROMPT, random_head


def test_defaults_per_head_kind(llama_target, tmp_path):
    save_head(random_head(llama_target, "medusa", 2, num_heads=3), tmp_path / "m")
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e", extra={"acceptance": [0.8, 1.0]})
    medusa = drafter_for_head(tmp_path / "m", llama_target, tree="static", depth=3, total_tokens="6", lookup=0)
    assert isinstance(medusa, GatedDrafter) and isinstance(medusa.inner, MedusaDrafter)  # gated by default
    assert medusa.tree == "static" and medusa.depth == 3
    assert len(medusa.paths) == 6
    eagle = drafter_for_head(tmp_path / "e", llama_target, tree="dynamic", depth=5, total_tokens=5, gate=False,
                             lookup=0)
    assert isinstance(eagle, EagleDrafter) and eagle.tree == "dynamic" and eagle.total_tokens == 5
    chain = drafter_for_head(tmp_path / "e", llama_target, tree="chain", depth=2)  # prompt lookup first by default
    lookup, head = chain.inner.drafters
    assert isinstance(lookup, PromptLookupDrafter) and lookup.min_ngram == LOOKUP_MIN_NGRAM
    assert head.paths == [(0,), (0, 0)] and chain.plan == Plan("chain", 2, 2)
    with pytest.raises(ValueError, match="lookup"):
        drafter_for_head(tmp_path / "e", llama_target, tree="chain", depth=2, lookup=-1)
    vanilla = generate(llama_target, PROMPT, max_new_tokens=12)
    assert generate(llama_target, PROMPT, eagle, max_new_tokens=12).tokens == vanilla.tokens


def test_auto_total_tokens_uses_the_cached_profile(llama_target, tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(plan, "MAX_SPREAD", float("inf"))  # save even when the test machine is busy
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e")
    drafter = drafter_for_head(tmp_path / "e", llama_target, tree="dynamic", depth=2, top_k=2, lookup=0)
    assert drafter.plan.tree == "dynamic" and 2 <= drafter.total_tokens <= 2 + 4
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 2  # verify and draft timings
    calls = []
    monkeypatch.setattr(plan, "measure_draft", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(plan, "measure_latency", lambda *a, **k: calls.append(1))
    again = drafter_for_head(tmp_path / "e", llama_target, tree="dynamic", depth=2, top_k=2, lookup=0)
    assert again.plan == drafter.plan and not calls  # the second time reads both profiles


@pytest.mark.parametrize("draft_seconds, expected", [(0.0, "chain"), (1.0, "none")])
def test_open_shape_may_choose_no_drafting(llama_target, tmp_path, monkeypatch, draft_seconds, expected):
    """With the shape left open, the measured draft cost decides: free drafting with a sure head drafts (a chain
    is cheapest to verify on a flat profile), drafting that costs a second a step is not worth it."""
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e", extra={"acceptance": [0.9, 0.9]})
    flat = {n: 0.01 for n in range(65)}
    monkeypatch.setattr(plan, "latency_profile", lambda target, sizes: flat)
    monkeypatch.setattr(plan, "draft_profile", lambda target, key, build, plans, plain: {p: draft_seconds for p in plans})
    drafter = drafter_for_head(tmp_path / "e", llama_target, top_k=1, lookup=0)
    assert drafter.plan.tree == expected
    if expected == "none":
        assert type(drafter) is Drafter and drafter.name == "eagle"
        assert isinstance(drafter_for_head(tmp_path / "e", llama_target, top_k=1), PromptLookupDrafter)
        vanilla = generate(llama_target, PROMPT, max_new_tokens=8)
        assert generate(llama_target, PROMPT, drafter, max_new_tokens=8).tokens == vanilla.tokens


def test_bad_arguments_are_rejected(llama_target, tmp_path):
    save_head(random_head(llama_target, "medusa", 1, num_heads=2), tmp_path / "m")
    with pytest.raises(ValueError, match="deeper than"):
        drafter_for_head(tmp_path / "m", llama_target, depth=3)
    with pytest.raises(ValueError, match="total-tokens"):
        drafter_for_head(tmp_path / "m", llama_target, total_tokens="lots")
    with pytest.raises(FileNotFoundError):
        drafter_for_head(tmp_path / "nothing", llama_target)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_random_head_on_smollm2_is_lossless(smollm2, tmp_path, kind):
    save_head(random_head(smollm2, kind, 2, list(range(4096)), scale=0.01), tmp_path / "h")
    drafter = drafter_for_head(tmp_path / "h", smollm2, tree="dynamic" if kind == "eagle" else "static", depth=2,
                               total_tokens=6, gate=False)  # always draft, nothing to measure
    ids = smollm2.encode("Name three colours.")
    vanilla = generate(smollm2, ids, max_new_tokens=12)
    assert generate(smollm2, ids, drafter, max_new_tokens=12).tokens == vanilla.tokens
