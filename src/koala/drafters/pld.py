"""Prompt lookup decoding: propose what followed the latest earlier occurrence of the last n-gram.

Free to run (no model), and strong on tasks that copy from the prompt (summarisation, RAG, code editing).
"""
from __future__ import annotations


from koala.drafters.base import Drafter
from koala.tree import DraftTree


def lookup(ids: list[int], max_ngram: int, num_tokens: int, min_ngram: int = 1) -> list[int]:
    """Tokens following the most recent earlier match of the longest suffix n-gram (longest n first)."""
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        suffix = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == suffix:
                return ids[start + n:start + n + num_tokens]
    return []


class PromptLookupDrafter(Drafter):
    name = "pld"

    def __init__(self, max_ngram: int = 3, num_tokens: int = 8, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram or num_tokens < 1:
            raise ValueError("need 1 <= min_ngram <= max_ngram and num_tokens >= 1")
        self.max_ngram, self.num_tokens, self.min_ngram = max_ngram, num_tokens, min_ngram

    def propose(self, ids: list[int]) -> DraftTree:
        return DraftTree.chain(lookup(ids, self.max_ngram, self.num_tokens, self.min_ngram))
