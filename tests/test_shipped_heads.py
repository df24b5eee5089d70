"""The reference heads shipped in heads/smollm2-135m/: small, loadable on the default target, and lossless."""
from pathlib import Path

import pytest

from koala.decode import generate, generate_batch
from koala.drafters.factory import drafter_for_head

HEADS = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m"
NAMES = ["medusa", "medusa-koala", "eagle", "eagle-koala", "eagle3", "eagle3-koala"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_head_is_small_and_documented(name):
    files = {p.name: p.stat().st_size for p in (HEADS / name).iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20


PROMPT = "Write three short tips for learning a new language."


@pytest.fixture(scope="module")
def reference(smollm2):
    """The target's own greedy answer, computed once for all six heads."""
    return generate(smollm2, PROMPT, max_new_tokens=40)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shipped_head_is_lossless_on_smollm2(smollm2, reference, name):
    drafter = drafter_for_head(HEADS / name, smollm2, total_tokens=4, gate=False)  # the head itself, always drafting
    result = generate(smollm2, PROMPT, drafter, max_new_tokens=40)
    assert result.tokens == reference.tokens
    assert result.stats.target_forwards < reference.stats.target_forwards  # the trained head does get accepted


@pytest.mark.slow
def test_bf16_speculation_is_lossless_on_smollm2():
    """With exact attention (koala.exact_attention) and row-invariant linears (koala.invariant_linear), a wide bf16
    verify (49 rows) gives the plain bf16 step's tokens; with SDPA 2 of these 3 answers drifted alone, 1 in the batch."""
    from koala.target import load_target

    target = load_target(dtype="bf16")
    prompts = ["Summarize the causes of the French Revolution.", "Write a Python function that reverses a list.",
               "What is 17 times 23? Explain."]
    references = []
    for prompt in prompts:
        references.append(generate(target, prompt, max_new_tokens=40).tokens)
        drafter = drafter_for_head(HEADS / "eagle", target, tree="dynamic", depth=4, top_k=4, total_tokens=48,
                                   gate=False, lookup=0)
        assert generate(target, prompt, drafter, max_new_tokens=40).tokens == references[-1], prompt
    # in a batch of 2 the third prompt joins while the others verify trees: its prompt (SDPA) shares their forward
    batch = generate_batch(target, prompts, lambda: drafter_for_head(
        HEADS / "eagle", target, tree="dynamic", depth=4, top_k=4, total_tokens=32, gate=False, lookup=0),
        max_new_tokens=40, batch_size=2)
    assert [r.tokens for r in batch] == references
