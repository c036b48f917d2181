"""Draft: what every drafter proposes, in one shape for chains, static trees and dynamic trees."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class Draft:
    """N nodes per row; node 0 is the root (the last committed token, not yet in the cache).

    tokens:  [B, N] int32  token of each node (tokens[:, 0] = the root token)
    parents: [B, N] int32  parent node of each node, parents[:, 0] = -1, parents[:, i] < i
    valid:   [B, N] bool   False for padding nodes (adaptive length, unused tree budget); an
                           invalid node and its descendants are never accepted
    q:       [B, N, V] float32 or None  the processed draft distribution that node i's token
                           was proposed from (row 0 unused); None for deterministic drafters
                           (verified as one-hot proposals, which stays lossless)
    confidence: [B, N] float32 or None  the drafter's estimate that node i is accepted given its
                           parent is (e.g. its draft probability); with a cost model the loop
                           verifies only the first S nodes, S chosen from these (costs.py)
    """

    tokens: jax.Array
    parents: jax.Array
    valid: jax.Array
    q: jax.Array | None = None
    confidence: jax.Array | None = None  # [B, N] float32 P(node accepted | parent accepted), an
                                         # estimate (root unused); sizes the round (costs.py)


@struct.dataclass
class Context:
    """What the loop tells a drafter about each row.

    history:        [B, H] int32  prompt + generated tokens; history[b, :length[b]] is valid and
                                  history[b, length[b] - 1] is the root (last committed token,
                                  whose K/V the target has not computed yet)
    length:         [B] int32
    cache_lengths:  [B] int32     the target cache's committed length (= length - 1)
    active:         [B] bool      rows still generating
    """

    history: jax.Array
    length: jax.Array
    cache_lengths: jax.Array
    active: jax.Array
