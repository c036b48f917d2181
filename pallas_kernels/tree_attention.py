"""Tree attention: the T new queries of each row over one layer of the KV cache.

Contract (shared with `jaxspec.attention.xla_attention`): query t of row b sees every committed
slot s < lengths[b] and new-token slot lengths[b] + j where mask[b, t, j]; the new tokens' K/V are
already written at slots [lengths[b], lengths[b] + T). Query head h reads kv head h // (Hq // Hkv).
Softmax runs in float32; a query that sees nothing returns zeros.

Kernel design (flash-decoding):
  * One program owns one row b, one kv head and a block of query rows. The rows are the T queries
    times the G = Hq // Hkv query heads that share the kv head, laid out t-major ([T * G, D]), so
    every K/V block is read once per group instead of once per query head.
  * The cache is cut into blocks of `block_k` slots. Only the blocks holding committed slots
    (s < lengths[b]) are visited; everything past them is skipped, so cost follows the actual
    length, not the cache capacity.
  * The new tokens are not read from the cache blocks: the wrapper gathers their T keys/values
    (a [B, T, Hkv, D] slice, small next to the cache) and the kernel attends to them once, densely,
    under the tree mask. This keeps the tree mask a plain [rows, T] operand instead of a
    per-block gather at a data-dependent offset, which neither Mosaic nor Triton does well.
  * Online softmax over (new tokens, prefix blocks) in float32.
  * Split-K (`num_splits`): the committed blocks of a row are cut into `num_splits` runs of
    nearly equal length (by the row's actual length), each run is reduced by its own program,
    and a log-sum-exp combine in the wrapper merges them. This is what fills a GPU when
    batch * kv heads is small and the context is long.

Two kernel bodies share the block math (`_online_softmax_step`, `_finalize`):
  * TPU (Mosaic): the KV blocks are the innermost, sequential grid axis; `lengths` is
    scalar-prefetched so the K/V index maps can stop advancing past the last committed block
    (the pipeline then skips the copy) and `pl.when` skips the compute.
  * GPU (Triton lowering): a program gets its row's whole cache for one kv head as a block and
    loops over the committed blocks with a `fori_loop` whose bound comes from the row's length.
    Pallas's newer Mosaic GPU backend targets Hopper/Blackwell only and prefers `plgpu.kernel`;
    the Triton lowering runs on Ampere and newer and on ROCm, is still supported (if deprecated)
    in jax 0.11, and a decode-time kernel is bound by memory bandwidth, where Mosaic GPU's
    TMA/wgmma advantages matter little. Triton compiler params are always passed explicitly so
    the Triton backend is chosen whatever `jax_pallas_use_mosaic_gpu` says.

The style guide asks for an *unbatched* `pallas_call` wrapper under a vmap. Here the batch is a
grid axis instead: `vmap` of a `pallas_call` with scalar-prefetched operands falls back to a
Python-level loop over the batch (see jax's pallas_call batching rule), and the TPU path needs
`lengths` scalar-prefetched. Both backends keep the same layout for symmetry.

Layout: the cache layer is head-major, [B, Hkv, S, D] (jaxspec's KVCache layout), and both
backends read it in place: a program's K/V block is a [block_k, D] (TPU) or [S, D] (GPU) tile of
one (row, kv head), which satisfies Mosaic's tiling rule for any D (the last block dim is the
whole head). A cache whose capacity is not a multiple of the KV block, or (GPU) a head dim that is
not a power of two, is padded (a copy); size caches to multiples of `block_k`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Compiler-parameter classes were renamed across jax releases; accept either spelling.
_TPUCompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
_TritonCompilerParams = (getattr(pltriton, "CompilerParams", None)
                         or getattr(pltriton, "TritonCompilerParams"))

_NEG = -1e30  # finite "minus infinity": avoids inf - inf = NaN in the running max

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static tiling of one backend.

    block_k: cache slots per KV block. TPU: a multiple of 128. GPU: a power of two >= 16.
    block_q: query rows (T * G) per program. TPU: a multiple of 8. GPU: a power of two >= 16.
    num_splits: split-K factor over the committed prefix; None picks one from the grid size.
    num_warps, num_stages: Triton launch parameters (GPU only).
    """

    block_k: int
    block_q: int
    num_splits: int | None = 1
    num_warps: int | None = None
    num_stages: int | None = None


