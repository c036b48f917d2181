"""Drafters: one file each; they know nothing of each other."""

from jaxspec.speculative.drafters.draft_model import DraftModel
from jaxspec.speculative.drafters.eagle import Eagle
from jaxspec.speculative.drafters.medusa import Medusa
from jaxspec.speculative.drafters.prompt_lookup import PromptLookup
from jaxspec.speculative.drafters.token_recycling import TokenRecycling

__all__ = ["DraftModel", "Eagle", "Medusa", "PromptLookup", "TokenRecycling"]
