"""Drafters: one file each; they know nothing of each other, except the combinator hybrid.py
(a trained Eagle chain and prompt lookup, chosen per row and round)."""

from jaxspec.speculative.drafters.draft_model import DraftModel
from jaxspec.speculative.drafters.eagle import Eagle
from jaxspec.speculative.drafters.hybrid import Hybrid
from jaxspec.speculative.drafters.medusa import Medusa
from jaxspec.speculative.drafters.prompt_lookup import PromptLookup
from jaxspec.speculative.drafters.token_recycling import TokenRecycling

__all__ = ["DraftModel", "Eagle", "Hybrid", "Medusa", "PromptLookup", "TokenRecycling"]