# Shipped configurations. Neither is tuned on hardware yet: `benchmarks/gpu_tree_attention.py`
# sweeps the GPU one. TPU: 512-slot blocks keep the MXU busy and each K/V copy large (512 x 128
# bf16 = 128 KiB) while the whole working set stays ~2 MiB of VMEM; TPU cores are few and the
# (batch, kv head) grid axes already spread over them, so no split-K by default.
# GPU: 64 x 64 tiles with 4 warps keep the f32 accumulator and scores in registers; split-K is
# chosen per call (`_gpu_num_splits`) to give the streaming multiprocessors enough programs.
TPU_CONFIG = BlockConfig(block_k=512, block_q=256, num_splits=1)
GPU_CONFIG = BlockConfig(block_k=64, block_q=64, num_splits=None, num_warps=4, num_stages=2)
SHIPPED_CONFIGS = {"tpu": TPU_CONFIG, "gpu": GPU_CONFIG}

# Programs to aim for when choosing split-K on GPU: about two waves on a 132-SM H100.
_GPU_TARGET_PROGRAMS = 256
_GPU_MAX_SPLITS = 64


# ----------------------------------------------------------------------------------------------
# Layer 1: kernel bodies.


def _online_softmax_step(carry, q, k, v, visible, scale):
    """One flash-attention update of the running (max, sum, accumulator) with a block of keys.

    carry: m [R, 1], l [R, 1], acc [R, D], all float32; q: [R, D]; k, v: [N, D];
    visible: [R, N] bool.
    """
    m_prev, l_prev, acc_prev = carry
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * scale         # [R, N]
    s = jnp.where(visible, s, _NEG)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))        # [R, 1]
    alpha = jnp.exp(m_prev - m_next)                                         # [R, 1]
    # Masked entries are zeroed explicitly: with a finite _NEG, a row that has seen nothing yet
    # has m == _NEG and exp(s - m) would be 1 there.
    p = jnp.where(visible, jnp.exp(s - m_next), 0.0)                        # [R, N]
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)             # [R, 1]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)                # [R, D]
    return m_next, l_next, alpha * acc_prev + pv


def _finalize(m, l, acc):
    """Normalized output [R, D] and log-sum-exp [R, 1]; rows that saw nothing give 0 and _NEG."""
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / l_safe, 0.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), _NEG)
    return out, lse


def _split_range(length, block_k, split, num_splits):
    """Prefix blocks [start, stop) that split `split` reduces.

    The blocks holding committed slots (s < length) are cut into `num_splits` runs of nearly
    equal size, by the row's actual length so that short rows still use every split.
    """
    # lax.div (C-style) rather than `//`: the operands are non-negative, and jnp's floor division
    # lowers through `sign`, whose Mosaic rule needs to know the TPU generation.
    needed = lax.div(length + (block_k - 1), block_k)
    per_split = lax.div(needed + (num_splits - 1), num_splits)
    start = split * per_split
    return start, jnp.minimum(start + per_split, needed)


def _tpu_kv_block(length, split, step, *, block_k, num_splits):
    """Cache block read at grid step `step` of split `split`: past the split's last block the
    index stops moving, so the TPU pipeline issues no further copies."""
    start, stop = _split_range(length, block_k, split, num_splits)
    return jnp.maximum(jnp.minimum(start + step, stop - 1), 0)


