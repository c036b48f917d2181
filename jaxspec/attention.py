"""The one place that picks an attention implementation.

Semantics shared by every implementation (the contract the Pallas kernels are tested against):
Layout: q and the new tokens' K/V are token-major, [B, T, H, D]; a cache layer's k, v are
head-major, [B, Hkv, S, D] (the KVCache layout), so both products batch over (B, Hkv) with the
cache operand as it lies: no per-step transposed copy of the cache.

Row b's T new queries attend to
  * every committed cache slot s < lengths[b], and
  * new-token slot lengths[b] + j when mask[b, t, j] is true (the new tokens' K/V are already
    written at slots [lengths[b], lengths[b] + T)).
`mask=None` means causal among the new tokens (prefill, chains, one-token decode).
`attention_pending` has the same semantics with the new tokens' K/V passed beside a cache that
does not hold them yet (the speculative loop's conditional branches, which must not write the
cache: XLA copies a whole cache buffer that a conditional's branches update).
With `sliding_window=W` a query at position p also sees only keys at positions > p - W (for the
layers where `use_window` holds; None = always). With `softcap=c` the scores s become
c * tanh(s / c) before masking (gemma2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")

_NEG = -1e30  # finite "minus infinity": a query with nothing visible gives zeros, not NaN

# Backends on which the Pallas kernel has been compiled and checked against the reference on
# real hardware (step 2 of benchmarks/device_suite.py). "auto" picks Pallas only there: the kernel
# lowers for both TPU (Mosaic) and GPU (Triton) in the CPU test suite, but lowering does not run
# the backend compilers, so an unverified kernel must not become every GPU user's default.
PALLAS_VERIFIED_BACKENDS: frozenset = frozenset()


def resolve_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl == "auto":
        backend = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
        return "pallas" if backend in PALLAS_VERIFIED_BACKENDS else "xla"
    return impl


def causal_mask(batch: int, t: int) -> jax.Array:
    """The default mask among T new tokens: [B, T, T] bool lower triangle."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))


def visibility(lengths: jax.Array, mask: jax.Array, max_len: int) -> jax.Array:
    """Which cache slots each new query sees: [B, T, S] bool.

    lengths: [B]; mask: [B, T, T] among the new tokens.
    """
    slots = jnp.arange(max_len)[None, :]                       # [1, S]
    committed = slots < lengths[:, None]                        # [B, S]
    new_index = slots - lengths[:, None]                        # [B, S]
    t = mask.shape[-1]
    in_new = (new_index >= 0) & (new_index < t)                 # [B, S]
    gathered = jnp.take_along_axis(
        mask, jnp.broadcast_to(jnp.clip(new_index, 0, t - 1)[:, None, :],
                               (mask.shape[0], mask.shape[1], max_len)), axis=2)  # [B, T, S]
    return committed[:, None, :] | (in_new[:, None, :] & gathered)


def _product(spec: str, a, b):
    """einsum(spec, a, b) accumulated in float32.

    On XLA:CPU, bfloat16 / float16 operands are widened first (exactly): its runtime has no
    mixed low-precision -> float32 dot for the batched products YNNPACK does not take
    ("Unsupported element type for DotThunk"). Elsewhere the operands go in as they are.
    """
    if jax.default_backend() == "cpu" and jnp.float32 not in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def xla_attention(q, k, v, lengths, mask, *, scale, sliding_window=None, query_positions=None,
                  use_window=None, softcap=None):
    """Reference attention over the whole cache buffer.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D]; lengths: [B]; mask: [B, T, T] bool.
    query_positions: [B, T], needed only with sliding_window. use_window: a traced bool [] (a
    scanned layer's kind) or None.
    """
    batch, t, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = hq // hkv
    visible = visibility(lengths, mask, s)                                   # [B, T, S]
    if sliding_window is not None:
        slots = jnp.arange(s)[None, :]
        new_index = jnp.clip(slots - lengths[:, None], 0, t - 1)             # [B, S]
        key_pos = jnp.where(slots < lengths[:, None], slots,
                            jnp.take_along_axis(query_positions, new_index, axis=1))
        in_window = (query_positions[:, :, None] - key_pos[:, None, :]) < sliding_window
        if use_window is not None:
            in_window |= jnp.logical_not(use_window)
        visible &= in_window
    qg = q.reshape(batch, t, hkv, groups, d)                                 # [B, T, K, G, D]
    scores = _product("BTKGD,BKSD->BKGTS", qg, k) * scale                   # [B, K, G, T, S]
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(visible[:, None, None], scores, _NEG)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(visible[:, None, None], weights, 0.0)
    out = _product("BKGTS,BKSD->BTKGD", weights.astype(v.dtype), v)         # [B, T, K, G, D]
    return out.reshape(batch, t, hq, d).astype(q.dtype)


