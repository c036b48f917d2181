"""forward_pending (the new tokens' K/V returned, the cache untouched) against forward.

The speculative loop scores every round's draft with `forward_pending` inside a conditional and
writes the K/V once afterwards (`cache.write_new`): a branch that wrote the cache would make XLA
copy the whole buffer per round. Both must give `forward`'s logits and cache, for every family
(sliding windows: mistral, gemma2/3; soft-caps: gemma2), under a tree mask, on ragged rows.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec.attention import attention, attention_pending
from jaxspec.models import commit
from jaxspec.models.cache import KVCache, compact, write_layer, write_new
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward, forward_pending, forward_step, new_cache, unstack_layers

VOCAB = 128
PROMPT_LENGTHS = (11, 6, 2)
PADDED = 12
CACHE_LEN = 40
# Tree of 6 nodes: parents [-1, 0, 0, 1, 1, 3] (depths 0 1 1 2 2 3)
PARENTS = (-1, 0, 0, 1, 1, 3)


def _ancestors(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    depth = np.zeros(n, np.int32)
    for i in range(n):
        node = i
        while node >= 0:
            mask[i, node] = True
            node = parents[node]
        depth[i] = mask[i].sum() - 1
    return mask, depth


def _prefilled(model, seed):
    rng = np.random.default_rng(seed)
    batch = len(PROMPT_LENGTHS)
    tokens = np.zeros((batch, PADDED), np.int32)
    for b, n in enumerate(PROMPT_LENGTHS):
        tokens[b, :n] = rng.integers(0, VOCAB, n)
    positions = jnp.broadcast_to(jnp.arange(PADDED, dtype=jnp.int32), (batch, PADDED))
    cache = KVCache.create(model.config, batch, CACHE_LEN)
    _, _, cache = jax.jit(forward)(model, jnp.asarray(tokens), cache, positions)
    return commit(cache, jnp.asarray(PROMPT_LENGTHS, jnp.int32)), rng


def _tree_round(model, seed):
    """A prefilled ragged cache and one round of the PARENTS tree on it: (cache, tokens [B, N],
    positions [B, N], masks [B, N, N])."""
    cache, rng = _prefilled(model, seed)
    batch, n = cache.lengths.shape[0], len(PARENTS)
    mask, depth = _ancestors(PARENTS)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (batch, n)), jnp.int32)
    positions = cache.lengths[:, None] + jnp.asarray(depth)[None, :]                   # [B, N]
    return cache, tokens, positions, jnp.broadcast_to(jnp.asarray(mask), (batch, n, n))


def test_forward_pending_matches_forward(checkpoint):
    model = checkpoint.model
    cache, tokens, positions, masks = _tree_round(model, seed=3)
    batch, n = tokens.shape

    logits, hidden, written = jax.jit(forward)(model, tokens, cache, positions, masks)
    p_logits, p_hidden, new_k, new_v = jax.jit(forward_pending)(model, tokens, cache, positions,
                                                                masks)
    L, hkv, dh = model.config.num_layers, model.config.num_kv_heads, model.config.head_dim
    assert new_k.shape == new_v.shape == (L, batch, n, hkv, dh)
    np.testing.assert_allclose(np.asarray(p_logits), np.asarray(logits), atol=1e-5, rtol=1e-5,
                               err_msg=checkpoint.family)
    np.testing.assert_allclose(np.asarray(p_hidden), np.asarray(hidden), atol=1e-5, rtol=1e-5)
    after = write_new(cache, new_k, new_v)
    np.testing.assert_allclose(np.asarray(after.k), np.asarray(written.k), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(after.v), np.asarray(written.v), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(after.lengths), np.asarray(cache.lengths))


def test_write_new_drops_slots_past_the_buffer():
    config = ModelConfig(family="llama", vocab_size=8, hidden_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4, intermediate_size=8,
                         max_position_embeddings=64)
    cache = KVCache.create(config, 2, 6)
    cache = commit(cache, jnp.asarray([1, 4], jnp.int32))
    new = jnp.ones((2, 2, 3, 1, 4))                                      # [L, B, T, Hkv, Dh]
    out = write_new(cache, new, 2 * new)
    k = np.asarray(out.k)
    assert k[:, 0, :, 1:4].min() == 1 and k[:, 0, :, [0, 4, 5]].max() == 0  # row 0: slots 1..3
    assert k[:, 1, :, 4:6].min() == 1 and k[:, 1, :, :4].max() == 0      # row 1: 4, 5; 6 dropped
    assert np.asarray(out.v)[:, 1, :, 4:6].min() == 2


def _per_layer(cache):
    return cache.replace(k=tuple(cache.k), v=tuple(cache.v))


def test_forward_step_on_a_per_layer_cache_matches_forward(checkpoint):
    """The CPU loops' step (per-layer buffers, pending K/V written after the forward) gives
    `forward`'s logits and cache, for every family, under a tree mask, on ragged rows."""
    model = checkpoint.model
    cache, tokens, positions, masks = _tree_round(model, seed=5)
    logits, hidden, written = jax.jit(forward)(model, tokens, cache, positions, masks)
    unstacked = model.replace(params=unstack_layers(model.params))
    per_layer = _per_layer(cache)
    assert per_layer.per_layer and per_layer.max_len == cache.max_len == CACHE_LEN
    s_logits, s_hidden, stepped = jax.jit(forward_step)(unstacked, tokens, per_layer, positions,
                                                        masks)
    assert stepped.per_layer and len(stepped.k) == model.config.num_layers
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), atol=1e-5, rtol=1e-5,
                               err_msg=checkpoint.family)
    np.testing.assert_allclose(np.asarray(s_hidden), np.asarray(hidden), atol=1e-5, rtol=1e-5)
    restacked = stepped.stacked()
    np.testing.assert_allclose(np.asarray(restacked.k), np.asarray(written.k), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(restacked.v), np.asarray(written.v), atol=1e-5, rtol=1e-5)


