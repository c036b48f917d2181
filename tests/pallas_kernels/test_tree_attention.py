"""Tree attention kernel: interpret mode vs the pure-jnp reference, the reference vs the XLA path,
and lowering for TPU (Mosaic) and CUDA (Triton) on CPU for every shipped configuration.

Interpret mode compiles one program per shape, so the case table is small and each case mixes
several features (T, GQA ratio, head dim, dtype, mask kind, kernel family, split-K, padding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.attention import attention, xla_attention
from pallas_kernels.tree_attention import (
    SHIPPED_CONFIGS,
    tree_attention,
    tree_attention_reference,
)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def tree_mask(rng, t):
    """Ancestor mask (self included) of a random tree: node i's parent is a node before it."""
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
    mask = np.zeros((t, t), bool)
    for i in range(t):
        node = i
        while node >= 0:
            mask[i, node] = True
            node = parents[node]
    return mask


def chain_mask(t):
    return np.tril(np.ones((t, t), bool))


def make_inputs(seed, *, batch, t, q_heads, kv_heads, head_dim, slots, dtype, mask_kind):
    """Random q, k, v; ragged lengths from 0 to S - T; one mask per row."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q = normal(batch, t, q_heads, head_dim)                          # [B, T, Hq, D]
    k = normal(batch, kv_heads, slots, head_dim)                     # [B, Hkv, S, D]
    v = normal(batch, kv_heads, slots, head_dim)                     # [B, Hkv, S, D]
    lengths = [0, slots - t] + [int(rng.integers(0, slots - t + 1)) for _ in range(batch - 2)]
    lengths = jnp.asarray(lengths[:batch], jnp.int32)               # [B]
    if mask_kind == "chain":
        mask = np.stack([chain_mask(t)] * batch)
    else:
        mask = np.stack([tree_mask(rng, t) for _ in range(batch)])   # [B, T, T]
    return q, k, v, lengths, jnp.asarray(mask)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=tol, rtol=tol)


# (T, Hq, Hkv, D, S, B, dtype, mask, backend, kernel kwargs). Lengths always include 0 and S - T.
# S = 200 and 192 are not multiples of the KV block (padding path); D = 64 on the TPU family
# checks a [block_k, 64] block; rows = T * Hq / Hkv = 640 spans several query blocks.
CASES = [
    (1, 8, 1, 128, 64, 3, jnp.float32, "chain", "gpu", {}),
    (1, 8, 1, 128, 256, 3, jnp.bfloat16, "chain", "tpu", dict(block_k=128)),
    (4, 4, 4, 64, 128, 2, jnp.float32, "tree", "tpu", {}),
    (4, 8, 2, 128, 256, 2, jnp.bfloat16, "tree", "gpu", dict(block_k=32, num_splits=3)),
    (16, 8, 1, 64, 256, 3, jnp.float32, "tree", "gpu", dict(block_k=16, block_q=32)),
    (16, 8, 8, 128, 256, 2, jnp.bfloat16, "chain", "tpu", dict(block_k=128, num_splits=2)),
    (64, 4, 1, 128, 256, 2, jnp.float32, "tree", "tpu", dict(block_k=128, block_q=64)),
    (64, 4, 4, 64, 192, 2, jnp.bfloat16, "tree", "gpu", {}),
    (80, 8, 1, 64, 256, 2, jnp.float32, "tree", "gpu", {}),
    (80, 4, 2, 64, 200, 2, jnp.bfloat16, "chain", "tpu", dict(block_k=128, num_splits=2)),
]


@pytest.mark.parametrize(
    "t, q_heads, kv_heads, head_dim, slots, batch, dtype, mask_kind, backend, kwargs", CASES,
    ids=[f"T{c[0]}-H{c[1]}x{c[2]}-D{c[3]}-S{c[4]}-{jnp.dtype(c[6]).name}-{c[7]}-{c[8]}"
         for c in CASES])
def test_interpret_matches_reference(t, q_heads, kv_heads, head_dim, slots, batch, dtype,
                                     mask_kind, backend, kwargs):
    q, k, v, lengths, mask = make_inputs(t, batch=batch, t=t, q_heads=q_heads, kv_heads=kv_heads,
                                         head_dim=head_dim, slots=slots, dtype=dtype,
                                         mask_kind=mask_kind)
    scale = 1.0 / math.sqrt(head_dim)
    out = tree_attention(q, k, v, lengths, mask, scale=scale, interpret=True, backend=backend,
                         **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, tree_attention_reference(q, k, v, lengths, mask, scale=scale), dtype)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_query_that_sees_nothing_gives_zeros(backend):
    """Row 0 has no committed tokens and its first query's mask row is empty."""
    q, k, v, lengths, mask = make_inputs(7, batch=2, t=4, q_heads=4, kv_heads=2, head_dim=128,
                                         slots=128, dtype=jnp.float32, mask_kind="tree")
    mask = mask.astype(jnp.int32).at[0, 0].set(0)  # also checks that a 0/1 int mask is accepted
    out = tree_attention(q, k, v, lengths, mask, scale=0.1, interpret=True, backend=backend,
                         num_splits=2)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)
    assert_close(out, tree_attention_reference(q, k, v, lengths, mask, scale=0.1), jnp.float32)


