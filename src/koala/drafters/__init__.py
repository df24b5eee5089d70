"""Drafters propose draft trees; the decode loop verifies them. `Drafter` itself proposes nothing (vanilla)."""
from koala.drafters.base import Drafter
from koala.drafters.pld import PromptLookupDrafter

__all__ = ["Drafter", "PromptLookupDrafter"]