def _resolved_options(batch, t, mask, sliding_window, use_window):
    """The mask (None -> causal [B, T, T]) and the window options with a static layer kind folded
    in: a Python-bool use_window picks the window or none; no window -> use_window None."""
    if mask is None:
        mask = causal_mask(batch, t)
    if isinstance(use_window, (bool, np.bool_)):   # a static layer kind
        sliding_window, use_window = (sliding_window if use_window else None), None
    if sliding_window is None:
        use_window = None
    return mask, sliding_window, use_window


# Up to this many new tokens, `xla_attention_pending` scores them against each other with
# broadcast multiply-adds (fused loops) instead of batched dots: on XLA:CPU each tiny batched dot
# is a thunk of its own, and at batch 8 those two per layer cost about 4 ms of a 27 ms step.
SMALL_PRODUCT_MAX = 16


def _new_token_scores(qg, new_k):
    """Scores of T queries against the T new keys, float32. qg: [B, T, K, G, D]; new_k:
    [B, T, K, D] -> [B, K, G, T, T]."""
    if qg.shape[1] > SMALL_PRODUCT_MAX:
        return _product("BTKGD,BNKD->BKGTN", qg, new_k.astype(qg.dtype))
    queries = qg.astype(jnp.float32).transpose(0, 2, 3, 1, 4)                # [B, K, G, T, D]
    keys = new_k.astype(jnp.float32).transpose(0, 2, 1, 3)                   # [B, K, N, D]
    return jnp.sum(queries[:, :, :, :, None, :] * keys[:, :, None, None, :, :], axis=-1)


def _new_token_values(weights, new_v):
    """weights [B, K, G, T, N] (float32) times the new values [B, N, K, D] -> [B, K, G, T, D]."""
    if weights.shape[-1] > SMALL_PRODUCT_MAX:
        return _product("BKGTN,BNKD->BKGTD", weights, new_v.astype(jnp.float32))
    values = new_v.astype(jnp.float32).transpose(0, 2, 1, 3)                 # [B, K, N, D]
    return jnp.sum(weights[..., None] * values[:, :, None, None, :, :], axis=-2)


