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
    """

    tokens: jax.Array
    parents: jax.Array
    valid: jax.Array
    q: jax.Array | None = None
