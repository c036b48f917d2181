"""KV caches under tree speculation: after every commit the caches hold the accepted tokens
contiguously, exactly as a plain autoregressive run over the same tokens would.

Reuses the greedy runs of test_tree_drafters (same programs, no recompilation): the target's
final cache is compared slot by slot, up to its committed length, with a causal forward over
prompt + generated tokens; the draft model's own cache likewise (up to one slot less: the deepest
accepted node is re-fed at the next round).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models.cache import KVCache
from jaxspec.models.transformer import forward
from test_tree_drafters import GREEDY_DRAFTERS, PROMPTS, drafter, greedy_run, models


@functools.partial(jax.jit, static_argnames=("max_len",))
def _plain_cache(model, tokens, max_len):
    """K/V [L, B, Hkv, S, Dh] of a causal forward over tokens [B, S] from an empty cache."""
    batch, t = tokens.shape
    cache = KVCache.create(model.config, batch, max_len, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    _, _, cache = forward(model, tokens, cache, positions)
    return cache.k, cache.v


def _sequences(out):
    """prompt + generated tokens per row, right-padded with 0: [B, S]."""
    lengths = np.asarray(out.lengths)
    seqs = [list(p) + list(np.asarray(out.tokens)[b, :lengths[b]]) for b, p in enumerate(PROMPTS)]
    width = 64
    tokens = np.zeros((len(seqs), width), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
    return jnp.asarray(tokens), [len(s) for s in seqs]


def _assert_same_slots(cache_k, cache_v, ref_k, ref_v, upto):
    for b, n in enumerate(upto):
        np.testing.assert_allclose(np.asarray(cache_k)[:, b, :, :n], np.asarray(ref_k)[:, b, :, :n],
                                   atol=2e-5, rtol=1e-4, err_msg=f"row {b} keys")
        np.testing.assert_allclose(np.asarray(cache_v)[:, b, :, :n], np.asarray(ref_v)[:, b, :, :n],
                                   atol=2e-5, rtol=1e-4, err_msg=f"row {b} values")


@pytest.mark.parametrize("name", GREEDY_DRAFTERS)
def test_target_cache_matches_plain_run(name):
    out, _, cache = greedy_run(name)
    tokens, seq_lengths = _sequences(out)
    committed = np.asarray(cache.lengths)
    # Every emitted token but the last (the next round's root) is committed.
    np.testing.assert_array_equal(committed, np.asarray(seq_lengths) - 1)
    target, _ = models()
    ref_k, ref_v = _plain_cache(target, tokens, tokens.shape[1])
    _assert_same_slots(cache.k, cache.v, ref_k, ref_v, committed)


@pytest.mark.parametrize("name", [n for n in GREEDY_DRAFTERS if n.startswith(("static", "dynamic"))])
def test_draft_cache_matches_plain_run(name):
    out, state, cache = greedy_run(name)
    tokens, _ = _sequences(out)
    ref_k, ref_v = _plain_cache(drafter(name).model, tokens, tokens.shape[1])
    _assert_same_slots(state.cache.k, state.cache.v, ref_k, ref_v, np.asarray(cache.lengths) - 1)
