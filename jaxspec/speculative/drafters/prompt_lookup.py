"""PromptLookup: propose what followed the most recent earlier occurrence of the last n tokens.

Training-free and deterministic (no q: verified as one-hot proposals, which stays lossless).
The search is a fixed-size comparison over the static history buffer: for n = ngram down to 1,
every window of the history is compared with the row's last n tokens, the latest match wins, and
its continuation (up to num_tokens tokens, never past the committed history) is proposed.

num_candidates=c > 1 proposes a tree: the continuations of the c best distinct matches (longer
n-gram first, then the most recent; distinct = different continuation starts), one branch each
under the root. Branches that begin with the same tokens are merged into a trie (a node whose
path from the root equals an earlier branch's is dropped and its child re-attached to that
branch's node), so siblings always carry distinct tokens. The topology is per row
(`trees.dynamic(c * num_tokens, num_tokens, c)`: node 1 + j * num_tokens + d is depth d + 1 of
branch j), and parents always precede children.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.speculative.costs import checked_sizing
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.base import check_num_tokens
from jaxspec.speculative.trees import DynamicTree, TreeSpec, chain, dynamic


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


def find_continuations(history: jax.Array, length: jax.Array, ngram: int, count: int):
    """The `count` best distinct continuation starts: longest match first, then latest.

    history: [B, H] int32; length: [B]. Returns (start [B, count] int32, found [B, count] bool).
    count=1 agrees with `find_continuation`.
    """
    batch, h = history.shape
    rows = jnp.arange(batch)
    idx = jnp.arange(h)[None, :]                                            # [1, H]
    best = jnp.zeros((batch, h), jnp.int32)   # per continuation start: the longest n matching
    for n in range(ngram, 0, -1):
        tail = history[rows[:, None], jnp.maximum(length[:, None] - n + jnp.arange(n), 0)]  # [B, n]
        match = jnp.ones((batch, h), bool)
        for j in range(n):
            match &= jnp.roll(history, -j, axis=1) == tail[:, j:j + 1]
        match &= (idx + n < length[:, None]) & (length[:, None] >= n + 1)
        # window [i, i + n) -> continuation start i + n (never wraps: i + n < length <= H)
        starts = jnp.roll(match, n, axis=1)
        best = jnp.where((best == 0) & starts, n, best)
    key = jnp.where(best > 0, best * h + idx, -1)                            # [B, H]
    value, start = jax.lax.top_k(key, count)                                 # [B, count]
    return start.astype(jnp.int32), value >= 0


@struct.dataclass
class PromptLookup:
    """Training-free drafter: propose the `num_tokens` tokens that followed the latest earlier
    match of the row's last `ngram` (down to 1) tokens in prompt + output. `num_candidates` > 1
    drafts a tree of the best distinct matches. Deterministic, so lossless; a round where no row
    matched costs one plain decode step. Pays when the output copies its context.
    """

    ngram: int = struct.field(pytree_node=False, default=3)
    num_tokens: int = struct.field(pytree_node=False, default=8)
    num_candidates: int = struct.field(pytree_node=False, default=1)
    # Per-round verify size from the target's measured cost curve and this row's past acceptance
    # rate of matched drafts (a match carries no confidence of its own): "auto" (js.generate
    # measures the curve once and caches it), a costs.CostModel or a {new tokens: ms} table, or
    # None (verify the whole match; a round with no match is still a plain step).
    sizing: object = struct.field(pytree_node=False, default="auto")

    # A round where no row found a match verifies the root alone (a plain decode step): the
    # loop's `plain_step` branch. The state ignores the target's logits, so nothing else changes.
    skips_empty_rounds = True
    drafts_confidence = False   # sized by past acceptance rates, greedy or not (loop.py)

    def __post_init__(self):
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or not 1 <= self.ngram <= 16:
            raise ValueError(f"ngram must be an integer in [1, 16], got {self.ngram!r}")
        check_num_tokens(self.num_tokens)
        c = self.num_candidates
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 64:
            raise ValueError(f"num_candidates must be an integer in [1, 64], got {c!r}")
        object.__setattr__(self, "sizing", checked_sizing(self.sizing))

    @property
    def tree(self) -> TreeSpec | DynamicTree:
        if self.num_candidates == 1:
            return chain(self.num_tokens)
        return dynamic(self.num_candidates * self.num_tokens, self.num_tokens, self.num_candidates)

    def cache_slack(self) -> int:
        return self.num_tokens + 1

    def check_compatible(self, target) -> None:
        return None

    def init(self, target, prompt_tokens, prompt_lengths, max_len: int, state=None):
        return state

    def propose(self, state, ctx: Context, sampling, key, vocab: int):
        if self.num_candidates > 1:
            return self._propose_tree(ctx), state
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

    def _propose_tree(self, ctx: Context) -> Draft:
        batch = ctx.length.shape[0]
        k, c, h = self.num_tokens, self.num_candidates, ctx.history.shape[1]
        rows = jnp.arange(batch)
        start, found = find_continuations(ctx.history, ctx.length, self.ngram, c)  # [B, c]
        offsets = start[:, :, None] + jnp.arange(k)                            # [B, c, k]
        branch = ctx.history[rows[:, None, None], jnp.clip(offsets, 0, h - 1)]  # [B, c, k]
        ok = found[:, :, None] & (offsets < ctx.length[:, None, None]) & ctx.active[:, None, None]
        ok = jnp.cumprod(ok, axis=2).astype(bool)
        # same[b, j, i, d]: branches j and i agree (and are proposed) on depths 0..d.
        same = (branch[:, :, None] == branch[:, None, :]) & ok[:, :, None] & ok[:, None, :]
        same = jnp.cumprod(same, axis=3).astype(bool)                           # [B, c, c, k]
        canonical = jnp.argmax(same, axis=2).astype(jnp.int32)                  # [B, c, k] first i
        keep = ok & (canonical == jnp.arange(c)[None, :, None])
        # Node (j, d) sits at 1 + j * k + d; its parent is the canonical node one level up.
        canonical_node = 1 + canonical * k + jnp.arange(k, dtype=jnp.int32)   # [B, c, k]
        parent = jnp.concatenate([jnp.zeros((batch, c, 1), jnp.int32), canonical_node[:, :, :-1]],
                                 axis=2)                                        # [B, c, k]
        root = ctx.history[rows, ctx.length - 1]
        tokens = jnp.concatenate([root[:, None], jnp.where(keep, branch, 0).reshape(batch, -1)], 1)
        valid = jnp.concatenate([jnp.ones((batch, 1), bool), keep.reshape(batch, -1)], axis=1)
        parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32),
                                   parent.reshape(batch, -1).astype(jnp.int32)], axis=1)
        return Draft(tokens=tokens, parents=parents, valid=valid, q=None)

    def commit(self, state, ctx, draft, verdict, target_logits):
        return state
