"""KVCache: preallocated keys/values with per-row lengths.

Slot s of row b holds the K/V of that row's s-th token, so for committed tokens slot == position.
`forward` writes new K/V at slots [len, len + T) without moving `len`; `commit` moves it, and
`compact` first gathers an accepted tree path into contiguous slots.
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

    k: jax.Array        # [L, B, S, Hkv, Dh]
    v: jax.Array        # [L, B, S, Hkv, Dh]
    lengths: jax.Array  # [B] int32, committed tokens per row

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        cache = cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    lengths=jnp.zeros((batch,), jnp.int32))
        return constrain_cache(cache, config)  # split on the active mesh (use_mesh), if any


def write_layer(cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array | int,
                new_k: jax.Array, new_v: jax.Array, starts: jax.Array):
    """Write new_k/new_v [B, T, Hkv, Dh] into layer `layer` of the cache at slots starts[b] + t.

    cache_k, cache_v: [L, B, S, Hkv, Dh]. Writes past the end of the buffer are dropped.
    """
    batch, t = new_k.shape[:2]
    rows = jnp.arange(batch)[:, None]                       # [B, 1]
    slots = starts[:, None] + jnp.arange(t)[None, :]        # [B, T]
    layer = jnp.asarray(layer, jnp.int32)
    cache_k = cache_k.at[layer, rows, slots].set(new_k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[layer, rows, slots].set(new_v.astype(cache_v.dtype), mode="drop")
    return cache_k, cache_v


def write_new(cache: KVCache, new_k: jax.Array, new_v: jax.Array) -> KVCache:
    """Write every layer's new K/V [L, B, T, Hkv, Dh] (from `forward_pending`) at slots
    [len, len + T) of each row; writes past the end of the buffer are dropped."""
    batch, t = new_k.shape[1:3]
    rows = jnp.arange(batch)[:, None]                                    # [B, 1]
    slots = cache.lengths[:, None] + jnp.arange(t)[None, :]              # [B, T]
    k = cache.k.at[:, rows, slots].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, slots].set(new_v.astype(cache.v.dtype), mode="drop")
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
    rows = jnp.arange(batch)[:, None]                                # [B, 1]
    src = cache.lengths[:, None] + path                              # [B, P]
    dst = cache.lengths[:, None] + jnp.arange(p)[None, :]            # [B, P]
    dst = jnp.where(jnp.arange(p)[None, :] < num_keep[:, None], dst, cache.max_len)  # dropped
    k_src = cache.k[:, rows, src]                                    # [L, B, P, Hkv, Dh]
    v_src = cache.v[:, rows, src]
    k = cache.k.at[:, rows, dst].set(k_src, mode="drop")
    v = cache.v.at[:, rows, dst].set(v_src, mode="drop")
    return cache.replace(k=k, v=v)
