"""Tree drafting with a draft model (`DraftModel(draft, tree=...)`): static and dynamic trees.

Static trees (a `TreeSpec`). The children of a node are the draft's top-(number of children)
tokens there at temperature 0. Under sampling they are drawn WITHOUT replacement from the
processed draft distribution q at the node, by Gumbel-top-k (the order of the perturbed values is
a sequential without-replacement sample), and every child stores q of its parent unchanged; the
drafter declares `rule = "speculative_wor"` (recursive rejection sampling), which is lossless
exactly for this scheme. A child whose token has q = 0 (more children than q's support) is
marked invalid.

Dynamic trees (`trees.dynamic(budget, max_depth, top_k)`, EAGLE-2 style). Level 1 holds the
root's top_k tokens; at every later level the top_k nodes of the previous level by cumulative
draft log-probability are expanded, each with its top_k children. After max_depth levels the best
`budget` candidates are kept by (score desc, candidate index asc). A child's score never exceeds
its parent's and a parent's candidate index is smaller, so that order puts a parent before each of
its children: the kept set is closed under ancestors. Kept nodes are re-indexed in candidate
order (level by level), so parents precede children; parents are per-row arrays. The candidates
are a deterministic function of the context (top-k of the raw draft distribution), not draws, so
the draft carries no q: verification treats them as one-hot proposals ("greedy" at temperature 0,
multi-draft "speculative" otherwise), which is lossless for any deterministic candidate set.

One draft forward per level. Children of the nodes at depth l need the draft's logits at those
nodes, computed from the committed prefix and the node's own ancestors only. A forward's new
tokens see every committed cache slot plus a mask among themselves, so one level's nodes cannot be
fed alone after earlier levels were written (they would see their non-ancestor cousins). Each
level therefore re-forwards the node prefix so far, `[before, nodes 0 .. P_l)` at cache length
L - 1 (L = committed length; P_l = one past the last node needed at depth <= l) under the
tree mask, writing node i's K/V at slot L + i. The re-computed earlier levels are cheap in the
memory-bound decode regime (the weights are read once per forward either way), every forward is
exact, and nodes of the deepest level are never fed. For dynamic trees the fed nodes are the
expanded ones (root, then top_k per level), at slot L + (expansion index).

`before` is the token at position L - 1, re-fed every round as in the chain drafter. After
verification `commit` compacts the draft K/V of the accepted path's first num_accepted nodes (the
root up to the parent of the deepest accepted node, all of which were fed) to slots
[L, L + num_accepted); the deepest accepted node is the next round's `before`, whose K/V the next
round computes (it may be a never-fed leaf). So the draft cache always holds the accepted tokens
contiguously, like the target's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models.cache import KVCache, compact
from jaxspec.models.transformer import forward, forward_step, new_cache
from jaxspec.sampling import Sampling, probabilities, processed_logits
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.trees import DynamicTree, TreeSpec, ancestors_of


@struct.dataclass
class TreeDraftState:
    cache: KVCache          # the draft's KV cache; lengths follow the target's committed length
    node_slot: jax.Array    # [B, N] int32, draft-cache slot offset (from L) of each node's K/V


def init(drafter, target, prompt_tokens, prompt_lengths, max_len: int, state=None):
    """Prefill the draft's cache with the prompts. prompt_tokens: [B, Tp]."""
    batch, tp = prompt_tokens.shape
    model = drafter.model
    cache = new_cache(model, batch, max_len)
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (batch, tp))
    _, _, cache = forward(model, prompt_tokens, cache, positions)
    n = drafter.tree.num_nodes
    return TreeDraftState(cache=cache.replace(lengths=prompt_lengths),
                          node_slot=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)))


def _roots(ctx: Context):
    rows = jnp.arange(ctx.length.shape[0])
    root = ctx.history[rows, ctx.length - 1]                                    # [B]
    before = ctx.history[rows, jnp.maximum(ctx.length - 2, 0)]                  # [B]
    return root, before