def _tpu_kernel(lengths_ref,           # [B] int32, SMEM (scalar prefetch)
                q_ref,                 # [R, D] query rows, t-major then group
                k_ref, v_ref,          # [bk, D] one block of the cache
                k_new_ref, v_new_ref,  # [Tn, D] the new tokens' keys / values
                mask_ref,              # [R, Tn] int32, tree mask per query row
                o_ref,                 # [R, D]
                lse_ref,               # [R, 1] float32
                m_ref, l_ref,          # [R, 1] float32 scratch: running max and sum
                acc_ref,               # [R, D] float32 scratch: running numerator
                *, scale, block_k, num_splits):
    b, split, step = pl.program_id(0), pl.program_id(3), pl.program_id(4)
    length = lengths_ref[b]
    start, stop = _split_range(length, block_k, split, num_splits)
    rows = q_ref.shape[0]

    def update(k, v, visible):
        carry = (m_ref[...], l_ref[...], acc_ref[...])
        m_ref[...], l_ref[...], acc_ref[...] = _online_softmax_step(
            carry, q_ref[...], k, v, visible, scale)

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((step == 0) & (split == 0))
    def _new_tokens():
        update(k_new_ref[...], v_new_ref[...], mask_ref[...] != 0)

    block = start + step

    @pl.when(block < stop)
    def _prefix_block():
        slots = block * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        update(k_ref[...], v_ref[...], slots < length)

    @pl.when(step == pl.num_programs(4) - 1)
    def _store():
        out, lse = _finalize(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _gpu_kernel(length_ref,            # [] int32, this row's committed length
                q_ref,                 # [R, D] query rows, t-major then group
                k_ref, v_ref,          # [S, D] this row's whole cache for one kv head
                k_new_ref, v_new_ref,  # [Tn, D] the new tokens' keys / values
                mask_ref,              # [R, Tn] int32, tree mask per query row
                o_ref,                 # [R, D]
                lse_ref,               # [R, 1] float32
                *, scale, block_k, num_splits):
    split = pl.program_id(3)
    length = length_ref[()]
    start, stop = _split_range(length, block_k, split, num_splits)
    q = q_ref[...]
    rows, head_dim = q.shape
    carry = (jnp.full((rows, 1), _NEG, jnp.float32),
             jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    carry = lax.cond(
        split == 0,
        lambda c: _online_softmax_step(c, q, k_new_ref[...], v_new_ref[...],
                                       mask_ref[...] != 0, scale),
        lambda c: c,
        carry)

    def body(block, carry):
        first = pl.multiple_of(block * block_k, block_k)
        slots = first + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        window = pl.ds(first, block_k)
        return _online_softmax_step(carry, q, k_ref[window, :], v_ref[window, :],
                                    slots < length, scale)

    carry = lax.fori_loop(start, stop, body, carry)
    out, lse = _finalize(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


# ----------------------------------------------------------------------------------------------
# Layer 2: pallas_call wrappers over prepared (padded, regrouped) operands.


def _check_operands(q_rows, k, k_new, mask_rows, lengths, *, block_k, block_q, num_splits):
    """Shape checks shared by both wrappers; returns (B, Hkv, R, D, S, Tn)."""
    batch, kv_heads, rows, head_dim = q_rows.shape
    assert k.ndim == 4 and k.shape[:2] == (batch, kv_heads) and k.shape[3] == head_dim, (
        k.shape, q_rows.shape)
    slots, new = k.shape[2], k_new.shape[2]
    assert k_new.shape == (batch, kv_heads, new, head_dim), k_new.shape
    assert mask_rows.shape == (batch, rows, new), (mask_rows.shape, rows, new)
    assert mask_rows.dtype == jnp.int32, mask_rows.dtype
    assert lengths.shape == (batch,) and lengths.dtype == jnp.int32, lengths
    assert rows % block_q == 0, (rows, block_q)
    assert slots % block_k == 0, (slots, block_k)
    assert 1 <= num_splits <= slots // block_k, (num_splits, slots, block_k)
    return batch, kv_heads, rows, head_dim, slots, new


def _out_shapes(batch, kv_heads, num_splits, rows, head_dim, out_dtype):
    return (jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, 1), jnp.float32))


def _tree_attention_tpu_call(q_rows, k, v, k_new, v_new, mask_rows, lengths, *, scale,
                             block_k, block_q, num_splits, out_dtype, interpret):
    """Mosaic TPU kernel over prepared operands.

    q_rows: [B, Hkv, R, D]; k, v: [B, Hkv, S, D]; k_new, v_new: [B, Hkv, Tn, D];
    mask_rows: [B, R, Tn] int32;
    lengths: [B] int32. Returns o [B, Hkv, P, R, D] (out_dtype) and lse [B, Hkv, P, R, 1] f32,
    one entry per split P.
    """
    batch, kv_heads, rows, head_dim, slots, new = _check_operands(
        q_rows, k, k_new, mask_rows, lengths,
        block_k=block_k, block_q=block_q, num_splits=num_splits)
    assert block_k % 128 == 0 and block_q % 8 == 0, (block_k, block_q)
    steps = pl.cdiv(slots // block_k, num_splits)  # static bound on blocks per split
    kv_block = functools.partial(_tpu_kv_block, block_k=block_k, num_splits=num_splits)

    kv_spec = pl.BlockSpec((None, None, block_k, head_dim),
                           lambda b, h, i, p, j, lens: (b, h, kv_block(lens[b], p, j), 0))
    new_spec = pl.BlockSpec((None, None, new, head_dim), lambda b, h, i, p, j, lens: (b, h, 0, 0))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, rows // block_q, num_splits, steps),
        in_specs=[
            pl.BlockSpec((None, None, block_q, head_dim),
                         lambda b, h, i, p, j, lens: (b, h, i, 0)),           # q_rows
            kv_spec, kv_spec,                                                 # k, v
            new_spec, new_spec,                                               # k_new, v_new
            pl.BlockSpec((None, block_q, new), lambda b, h, i, p, j, lens: (b, i, 0)),  # mask
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_q, head_dim),
                         lambda b, h, i, p, j, lens: (b, h, p, i, 0)),
            pl.BlockSpec((None, None, None, block_q, 1),
                         lambda b, h, i, p, j, lens: (b, h, p, i, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
    )
    kernel = functools.partial(_tpu_kernel, scale=scale, block_k=block_k, num_splits=num_splits)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=_out_shapes(batch, kv_heads, num_splits, rows, head_dim, out_dtype),
        compiler_params=_TPUCompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="tree_attention_tpu",
    )(lengths, q_rows, k, v, k_new, v_new, mask_rows)


def _tree_attention_gpu_call(q_rows, k, v, k_new, v_new, mask_rows, lengths, *, scale,
                             block_k, block_q, num_splits, num_warps, num_stages, out_dtype,
                             interpret):
    """Triton kernel over prepared operands.

    q_rows: [B, Hkv, R, D]; k, v: [B, Hkv, S, D]; k_new, v_new: [B, Hkv, Tn, D];
    mask_rows: [B, R, Tn] int32; lengths: [B] int32. Returns o [B, Hkv, P, R, D] (out_dtype) and
    lse [B, Hkv, P, R, 1] f32, one entry per split P.
    """
    batch, kv_heads, rows, head_dim, slots, new = _check_operands(
        q_rows, k, k_new, mask_rows, lengths,
        block_k=block_k, block_q=block_q, num_splits=num_splits)

    def pow2_at_least_16(n):
        return n >= 16 and n & (n - 1) == 0

    # Triton tensors must have power-of-two shapes, and tl.dot needs every dim >= 16.
    assert all(map(pow2_at_least_16, (block_k, block_q, head_dim, new))), (
        block_k, block_q, head_dim, new)

    kernel = functools.partial(_gpu_kernel, scale=scale, block_k=block_k, num_splits=num_splits)
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, rows // block_q, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, i, p: (b,)),                           # lengths
            pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, p: (b, h, i, 0)),
            pl.BlockSpec((None, None, slots, head_dim), lambda b, h, i, p: (b, h, 0, 0)),  # k
            pl.BlockSpec((None, None, slots, head_dim), lambda b, h, i, p: (b, h, 0, 0)),  # v
            pl.BlockSpec((None, None, new, head_dim), lambda b, h, i, p: (b, h, 0, 0)),  # k_new
            pl.BlockSpec((None, None, new, head_dim), lambda b, h, i, p: (b, h, 0, 0)),  # v_new
            pl.BlockSpec((None, block_q, new), lambda b, h, i, p: (b, i, 0)),        # mask
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_q, head_dim),
                         lambda b, h, i, p: (b, h, p, i, 0)),
            pl.BlockSpec((None, None, None, block_q, 1), lambda b, h, i, p: (b, h, p, i, 0)),
        ],
        out_shape=_out_shapes(batch, kv_heads, num_splits, rows, head_dim, out_dtype),
        compiler_params=_TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="tree_attention_gpu",
    )(lengths, q_rows, k, v, k_new, v_new, mask_rows)


