"""The reference heads shipped in heads/smollm2-135m/: small, loadable on the default target, and lossless."""
from pathlib import Path

import pytest

from koala.decode import generate
from koala.drafters.factory import drafter_for_head

HEADS = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m"
NAMES = ["medusa", "medusa-koala", "eagle", "eagle-koala", "eagle3", "eagle3-koala"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_head_is_small_and_documented(name):
    files = {p.name: p.stat().st_size for p in (HEADS / name).iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shipped_head_is_lossless_on_smollm2(smollm2, name):
    prompt = "Write three short tips for learning a new language."
    reference = generate(smollm2, prompt, max_new_tokens=40)
    drafter = drafter_for_head(HEADS / name, smollm2, total_tokens=4, gate=False)  # the head itself, always drafting
    result = generate(smollm2, prompt, drafter, max_new_tokens=40)
    assert result.tokens == reference.tokens
    assert result.stats.target_forwards < reference.stats.target_forwards  # the trained head does get accepted
