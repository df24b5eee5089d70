import pytest

from koala.decode import generate
from koala.drafters.eagle import EagleDrafter
from koala.drafters.factory import drafter_for_head
from koala.drafters.gate import GatedDrafter
from koala.drafters.medusa import MedusaDrafter
from koala.heads.checkpoint import save_head
from test_drafters_medusa import PROMPT, random_head


def test_defaults_per_head_kind(llama_target, tmp_path):
    save_head(random_head(llama_target, "medusa", 2, num_heads=3), tmp_path / "m")
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e", extra={"acceptance": [0.8, 1.0]})
    medusa = drafter_for_head(tmp_path / "m", llama_target, total_tokens="6")
    assert isinstance(medusa, GatedDrafter) and isinstance(medusa.inner, MedusaDrafter)  # gated by default
    assert medusa.tree == "static" and medusa.depth == 3
    assert len(medusa.paths) == 6
    eagle = drafter_for_head(tmp_path / "e", llama_target, total_tokens=5, gate=False)
    assert isinstance(eagle, EagleDrafter) and eagle.tree == "dynamic" and eagle.total_tokens == 5
    chain = drafter_for_head(tmp_path / "e", llama_target, tree="chain", depth=2)
    assert chain.paths == [(0,), (0, 0)]
    vanilla = generate(llama_target, PROMPT, max_new_tokens=12)
    assert generate(llama_target, PROMPT, eagle, max_new_tokens=12).tokens == vanilla.tokens


def test_auto_total_tokens_uses_the_cached_profile(llama_target, tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_HOME", str(tmp_path / "cache"))
    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e")
    drafter = drafter_for_head(tmp_path / "e", llama_target, depth=2, top_k=2)
    assert 1 <= drafter.total_tokens <= 2 + 4
    assert list((tmp_path / "cache" / "tree_size").glob("*.json"))


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
    drafter = drafter_for_head(tmp_path / "h", smollm2, total_tokens=6, gate=False)  # always draft
    ids = smollm2.encode("Name three colours.")
    vanilla = generate(smollm2, ids, max_new_tokens=12)
    assert generate(smollm2, ids, drafter, max_new_tokens=12).tokens == vanilla.tokens
