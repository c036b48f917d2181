"""Beam search and Diverse Beam Search: token-level, static-shape, callable inside jax.jit."""

from jaxspec.search.beam import BeamOutput, beam_search_tokens, check_beam_arguments

__all__ = ["BeamOutput", "beam_search_tokens", "check_beam_arguments"]