def xla_attention_pending(q, k, v, lengths, new_k, new_v, mask, *, scale, sliding_window=None,
                          query_positions=None, use_window=None, softcap=None):
    """Reference attention over committed cache slots plus K/V not yet in the cache.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D] (slots >= lengths[b] are ignored); new_k, new_v:
    [B, T, Hkv, D] the new tokens' own K/V; mask: [B, T, T] among them. One softmax over both
    parts, taken apart (a shared maximum, two sums; no [.., S + T] concatenation); no copy of the
    cache.
    """
    batch, t, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = hq // hkv
    committed = jnp.broadcast_to((jnp.arange(s)[None, :] < lengths[:, None])[:, None, :],
                                 (batch, t, s))                             # [B, T, S]
    if sliding_window is not None:
        in_window_c = (query_positions[:, :, None] - jnp.arange(s)[None, None, :]) < sliding_window
        in_window_n = (query_positions[:, :, None] - query_positions[:, None, :]) < sliding_window
        if use_window is not None:
            in_window_c |= jnp.logical_not(use_window)
            in_window_n |= jnp.logical_not(use_window)
        committed &= in_window_c
        mask = mask & in_window_n
    committed, mask = committed[:, None, None], mask[:, None, None]          # [B, 1, 1, T, S|T]
    qg = q.reshape(batch, t, hkv, groups, d)                                 # [B, T, K, G, D]
    cache_scores = _product("BTKGD,BKSD->BKGTS", qg, k) * scale              # [B, K, G, T, S]
    new_scores = _new_token_scores(qg, new_k) * scale                        # [B, K, G, T, T]
    if softcap is not None:
        cache_scores = jnp.tanh(cache_scores / softcap) * softcap
        new_scores = jnp.tanh(new_scores / softcap) * softcap
    cache_scores = jnp.where(committed, cache_scores, _NEG)
    new_scores = jnp.where(mask, new_scores, _NEG)
    top = jnp.maximum(jnp.max(cache_scores, axis=-1, keepdims=True),
                      jnp.max(new_scores, axis=-1, keepdims=True))           # [B, K, G, T, 1]
    cache_weights = jnp.where(committed, jnp.exp(cache_scores - top), 0.0)
    new_weights = jnp.where(mask, jnp.exp(new_scores - top), 0.0)
    total = (jnp.sum(cache_weights, axis=-1, keepdims=True)
             + jnp.sum(new_weights, axis=-1, keepdims=True))                 # [B, K, G, T, 1]
    out = (_product("BKGTS,BKSD->BKGTD", cache_weights.astype(v.dtype), v)
           + _new_token_values(new_weights, new_v))                          # [B, K, G, T, D]
    out = out / jnp.where(total > 0, total, 1.0)     # nothing visible: zeros, as `attention`
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, t, hq, d).astype(q.dtype)


def attention_pending(q, k, v, lengths, new_k, new_v, mask=None, *, scale, impl="auto",
                      sliding_window=None, query_positions=None, use_window=None, softcap=None):
    """`attention` for new tokens whose K/V [B, T, Hkv, D] are not written into k, v [B, Hkv, S, D]
    yet.

    The XLA implementation scores the cache and the new tokens separately (no cache copy). The
    Pallas kernel reads the new K/V from the cache buffer, so it gets a per-layer copy with them
    written in (correct, and one layer's buffer rather than the whole cache).
    """
    batch, t = q.shape[:2]
    mask, sliding_window, use_window = _resolved_options(batch, t, mask, sliding_window, use_window)
    if resolve_impl(impl) == "xla" or sliding_window is not None or softcap is not None:
        return xla_attention_pending(q, k, v, lengths, new_k, new_v, mask, scale=scale,
                                     sliding_window=sliding_window, query_positions=query_positions,
                                     use_window=use_window, softcap=softcap)
    rows = jnp.arange(batch)[:, None, None]                                  # [B, 1, 1]
    heads = jnp.arange(k.shape[1])[None, :, None]                            # [1, Hkv, 1]
    slots = (lengths[:, None] + jnp.arange(t)[None, :])[:, None, :]          # [B, 1, T]
    k = k.at[rows, heads, slots].set(new_k.swapaxes(1, 2).astype(k.dtype), mode="drop")
    v = v.at[rows, heads, slots].set(new_v.swapaxes(1, 2).astype(v.dtype), mode="drop")
    return attention(q, k, v, lengths, mask, scale=scale, impl=impl, query_positions=query_positions)


def attention(q, k, v, lengths, mask=None, *, scale, impl="auto", sliding_window=None,
              query_positions=None, use_window=None, softcap=None):
    """Attention of T new queries over a KV cache layer; see the module docstring.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D]; lengths: [B] int32; mask: [B, T, T] bool or None.
    use_window: None, a Python bool or a traced bool [] (does this layer use sliding_window).
    Returns [B, T, Hq, D] in q's dtype.
    """
    batch, t = q.shape[:2]
    mask, sliding_window, use_window = _resolved_options(batch, t, mask, sliding_window, use_window)
    impl = resolve_impl(impl)
    if impl == "xla" or sliding_window is not None or softcap is not None:  # Pallas: neither
        return xla_attention(q, k, v, lengths, mask, scale=scale, sliding_window=sliding_window,
                             query_positions=query_positions, use_window=use_window,
                             softcap=softcap)
    from pallas_kernels.tree_attention import tree_attention  # only importer of pallas_kernels

    return tree_attention(q, k, v, lengths, mask, scale=scale,
                          interpret=impl == "pallas_interpret")
