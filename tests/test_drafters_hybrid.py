"""FirstOf: prompt lookup where the text repeats, a head elsewhere; both keep observing."""
import pytest

from koala.decode import generate
from koala.drafters import Drafter
from koala.drafters.eagle import EagleDrafter
from koala.drafters.hybrid import FirstOf
from koala.drafters.pld import PromptLookupDrafter
from koala.tree import DraftTree
from test_drafters_medusa import PROMPT, random_head


class Spy(Drafter):
    def __init__(self, tokens):
        self.tokens, self.proposed, self.observed = tokens, 0, 0

    def propose(self, ids):
        self.proposed += 1
        return DraftTree.chain(self.tokens)

    def observe(self, hidden, next_ids):
        self.observed += 1


def test_first_non_empty_proposal_wins_and_every_drafter_observes(llama_target):
    empty, full, never = Spy([]), Spy([3, 4]), Spy([5])
    drafter = FirstOf([empty, full, never])
    assert drafter.name == "vanilla+vanilla+vanilla" and drafter.propose([1, 2]).tokens.tolist() == [3, 4]
    assert (empty.proposed, full.proposed, never.proposed) == (1, 1, 0)
    generate(llama_target, PROMPT, drafter, max_new_tokens=5)
    assert empty.observed == full.observed == never.observed > 0
    with pytest.raises(ValueError):
        FirstOf([])


def test_lookup_then_head_is_lossless(llama_target):
    head = EagleDrafter(random_head(llama_target, "eagle", 1), tree="chain", depth=2)
    prompt = PROMPT + PROMPT[:8]  # repeats itself, so lookup has matches
    drafter = FirstOf([PromptLookupDrafter(min_ngram=2), head])
    plain = generate(llama_target, prompt, max_new_tokens=24)
    out = generate(llama_target, prompt, drafter, max_new_tokens=24)
    assert out.tokens == plain.tokens and out.stats.drafted_tokens > 0
    twin = drafter.fork()
    assert twin.drafters[1] is not head and twin.drafters[1].head is head.head
