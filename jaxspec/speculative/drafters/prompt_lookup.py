"""PromptLookup: propose what followed the most recent earlier occurrence of the last n tokens.

Training-free and deterministic (no q: verified as one-hot proposals, which stays lossless).
The search is a fixed-size comparison over the static history buffer: for n = ngram down to 1,
every window of the history is compared with the row's last n tokens, the latest match wins, and
its continuation (up to num_tokens tokens, never past the committed history) is proposed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.base import check_num_tokens
from jaxspec.speculative.trees import TreeSpec, chain


def find_continuation(history: jax.Array, length: jax.Array, ngram: int, num_tokens: int):
    """Latest earlier match of the last n tokens (n = ngram..1, longest first).

    history: [B, H] int32; length: [B]. Returns (start [B] int32: history index of the first
    continuation token, found [B] bool).
    """
    batch, h = history.shape
    rows = jnp.arange(batch)
    idx = jnp.arange(h)[None, :]                                            # [1, H]
    start = jnp.zeros((batch,), jnp.int32)
    found = jnp.zeros((batch,), bool)
    for n in range(ngram, 0, -1):
        tail = history[rows[:, None], jnp.maximum(length[:, None] - n + jnp.arange(n), 0)]  # [B, n]
        match = jnp.ones((batch, h), bool)
        for j in range(n):
            shifted = jnp.roll(history, -j, axis=1)                         # shifted[:, i] = history[:, i + j]
            match &= shifted == tail[:, j:j + 1]
        # A window [i, i + n) strictly before the tail, with at least one token after it.
        match &= (idx + n < length[:, None]) & (length[:, None] >= n + 1)
        latest = jnp.max(jnp.where(match, idx, -1), axis=1)                 # [B]
        hit = (latest >= 0) & ~found
        start = jnp.where(hit, latest + n, start)
        found = found | hit
    return start.astype(jnp.int32), found


@struct.dataclass
class PromptLookup:
    ngram: int = struct.field(pytree_node=False, default=3)
    num_tokens: int = struct.field(pytree_node=False, default=8)

    def __post_init__(self):
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or not 1 <= self.ngram <= 16:
            raise ValueError(f"ngram must be an integer in [1, 16], got {self.ngram!r}")
        check_num_tokens(self.num_tokens)

    @property
    def tree(self) -> TreeSpec:
        return chain(self.num_tokens)

    def cache_slack(self) -> int:
        return self.num_tokens + 1

    def check_compatible(self, target) -> None:
        return None

    def init(self, target, prompt_tokens, prompt_lengths, max_len: int, state=None):
        return state

    def propose(self, state, ctx: Context, sampling, key, vocab: int):
        batch = ctx.length.shape[0]
        k, h = self.num_tokens, ctx.history.shape[1]
        rows = jnp.arange(batch)
        start, found = find_continuation(ctx.history, ctx.length, self.ngram, k)
        offsets = start[:, None] + jnp.arange(k)[None, :]                  # [B, k]
        proposed = ctx.history[rows[:, None], jnp.clip(offsets, 0, h - 1)]
        ok = found[:, None] & (offsets < ctx.length[:, None]) & ctx.active[:, None]
        ok = jnp.cumprod(ok, axis=1).astype(bool)
        root = ctx.history[rows, ctx.length - 1]
        tokens = jnp.concatenate([root[:, None], jnp.where(ok, proposed, 0)], axis=1)
        valid = jnp.concatenate([jnp.ones((batch, 1), bool), ok], axis=1)
        parents = jnp.broadcast_to(jnp.arange(-1, k, dtype=jnp.int32), (batch, k + 1))
        return Draft(tokens=tokens, parents=parents, valid=valid, q=None), state

    def commit(self, state, ctx, draft, verdict, target_logits):
        return state