# ----------------------------------------------------------------------------------------------
# Layer 3: the public jitted function.


def _round_up(n, m):
    return -(-n // m) * m


def _next_pow2(n):
    return 1 << max(0, n - 1).bit_length()


def _resolve_backend(backend, interpret):
    if backend is None:
        platform = jax.default_backend()
        if platform == "tpu":
            return "tpu"
        if platform in ("gpu", "cuda", "rocm"):
            return "gpu"
        if not interpret:
            raise ValueError(f"tree_attention needs a GPU or TPU (default backend is {platform!r});"
                             " pass interpret=True to run the kernel in interpret mode")
        # Interpret mode on CPU: either family runs; the tests pass `backend` to cover both.
        return "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    return backend


def _gpu_num_splits(programs, num_blocks):
    """Split-K for GPU: enough programs for about two waves, at most one split per block."""
    return max(1, min(pl.cdiv(_GPU_TARGET_PROGRAMS, programs), num_blocks, _GPU_MAX_SPLITS))


def _combine_splits(o, lse):
    """Merge per-split results. o: [B, K, P, R, D] f32 (each normalized); lse: [B, K, P, R, 1]."""
    seen = lse > 0.5 * _NEG                                                  # [B, K, P, R, 1]
    top = jnp.max(lse, axis=2, keepdims=True)                                # [B, K, 1, R, 1]
    weight = jnp.where(seen, jnp.exp(lse - top), 0.0)                        # [B, K, P, R, 1]
    total = jnp.sum(weight, axis=2)                                          # [B, K, R, 1]
    out = jnp.sum(weight * o, axis=2)                                        # [B, K, R, D]
    return jnp.where(total > 0.0, out / jnp.where(total > 0.0, total, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "backend", "block_k",
                                             "block_q", "num_splits", "num_warps", "num_stages"))
def tree_attention(q, k, v, lengths, mask, *, scale, interpret=False, backend=None,
                   block_k=None, block_q=None, num_splits=None, num_warps=None, num_stages=None):
    """Attention of T new queries over a KV cache layer with a tree mask among the new tokens.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D] (head-major, the KVCache layout) with the new tokens'
    K/V already at slots [lengths[b], lengths[b] + T); lengths: [B] int32 (0 <= lengths[b] <= S - T);
    mask: [B, T, T] bool or 0/1 int, query t sees new token j iff mask[b, t, j].
    Returns [B, T, Hq, D] in q's dtype.

    scale is static (a Python float). backend: "tpu" or "gpu" picks the kernel family
    (None: from the default device; interpret mode on CPU uses the GPU family). Block sizes,
    split-K and Triton launch parameters default to SHIPPED_CONFIGS[backend]; num_splits=None
    means 1 on TPU and an occupancy heuristic on GPU.
    """
    batch, new, q_heads, head_dim = q.shape
    if k.ndim != 4 or (k.shape[0], k.shape[3]) != (batch, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B, Hkv, S, D] with B = {batch}, D = {head_dim}; "
                         f"got {k.shape} and {v.shape}")
    kv_heads, slots = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    if mask.shape != (batch, new, new):
        raise ValueError(f"mask must be [B, T, T] = {(batch, new, new)}; got {mask.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B] = {(batch,)}; got {lengths.shape}")
    if new > slots:
        raise ValueError(f"{new} new tokens do not fit a cache of {slots} slots")

    backend = _resolve_backend(backend, interpret)
    config = SHIPPED_CONFIGS[backend]
    block_k = config.block_k if block_k is None else block_k
    block_q = config.block_q if block_q is None else block_q
    num_warps = config.num_warps if num_warps is None else num_warps
    num_stages = config.num_stages if num_stages is None else num_stages
    num_splits = config.num_splits if num_splits is None else num_splits
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None; got {num_splits}")

    groups = q_heads // kv_heads
    rows = new * groups
    if backend == "gpu":
        if block_k < 16 or block_k & (block_k - 1) or block_q < 16 or block_q & (block_q - 1):
            raise ValueError(f"GPU block sizes must be powers of two >= 16; got {block_k=}, "
                             f"{block_q=}")
        dim_p = _next_pow2(max(head_dim, 16))
        new_p = _next_pow2(max(new, 16))
        bq = min(block_q, _next_pow2(max(rows, 16)))
        bk = min(block_k, _next_pow2(max(slots, 16)))
    else:
        if block_k % 128 or block_q % 8:
            raise ValueError(f"TPU needs block_k % 128 == 0 and block_q % 8 == 0; got "
                             f"{block_k=}, {block_q=}")
        dim_p = head_dim
        new_p = _round_up(new, 128)  # lane-aligned, so the new-token matmuls are full tiles
        bq = min(block_q, _round_up(rows, 16))
        bk = min(block_k, _round_up(slots, 128))
    rows_p = _round_up(rows, bq)
    slots_p = _round_up(slots, bk)
    num_blocks = slots_p // bk
    num_splits = (_gpu_num_splits(batch * kv_heads * (rows_p // bq), num_blocks)
                  if num_splits is None else min(num_splits, num_blocks))

    lengths = lengths.astype(jnp.int32)
    # Query rows grouped by kv head, t-major: row t * G + g is query head h * G + g at step t.
    q_rows = q.reshape(batch, new, kv_heads, groups, head_dim)               # [B, T, K, G, D]
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_p - rows), (0, dim_p - head_dim)))
    mask_rows = jnp.repeat(mask.astype(jnp.int32), groups, axis=1)          # [B, R, T]
    mask_rows = jnp.pad(mask_rows, ((0, 0), (0, rows_p - rows), (0, new_p - new)))

    def new_tokens(cache):  # [B, K, S, D] -> the T new tokens' entries, [B, K, Tn, Dp]
        taken = jax.vmap(lambda c, n: lax.dynamic_slice_in_dim(c, n, new, axis=1))(cache, lengths)
        return jnp.pad(taken, ((0, 0), (0, 0), (0, new_p - new), (0, dim_p - head_dim)))

    def padded_cache(cache):  # [B, K, Sp, Dp]; no copy unless S or D needs padding
        if slots_p == slots and dim_p == head_dim:
            return cache
        return jnp.pad(cache, ((0, 0), (0, 0), (0, slots_p - slots), (0, dim_p - head_dim)))

    k_new, v_new = new_tokens(k), new_tokens(v)
    k_blocks, v_blocks = padded_cache(k), padded_cache(v)

    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    common = dict(scale=scale, block_k=bk, block_q=bq, num_splits=num_splits,
                  out_dtype=out_dtype, interpret=interpret)
    if backend == "tpu":
        o, lse = _tree_attention_tpu_call(q_rows, k_blocks, v_blocks, k_new, v_new, mask_rows,
                                          lengths, **common)
    else:
        o, lse = _tree_attention_gpu_call(q_rows, k_blocks, v_blocks, k_new, v_new, mask_rows,
                                          lengths, num_warps=num_warps, num_stages=num_stages,
                                          **common)
    out = o[:, :, 0] if num_splits == 1 else _combine_splits(o, lse)       # [B, K, Rp, Dp]
    out = out[:, :, :rows, :head_dim].reshape(batch, kv_heads, new, groups, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, new, q_heads, head_dim).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Pure-jnp reference.


