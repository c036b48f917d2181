"""What every decode loop shares: the token-level output, prefill, stop masks, static-shape
buckets and the cache of compiled programs.

The autoregressive baseline (`jaxspec.autoregressive`) and the speculative loop
(`jaxspec.speculative.loop`) both build on this module; the host entries (`jaxspec.api`) run
their programs through `PROGRAMS`.
"""

from __future__ import annotations

import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models.cache import KVCache, commit
from jaxspec.models.transformer import Model, forward, lm_head

# Number of times each generation program was compiled (tests assert on it).
COMPILATIONS: Counter = Counter()


@struct.dataclass
class TokenOutput:
    """What the token-level generators return (all arrays)."""

    tokens: jax.Array           # [B, M] int32, generated tokens, pad_id after each row's end
    lengths: jax.Array          # [B] int32, generated tokens per row (stop token included)
    target_steps: jax.Array     # [B] int32, target forward passes while the row was active
    drafted: jax.Array          # [B] int32, draft tokens proposed for the row
    accepted: jax.Array         # [B] int32, draft tokens accepted
    accepted_by_position: jax.Array  # [B, K] int32, accepted count per draft position (K>=1)


def prefill(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, cache: KVCache,
            all_hidden: bool = False):
    """Run right-padded prompts [B, Tp] through the model and commit them.

    Returns (logits after each row's last prompt token [B, V], hidden there [B, D], cache);
    with all_hidden, the hidden states of every prompt position [B, Tp, D] instead (feature
    drafters read them).
    """
    batch, tp = prompt_tokens.shape
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (batch, tp))
    _, hidden_all, cache = forward(model, prompt_tokens, cache, positions)
    last = jnp.clip(prompt_lengths - 1, 0, tp - 1)
    rows = jnp.arange(batch)
    cache = commit(cache, prompt_lengths)
    hidden = hidden_all[rows, last]                                  # [B, D]
    # The LM head on the last positions only: forward's [B, Tp, V] logits are dead code.
    logits = lm_head(model.params, hidden, model.config)
    return logits, (hidden_all if all_hidden else hidden), cache


def stop_mask(tokens: jax.Array, stop_tokens: jax.Array) -> jax.Array:
    """tokens [B, ...] -> bool [B, ...]: is the token one of its row's stop tokens.

    stop_tokens: [K] shared by every row, or [B, K] per row (padded with -1, which matches
    nothing); K may be 0."""
    if stop_tokens.shape[-1] == 0:
        return jnp.zeros(tokens.shape, bool)
    if stop_tokens.ndim == 2:  # per row: broadcast over the token axes after the batch axis
        stop_tokens = stop_tokens.reshape(stop_tokens.shape[0], *([1] * (tokens.ndim - 1)),
                                          stop_tokens.shape[1])
    return jnp.any(tokens[..., None] == stop_tokens, axis=-1)


def bucket(n: int, minimum: int = 16) -> int:
    """The static size used for a dynamic length n: the next power of two >= max(n, minimum)."""
    size = minimum
    while size < n:
        size *= 2
    return size


class _ProgramCache:
    """Compiled programs keyed by static arguments and argument shapes.

    Compiling ahead of time (lower + compile) lets `generate` report compile time apart from
    decode time; COMPILATIONS counts real compilations per program name.
    """

    def __init__(self):
        self._programs = {}
        self.last_memory_bytes = 0  # arguments + outputs + temporaries of the last program used
        self.last_compiled = None   # the last program used (jaxspec bench --profile reads its HLO)

    def get(self, name: str, fn, static: tuple, args: tuple):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (name, static, treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves))
        if key not in self._programs:
            start = time.perf_counter()
            compiled = jax.jit(fn, static_argnums=tuple(range(len(static)))).lower(
                *static, *args).compile()
            self._programs[key] = (compiled, time.perf_counter() - start, _program_bytes(compiled))
            COMPILATIONS[name] += 1
            self.last_memory_bytes = self._programs[key][2]
            self.last_compiled = compiled
            return compiled, self._programs[key][1]
        self.last_memory_bytes = self._programs[key][2]
        self.last_compiled = self._programs[key][0]
        return self._programs[key][0], 0.0


def _program_bytes(compiled) -> int:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return 0


# The process-wide program cache. Look it up as `decoding.PROGRAMS` at call time (not
# `from jaxspec.decoding import PROGRAMS`) so that replacing it (tests do) takes effect.
PROGRAMS = _ProgramCache()