def test_per_layer_cache_writes_and_moves_as_the_stacked_one(checkpoints):
    config = checkpoints["llama"].model.config
    rng = np.random.default_rng(0)
    stacked = KVCache.create(config, 3, 16)
    shape = stacked.k.shape
    stacked = stacked.replace(k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                              v=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                              lengths=jnp.asarray([0, 5, 9], jnp.int32))
    per_layer = _per_layer(stacked)
    L, B, H, _, D = shape
    new = jnp.asarray(rng.standard_normal((L, B, 4, H, D)), jnp.float32)          # [L, B, T, Hkv, Dh]
    path = jnp.asarray([[0, 2, 3], [0, 1, 3], [0, 3, 1]], jnp.int32)
    keep = jnp.asarray([3, 2, 1], jnp.int32)
    for op in (lambda c: write_new(c, new, 2 * new), lambda c: compact(write_new(c, new, new), path, keep),
               lambda c: c.replace(**dict(zip("kv", write_layer(c.k, c.v, 1, new[1], -new[1],
                                                                c.lengths))))):
        expected, actual = op(stacked), op(per_layer)
        assert actual.per_layer
        np.testing.assert_array_equal(np.asarray(actual.stacked().k), np.asarray(expected.k))
        np.testing.assert_array_equal(np.asarray(actual.stacked().v), np.asarray(expected.v))
    fresh = KVCache.create(config, 2, 7, per_layer=True)
    assert fresh.per_layer and len(fresh.k) == L and fresh.k[0].shape == (2, H, 7, D)


def test_new_cache_is_per_layer_beside_unstacked_layers_and_refused_by_a_scan(checkpoints):
    model = checkpoints["llama"].model
    assert not new_cache(model, 2, 8).per_layer
    unstacked = model.replace(params=unstack_layers(model.params))
    cache = new_cache(unstacked, 2, 8)
    assert cache.per_layer
    tokens, positions = jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="a per-layer KVCache needs the layers unstacked"):
        forward(model, tokens, cache, positions)


@pytest.mark.parametrize("impl, window, softcap, small_max", [
    ("xla", None, None, 16), ("xla", 5, None, 16), ("xla", None, 0.7, 16),
    ("xla", 5, 0.7, 2), ("pallas_interpret", None, None, 16)])
def test_attention_pending_matches_attention_on_a_written_cache(impl, window, softcap, small_max,
                                                                monkeypatch):
    # small_max 2 < T: the new tokens' products as batched dots rather than multiply-adds
    monkeypatch.setattr(sys.modules["jaxspec.attention"], "SMALL_PRODUCT_MAX", small_max)
    rng = np.random.default_rng(0)
    batch, t, hq, hkv, d, s = 3, 6, 4, 2, 64, 32
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = normal(batch, t, hq, d), normal(batch, hkv, s, d), normal(batch, hkv, s, d)
    new_k, new_v = normal(batch, t, hkv, d), normal(batch, t, hkv, d)
    lengths = jnp.asarray([0, 9, s - t], jnp.int32)
    mask = jnp.broadcast_to(jnp.asarray(_ancestors(PARENTS)[0]), (batch, t, t))
    positions = lengths[:, None] + jnp.asarray(_ancestors(PARENTS)[1])[None, :]
    rows, heads = jnp.arange(batch)[:, None, None], jnp.arange(hkv)[None, :, None]
    slots = (lengths[:, None] + jnp.arange(t)[None, :])[:, None, :]       # [B, 1, T]
    k_written = k.at[rows, heads, slots].set(new_k.swapaxes(1, 2))        # [B, Hkv, S, D]
    v_written = v.at[rows, heads, slots].set(new_v.swapaxes(1, 2))
    args = dict(scale=0.125, sliding_window=window, query_positions=positions, softcap=softcap)
    expected = attention(q, k_written, v_written, lengths, mask, impl="xla", **args)
    # the slots the new tokens will take hold stale values in the unwritten cache: ignored
    actual = attention_pending(q, k, v, lengths, new_k, new_v, mask, impl=impl, **args)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_a_sized_round_does_not_copy_the_cache(checkpoints):
    """The optimized HLO of a sized speculative program holds no more whole-cache copies than
    the autoregressive program (it held 14 against 2 when the conditional's branches wrote the
    cache: 52 MB each for SmolLM2 at batch 8)."""
    model = checkpoints["llama"].model
    batch, tp, new = 4, 8, 8
    prompts = jnp.zeros((batch, tp), jnp.int32)
    lengths = jnp.full((batch,), tp, jnp.int32)
    sampling = js.Sampling(temperature=0.0)
    sized = js.PromptLookup(ngram=2, num_tokens=8, sizing={1: 1.0, 2: 1.5, 4: 2.0, 8: 3.0})
    c = model.config

    def copies(drafter):
        program = jax.jit(lambda m, p, l, key: js.speculative.generate_tokens(
            m, drafter, p, l, new, sampling, key)[0].tokens)
        hlo = program.lower(model, prompts, lengths, jax.random.PRNGKey(0)).compile().as_text()
        shape = rf"f32\[{c.num_layers},{batch},{c.num_kv_heads},\d+,{c.head_dim}\]"  # [L, B, Hkv, S, Dh]
        return len(re.findall(shape + r"\{[^}]*\} copy\(", hlo))

    assert copies(sized) <= max(copies(None), 2)
    # a pinned size (no conditional) writes the new K/V in place with `forward`
    pinned = js.PromptLookup(ngram=2, num_tokens=8, sizing=None)
    assert copies(pinned) <= max(copies(None), 2)