def tree_attention_reference(q, k, v, lengths, mask, *, scale):
    """Same contract as `tree_attention`, written directly over the whole cache.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D]; lengths: [B]; mask: [B, T, T]. Returns [B, T, Hq, D].
    """
    batch, new, q_heads, head_dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    slot = jnp.arange(slots)                                                  # [S]
    committed = slot[None, :] < lengths[:, None]                              # [B, S]
    # new_at[b, j, s]: slot s holds new token j of row b.
    new_at = slot[None, None, :] == (lengths[:, None, None] + jnp.arange(new)[None, :, None])
    sees_new = jnp.einsum("BTJ,BJS->BTS", mask.astype(jnp.int32),
                          new_at.astype(jnp.int32)) > 0                       # [B, T, S]
    visible = committed[:, None, :] | sees_new                                # [B, T, S]
    qg = q.reshape(batch, new, kv_heads, groups, head_dim)                   # [B, T, K, G, D]
    # float32 products of the (exactly widened) operands: XLA:CPU cannot run every batched
    # bfloat16 x bfloat16 -> float32 dot.
    f32 = lambda x: x.astype(jnp.float32)
    scores = jnp.einsum("BTKGD,BKSD->BKGTS", f32(qg), f32(k)) * scale        # [B, K, G, T, S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)                                           # 0 where hidden
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("BKGTS,BKSD->BTKGD", f32(weights.astype(v.dtype)), f32(v))  # [B, T, K, G, D]
    return out.reshape(batch, new, q_heads, head_dim).astype(q.dtype)
