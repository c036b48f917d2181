"""Speculative decoding: trees, acceptance rules, the draft -> verify -> commit loop, drafters."""

from jaxspec.speculative import trees
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.loop import generate_tokens
from jaxspec.speculative.verify import Verdict, verify

__all__ = ["Context", "Draft", "Verdict", "generate_tokens", "trees", "verify"]