def _feed(drafter, cache: KVCache, committed, before, tokens, depth, mask):
    """Forward [before, tokens] at cache length L - 1. tokens, depth: [B, T]; mask: [B, T, T]
    among `tokens` (row t true at t's ancestors and itself). Returns logits [B, T, V] at tokens."""
    batch, t = tokens.shape
    full = jnp.zeros((batch, t + 1, t + 1), bool).at[:, :, 0].set(True)
    full = full.at[:, 1:, 1:].set(mask)
    feed = jnp.concatenate([before[:, None], tokens], axis=1)                   # [B, 1+T]
    positions = jnp.concatenate([(committed - 1)[:, None], committed[:, None] + depth], axis=1)
    logits, _, cache = forward_step(drafter.model, feed, cache.replace(lengths=committed - 1),
                                    positions, full)
    return logits[:, 1:], cache


def propose_static(drafter, state: TreeDraftState, ctx: Context, sampling: Sampling, key,
                   vocab: int):
    tree: TreeSpec = drafter.tree
    n, max_depth = tree.num_nodes, tree.max_depth
    depths, parents_np, ranks = tree.depths, np.asarray(tree.parents), tree.child_rank
    batch = ctx.length.shape[0]
    committed = ctx.cache_lengths                                              # [B]
    root, before = _roots(ctx)
    tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(root)
    valid = jnp.zeros((batch, n), bool).at[:, 0].set(True)
    q = None if sampling.greedy else jnp.zeros((batch, n, vocab), jnp.float32)
    cache = state.cache
    num_children = np.bincount(parents_np[1:], minlength=n)
    for level in range(max_depth):
        expand = np.flatnonzero((depths == level) & (num_children > 0))       # static nodes
        if expand.size == 0:
            continue
        end = int(expand.max()) + 1                                          # feed nodes [0, end)
        mask = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask[:end, :end]), (batch, end, end))
        depth = jnp.broadcast_to(jnp.asarray(depths[:end]), (batch, end))
        logits, cache = _feed(drafter, cache, committed, before, tokens[:, :end], depth, mask)
        logits = drafter._logits(logits[:, expand], vocab)                   # [B, U, V]
        width = int(num_children[expand].max())
        if sampling.greedy:
            score = logits
        else:
            processed = processed_logits(logits, sampling)                   # [B, U, V]
            gumbel = jax.random.gumbel(jax.random.fold_in(key, level), processed.shape)
            score = processed + gumbel
        top_score, top_token = jax.lax.top_k(score, width)                   # [B, U, W]
        kids = np.flatnonzero(np.isin(parents_np, expand) & (np.arange(n) > 0))
        slot = np.searchsorted(expand, parents_np[kids])                     # parent's index in expand
        kid_tokens = top_token[:, slot, ranks[kids]]                         # [B, K]
        tokens = tokens.at[:, kids].set(kid_tokens)
        valid = valid.at[:, kids].set(jnp.isfinite(top_score[:, slot, ranks[kids]])
                                      & ctx.active[:, None])
        if q is not None:
            q = q.at[:, kids].set(jax.nn.softmax(processed, axis=-1)[:, slot])
    parents = jnp.broadcast_to(jnp.asarray(parents_np, jnp.int32), (batch, n))
    draft = Draft(tokens=tokens, parents=parents, valid=valid, q=q)
    return draft, state.replace(cache=cache)