@pytest.mark.parametrize("t, q_heads, kv_heads, dtype, mask_kind", [
    (1, 4, 4, jnp.float32, "chain"),
    (5, 8, 2, jnp.float32, "tree"),
    (16, 8, 1, jnp.bfloat16, "tree"),
])
def test_reference_matches_xla_attention(t, q_heads, kv_heads, dtype, mask_kind):
    q, k, v, lengths, mask = make_inputs(100 + t, batch=3, t=t, q_heads=q_heads,
                                         kv_heads=kv_heads, head_dim=64, slots=96, dtype=dtype,
                                         mask_kind=mask_kind)
    mask = mask.at[0, 0].set(False)  # a query with nothing visible: both must give zeros
    expected = xla_attention(q, k, v, lengths, mask, scale=0.125)
    actual = tree_attention_reference(q, k, v, lengths, mask, scale=0.125)
    # Both paths round the softmax weights to the value dtype the same way; only summation
    # order differs.
    assert_close(actual, expected, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)


@pytest.mark.parametrize("mask_kind", [None, "tree"])
def test_attention_pallas_interpret_matches_xla(mask_kind):
    q, k, v, lengths, mask = make_inputs(11, batch=2, t=8, q_heads=4, kv_heads=2, head_dim=64,
                                         slots=64, dtype=jnp.float32, mask_kind="tree")
    mask = None if mask_kind is None else mask  # None: causal among the new tokens
    expected = attention(q, k, v, lengths, mask, scale=0.125, impl="xla")
    actual = attention(q, k, v, lengths, mask, scale=0.125, impl="pallas_interpret")
    assert_close(actual, expected, jnp.float32)


@pytest.mark.parametrize("change, message", [
    (dict(k_heads=4), "multiple of kv heads"),
    (dict(k_dim=32), "k and v must"),
    (dict(mask_t=3), "mask must be"),
    (dict(lengths_b=1), "lengths must be"),
    (dict(kwargs=dict(backend="npu")), "unknown backend"),
    (dict(kwargs=dict(backend="gpu", block_k=48)), "powers of two"),
    (dict(kwargs=dict(backend="tpu", block_k=64)), "block_k % 128"),
    (dict(kwargs=dict(num_splits=0)), "num_splits"),
])
def test_bad_input_is_refused(change, message):
    q = jnp.zeros((2, 4, 6, 64))
    k = jnp.zeros((2, change.get("k_heads", 2), 32, change.get("k_dim", 64)))
    t = change.get("mask_t", 4)
    mask = jnp.ones((2, t, t), bool)
    lengths = jnp.zeros((change.get("lengths_b", 2),), jnp.int32)
    with pytest.raises(ValueError, match=message):
        tree_attention(q, k, k, lengths, mask, scale=0.1, interpret=True,
                       **change.get("kwargs", {}))


# ----------------------------------------------------------------------------------------------
# Lowering on CPU for the real targets: catches block-shape and primitive errors that interpret
# mode does not.

PLATFORM = {"tpu": "tpu", "gpu": "cuda"}
KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}
# Each backend module raises ImportError when this jaxlib was built without it.
BACKEND_MODULE = {"tpu": "jax._src.pallas.mosaic.pallas_call_registration",
                  "gpu": "jax._src.pallas.triton.pallas_call_registration"}

# (T, Hq, Hkv, D, S, B, dtype, num_splits): decode with GQA 4:1; a 16-node tree; T = 80 with
# D = 64 and a capacity that is not a block multiple; a long context with explicit split-K.
LOWERING_SHAPES = [
    (1, 32, 8, 128, 4096, 2, jnp.bfloat16, None),
    (16, 8, 1, 128, 1024, 2, jnp.float32, None),
    (80, 4, 4, 64, 1000, 1, jnp.bfloat16, None),
    (64, 32, 8, 128, 32768, 8, jnp.bfloat16, 4),
]


def lower_for(fn, args, platform):
    """Lower `fn` for `platform` from this CPU host, on whichever API this jax offers."""
    jitted = jax.jit(fn)
    if hasattr(jitted, "trace"):
        return jitted.trace(*args).lower(lowering_platforms=(platform,))
    from jax._src.interpreters import mlir  # jax without .trace (older than the minimum)

    return jitted.lower(*args, _private_parameters=mlir.LoweringParameters(
        platforms=(platform,)))


@pytest.mark.parametrize("backend", sorted(SHIPPED_CONFIGS))
def test_lowers_for_target_platform(backend):
    import importlib

    try:
        importlib.import_module(BACKEND_MODULE[backend])
    except ImportError as err:
        pytest.skip(f"this jaxlib cannot lower Pallas for {PLATFORM[backend]}: {err}")
    config = SHIPPED_CONFIGS[backend]
    for t, q_heads, kv_heads, head_dim, slots, batch, dtype, num_splits in LOWERING_SHAPES:
        args = (jax.ShapeDtypeStruct((batch, t, q_heads, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, kv_heads, slots, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, kv_heads, slots, head_dim), dtype),
                jax.ShapeDtypeStruct((batch,), jnp.int32),
                jax.ShapeDtypeStruct((batch, t, t), jnp.bool_))
        fn = functools.partial(tree_attention, scale=0.1, backend=backend,
                               block_k=config.block_k, block_q=config.block_q,
                               num_splits=num_splits if num_splits else config.num_splits,
                               num_warps=config.num_warps, num_stages=config.num_stages)
        text = lower_for(fn, args, PLATFORM[backend]).as_text()
        assert KERNEL_CALL[backend] in text, (backend, t, head_dim)
