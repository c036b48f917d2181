"""KVCache: preallocated keys/values with per-row lengths.

Slot s of row b holds the K/V of that row's s-th token, so for committed tokens slot == position.
`forward` writes new K/V at slots [len, len + T) without moving `len`; `commit` moves it, and
`compact` first gathers an accepted tree path into contiguous slots.

Layout: head-major, [L, B, Hkv, S, Dh], or the same as a tuple of L per-layer buffers
[B, Hkv, S, Dh] (`per_layer=True`, what the decode loops use on XLA:CPU beside unstacked layers:
there a layer's slice of the stacked buffer is copied out before its attention products, every
layer, every step; `benchmarks/batch8_step_anatomy.md`). The attention's two products batch over (B, Hkv), so
each layer's [B, Hkv, S, Dh] slice is their operand as it lies. A token-major [L, B, S, Hkv, Dh]
cache made XLA:CPU write a transposed copy of every layer's whole K and V buffer on every step
(`benchmarks/foundation_cpu.md`, finding 3). New tokens' K/V stay token-major, [B, T, Hkv, Dh]
(what the projections produce); the writes below transpose those few rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models.config import ModelConfig
from jaxspec.placement import constrain_cache


@struct.dataclass
class KVCache:
    """A preallocated key/value cache of S slots per row, for every layer (a pytree).

    `KVCache.create(config, batch, max_len, dtype)` allocates it. `forward` writes new K/V at
    slots [lengths, lengths + T) without moving `lengths`; `commit` advances the committed length
    and `compact` gathers an accepted tree path into consecutive slots (speculative rounds).
    """

    k: jax.Array        # [L, B, Hkv, S, Dh], or a tuple of L [B, Hkv, S, Dh] (per_layer)
    v: jax.Array        # the same
    lengths: jax.Array  # [B] int32, committed tokens per row

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.per_layer else self.k.shape[3]

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32,
               per_layer: bool = False) -> "KVCache":
        """Zeros for `max_len` slots per row; per_layer: L separate [B, Hkv, S, Dh] buffers."""
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        if per_layer:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        else:
            k = jnp.zeros((config.num_layers, *shape), dtype)
            v = jnp.zeros((config.num_layers, *shape), dtype)
        cache = cls(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32))
        return constrain_cache(cache, config)  # split on the active mesh (use_mesh), if any

    def stacked(self) -> "KVCache":
        """The same cache with k, v as one [L, B, Hkv, S, Dh] buffer each."""
        if not self.per_layer:
            return self
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

    def layer(self, index: int | jax.Array):
        """Layer `index`'s (k, v), each [B, Hkv, S, Dh] (a Python int for a per-layer cache)."""
        if self.per_layer:
            return self.k[index], self.v[index]
        return (jax.lax.dynamic_index_in_dim(self.k, index, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, index, 0, keepdims=False))


def _slot_index(starts: jax.Array, t: int, kv_heads: int):
    """Advanced indices (rows [B, 1, 1], heads [1, Hkv, 1], slots [B, 1, T]) of slots
    starts[b] + t in a [B, Hkv, S, ...] buffer; they broadcast to [B, Hkv, T]."""
    rows = jnp.arange(starts.shape[0])[:, None, None]                   # [B, 1, 1]
    heads = jnp.arange(kv_heads)[None, :, None]                         # [1, Hkv, 1]
    slots = (starts[:, None] + jnp.arange(t)[None, :])[:, None, :]       # [B, 1, T]
    return rows, heads, slots


def _write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """One layer's buffer [B, Hkv, S, Dh] with new [B, T, Hkv, Dh] at slots starts[b] + t."""
    rows, heads, slots = _slot_index(starts, new.shape[1], new.shape[2])
    return buffer.at[rows, heads, slots].set(new.swapaxes(1, 2).astype(buffer.dtype), mode="drop")