def propose_dynamic(drafter, state: TreeDraftState, ctx: Context, sampling: Sampling, key,
                    vocab: int):
    spec: DynamicTree = drafter.tree
    k, max_depth, budget = spec.top_k, spec.max_depth, spec.budget
    batch = ctx.length.shape[0]
    rows = jnp.arange(batch)[:, None]                                           # [B, 1]
    committed = ctx.cache_lengths
    root, before = _roots(ctx)
    c = 1 + spec.max_candidates                                                 # candidates + root

    def level_start(level: int) -> int:                                          # level >= 1
        return 1 if level == 1 else 1 + k + (level - 2) * k * k

    cand_token = jnp.zeros((batch, c), jnp.int32).at[:, 0].set(root)
    cand_parent = jnp.full((batch, c), -1, jnp.int32)
    cand_score = jnp.zeros((batch, c), jnp.float32)
    cand_fed = jnp.full((batch, c), -1, jnp.int32).at[:, 0].set(0)             # index among fed
    e = 1 + (max_depth - 1) * k                                                 # fed nodes, at most
    fed_token = jnp.zeros((batch, e), jnp.int32).at[:, 0].set(root)
    fed_parent = jnp.full((batch, e), -1, jnp.int32)
    fed_depth = jnp.zeros((batch, e), jnp.int32)
    cache = state.cache
    expanded = jnp.zeros((batch, 1), jnp.int32)                                 # candidate ids
    for level in range(max_depth):
        if level > 0:
            start = level_start(level)
            count = k if level == 1 else k * k
            _, pick = jax.lax.top_k(cand_score[:, start:start + count], k)      # [B, k]
            expanded = start + pick                                             # [B, k]
            new = 1 + (level - 1) * k + np.arange(k)                            # fed slots
            fed_token = fed_token.at[:, new].set(cand_token[rows, expanded])
            fed_parent = fed_parent.at[:, new].set(
                cand_fed[rows, cand_parent[rows, expanded]])
            fed_depth = fed_depth.at[:, new].set(level)
            cand_fed = cand_fed.at[rows, expanded].set(jnp.asarray(new, jnp.int32)[None, :])
        else:
            new = np.zeros(1, np.int64)
        end = 1 + level * k
        mask = ancestors_of(fed_parent[:, :end], level)
        logits, cache = _feed(drafter, cache, committed, before, fed_token[:, :end],
                              fed_depth[:, :end], mask)
        logp = jax.nn.log_softmax(drafter._logits(logits[:, new], vocab), axis=-1)  # [B, m, V]
        top_logp, top_token = jax.lax.top_k(logp, k)                            # [B, m, k]
        m = len(new)
        start = level_start(level + 1)
        span = np.arange(start, start + m * k)
        cand_token = cand_token.at[:, span].set(top_token.reshape(batch, m * k))
        parent_ids = jnp.repeat(expanded, k, axis=1)                            # [B, m*k]
        cand_parent = cand_parent.at[:, span].set(parent_ids)
        parent_score = jnp.take_along_axis(cand_score, parent_ids, axis=1)
        cand_score = cand_score.at[:, span].set(parent_score + top_logp.reshape(batch, m * k))
    # Keep the best `budget` candidates; a stable sort puts parents (higher or equal score,
    # smaller index) before their children, so the kept set is ancestor-closed.
    order = jnp.argsort(-cand_score[:, 1:], axis=1, stable=True)[:, :budget] + 1  # [B, budget]
    kept = jnp.sort(order, axis=1)
    node_cand = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), kept.astype(jnp.int32)], 1)
    n = budget + 1
    index_of = jnp.full((batch, c), -1, jnp.int32).at[rows, node_cand].set(
        jnp.arange(n, dtype=jnp.int32)[None, :])
    parents = jnp.take_along_axis(index_of, jnp.maximum(cand_parent[rows, node_cand], 0), axis=1)
    parents = parents.at[:, 0].set(-1)
    tokens = cand_token[rows, node_cand]
    valid = (jnp.isfinite(cand_score[rows, node_cand]) & ctx.active[:, None]).at[:, 0].set(True)
    node_slot = jnp.maximum(cand_fed[rows, node_cand], 0)
    draft = Draft(tokens=tokens, parents=parents, valid=valid, q=None)
    return draft, state.replace(cache=cache, node_slot=node_slot)


def commit(drafter, state: TreeDraftState, ctx: Context, draft: Draft, verdict):
    """Move the accepted path's fed nodes (all but the deepest accepted) to slots [L, L + a)."""
    src = jnp.take_along_axis(state.node_slot, verdict.path, axis=1)            # [B, D+1]
    keep = jnp.where(ctx.active, verdict.num_accepted, 0)
    cache = compact(state.cache.replace(lengths=ctx.cache_lengths), src, keep)
    return state.replace(cache=cache)