def write_layer(cache_k, cache_v, layer: jax.Array | int, new_k: jax.Array, new_v: jax.Array,
                starts: jax.Array):
    """Write new_k/new_v [B, T, Hkv, Dh] into layer `layer` of the cache at slots starts[b] + t.

    cache_k, cache_v: [L, B, Hkv, S, Dh], or tuples of L [B, Hkv, S, Dh] (then `layer` is a
    Python int). Writes past the end of the buffer are dropped.
    """
    if isinstance(cache_k, tuple):
        cache_k = (*cache_k[:layer], _write_rows(cache_k[layer], new_k, starts), *cache_k[layer + 1:])
        cache_v = (*cache_v[:layer], _write_rows(cache_v[layer], new_v, starts), *cache_v[layer + 1:])
        return cache_k, cache_v
    rows, heads, slots = _slot_index(starts, new_k.shape[1], new_k.shape[2])
    layer = jnp.asarray(layer, jnp.int32)
    cache_k = cache_k.at[layer, rows, heads, slots].set(
        new_k.swapaxes(1, 2).astype(cache_k.dtype), mode="drop")          # [B, Hkv, T, Dh]
    cache_v = cache_v.at[layer, rows, heads, slots].set(
        new_v.swapaxes(1, 2).astype(cache_v.dtype), mode="drop")
    return cache_k, cache_v


def write_new(cache: KVCache, new_k: jax.Array, new_v: jax.Array) -> KVCache:
    """Write every layer's new K/V [L, B, T, Hkv, Dh] (from `forward_pending`) at slots
    [len, len + T) of each row; writes past the end of the buffer are dropped."""
    if cache.per_layer:
        return cache.replace(
            k=tuple(_write_rows(b, new_k[i], cache.lengths) for i, b in enumerate(cache.k)),
            v=tuple(_write_rows(b, new_v[i], cache.lengths) for i, b in enumerate(cache.v)))
    rows, heads, slots = _slot_index(cache.lengths, new_k.shape[2], new_k.shape[3])
    k = cache.k.at[:, rows, heads, slots].set(
        new_k.swapaxes(2, 3).astype(cache.k.dtype), mode="drop")          # [L, B, Hkv, T, Dh]
    v = cache.v.at[:, rows, heads, slots].set(
        new_v.swapaxes(2, 3).astype(cache.v.dtype), mode="drop")
    return cache.replace(k=k, v=v)


def commit(cache: KVCache, num_tokens: jax.Array) -> KVCache:
    """Advance each row's length by num_tokens [B] (the K/V must already be in place)."""
    return cache.replace(lengths=cache.lengths + num_tokens.astype(jnp.int32))


def compact(cache: KVCache, path: jax.Array, num_keep: jax.Array) -> KVCache:
    """Move the K/V of tree nodes `path` [B, P] (node offsets from `len`) to slots len + i.

    Only the first num_keep[b] entries of row b's path are moved; `len` is unchanged (call
    `commit` afterwards). For a chain (path[i] == i) this is the identity.
    """
    batch, p = path.shape
    kv_heads = cache.k[0].shape[1] if cache.per_layer else cache.k.shape[2]
    rows = jnp.arange(batch)[:, None, None]                          # [B, 1, 1]
    heads = jnp.arange(kv_heads)[None, :, None]                      # [1, Hkv, 1]
    src = (cache.lengths[:, None] + path)[:, None, :]                # [B, 1, P]
    dst = cache.lengths[:, None] + jnp.arange(p)[None, :]            # [B, P]
    dst = jnp.where(jnp.arange(p)[None, :] < num_keep[:, None], dst, cache.max_len)  # dropped
    dst = dst[:, None, :]                                            # [B, 1, P]
    if cache.per_layer:
        move = lambda b: b.at[rows, heads, dst].set(b[rows, heads, src], mode="drop")
        return cache.replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)))
    k_src = cache.k[:, rows, heads, src]                             # [L, B, Hkv, P, Dh]
    v_src = cache.v[:, rows, heads, src]
    k = cache.k.at[:, rows, heads, dst].set(k_src, mode="drop")
    v = cache.v.at[:, rows, heads, dst].set(v_src, mode="drop")
    return cache.replace(k=k, v=v)
