"""Acceptance rules: which drafted nodes the target keeps, and the token it adds after them.

Pure array functions over a `Draft` (tokens / parents / valid / q per node, batched per row) and
the target's logits at every node. Chains are trees whose node i has parent i - 1, so every rule
has one implementation for both.

Rules:
  greedy           accept while each token is the target's argmax at its parent (lossless at T=0)
  speculative      lossless rejection sampling: Leviathan/Chen on a chain, SpecInfer multi-draft
                   on a tree (siblings tried in node order, residual updated after each rejection)
  speculative_wor  as speculative, for siblings drawn WITHOUT replacement (RSD, Gumbel-top-k):
                   a rejected sibling's token is also removed from the later siblings' q
  typical          Medusa typical acceptance: LOSSY, faster at high temperature
  auto             greedy when sampling is greedy, else speculative

The lossless rules first compute the exact distribution over outcomes (stop at node i and emit
token y), `outcome_distribution`, then draw one outcome from it. That is equivalent in law to
running the accept/reject coin flips node by node, has static shapes, and lets the tests check
losslessness by exact enumeration rather than by sampling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.sampling import Sampling, probabilities, sample_from_probs, top_token
from jaxspec.speculative.draft import Draft

RULES = ("greedy", "speculative", "speculative_wor", "typical", "auto")
LOSSLESS_RULES = ("speculative", "speculative_wor")


@struct.dataclass
class Verdict:
    """What one verification step accepted, per row.

    path:         [B, D+1] int32  accepted node per depth: path[:, 0] = 0 (root), path[:, j] the
                                  accepted node at depth j for j <= num_accepted; 0 beyond
    num_accepted: [B] int32       accepted draft nodes (depth of the deepest accepted node)
    next_token:   [B] int32       the target's token after the last accepted node (correction
                                  or bonus)
    """

    path: jax.Array
    num_accepted: jax.Array
    next_token: jax.Array


@struct.dataclass
class _Tree:
    """Per-row topology tables derived from a Draft's parent array."""

    parent: jax.Array     # [B, N] int32, parent with the root's -1 clipped to 0
    ancestors: jax.Array  # [B, N, N] bool, row i true at i's ancestors, i itself and the root
    depth: jax.Array      # [B, N] int32
    live: jax.Array       # [B, N] bool, node and all its ancestors valid (root always live)
    rank: jax.Array       # [B, N] int32, rank among live siblings in node order; -1: dead/root


def _tree(draft: Draft, max_depth: int) -> _Tree:
    """Ancestors by walking max_depth + 1 parent steps from every node at once (no node loop)."""
    parents = draft.parents.astype(jnp.int32)  # [B, N]
    batch, n = parents.shape
    nodes = jnp.arange(n, dtype=jnp.int32)
    ancestors = jnp.zeros((batch, n, n), bool)
    cur = jnp.broadcast_to(nodes, (batch, n))  # [B, N]
    for _ in range(max_depth + 1):
        ancestors = ancestors | ((cur[..., None] == nodes) & (cur >= 0)[..., None])
        cur = jnp.where(cur >= 0, jnp.take_along_axis(parents, jnp.maximum(cur, 0), axis=1), -1)
    valid = draft.valid.astype(bool) | (nodes == 0)  # [B, N]
    live = ancestors[..., 0] & jnp.all(ancestors <= valid[:, None, :], axis=-1)
    depth = jnp.sum(ancestors, axis=-1, dtype=jnp.int32) - 1
    # [B, N, N]: [b, i, j] = j is a live sibling of i that comes before it
    earlier_sibling = ((parents[:, :, None] == parents[:, None, :])
                       & (nodes[None, :] < nodes[:, None]) & live[:, None, :])
    rank = jnp.where(live & (nodes > 0), jnp.sum(earlier_sibling, -1, dtype=jnp.int32), -1)
    return _Tree(parent=jnp.maximum(parents, 0), ancestors=ancestors, depth=depth, live=live,
                 rank=rank)


def _verdict(tree: _Tree, node: jax.Array, next_token: jax.Array, max_depth: int) -> Verdict:
    """The Verdict for stopping at node [B] and emitting next_token [B]."""
    n = tree.parent.shape[1]
    nodes = jnp.arange(n, dtype=jnp.int32)
    on_path = jnp.take_along_axis(tree.ancestors, node[:, None, None], axis=1)[:, 0]  # [B, N]
    level = jnp.arange(max_depth + 1, dtype=jnp.int32)
    at_level = on_path[:, None, :] & (tree.depth[:, None, :] == level[None, :, None])  # [B, D+1, N]
    path = jnp.sum(jnp.where(at_level, nodes, 0), axis=-1, dtype=jnp.int32)  # [B, D+1]
    num_accepted = jnp.take_along_axis(tree.depth, node[:, None], axis=1)[:, 0]
    return Verdict(path=path, num_accepted=num_accepted.astype(jnp.int32),
                   next_token=next_token.astype(jnp.int32))


def _deepest_accepted(tree: _Tree, ok: jax.Array) -> jax.Array:
    """Deepest live node [B] whose whole path passes `ok` [B, N]; ties: lowest node index."""
    n = ok.shape[1]
    nodes = jnp.arange(n, dtype=jnp.int32)
    ok = ok | (nodes == 0)
    path_ok = tree.live & jnp.all(tree.ancestors <= ok[:, None, :], axis=-1)  # [B, N]
    score = jnp.where(path_ok, tree.depth * n + (n - 1 - nodes), -1)
    return jnp.argmax(score, axis=-1).astype(jnp.int32)


def _greedy(draft: Draft, target_logits: jax.Array, max_depth: int) -> Verdict:
    """Deepest node whose every token is the target's argmax at its parent; then that argmax."""
    tree = _tree(draft, max_depth)
    top = top_token(target_logits)                               # [B, N]
    ok = draft.tokens == jnp.take_along_axis(top, tree.parent, axis=1)
    best = _deepest_accepted(tree, ok)
    return _verdict(tree, best, jnp.take_along_axis(top, best[:, None], axis=1)[:, 0], max_depth)


def _typical(draft: Draft, target_logits: jax.Array, sampling: Sampling, max_depth: int,
             eps, delta) -> Verdict:
    """Medusa typical acceptance: p(x) > min(eps, delta * exp(-H(p))) along the path; argmax."""
    tree = _tree(draft, max_depth)
    p = probabilities(target_logits, sampling)  # [B, N, V]
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)  # [B, N]
    threshold = jnp.minimum(eps, delta * jnp.exp(-entropy))  # [B, N]
    rows = jnp.arange(p.shape[0])[:, None]
    p_token = p[rows, tree.parent, draft.tokens]  # [B, N]: p at the parent of each node's token
    ok = p_token > jnp.take_along_axis(threshold, tree.parent, axis=1)
    best = _deepest_accepted(tree, ok)
    p_best = jnp.take_along_axis(p, best[:, None, None], axis=1)[:, 0]  # [B, V]
    return _verdict(tree, best, top_token(p_best), max_depth)


def _check(rule: str, draft: Draft, target_logits: jax.Array, max_depth, max_children) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown verification rule {rule!r}; expected one of {', '.join(RULES)}")
    if draft.tokens.ndim != 2:
        raise ValueError(f"draft.tokens must be [B, N], got shape {draft.tokens.shape}")
    batch, n = draft.tokens.shape
    if target_logits.ndim != 3 or target_logits.shape[:2] != (batch, n):
        raise ValueError(f"target_logits must be [B, N, V] = [{batch}, {n}, V] to match the "
                         f"draft's tokens, got shape {target_logits.shape}")
    for name in ("parents", "valid"):
        if getattr(draft, name).shape != (batch, n):
            raise ValueError(f"draft.{name} must be [B, N] = [{batch}, {n}], "
                             f"got shape {getattr(draft, name).shape}")
    if draft.q is not None and draft.q.shape != target_logits.shape:
        raise ValueError(f"draft.q must be [B, N, V] = {list(target_logits.shape)} like the target "
                         f"logits (same vocabulary), got shape {draft.q.shape}")
    for name, value in (("max_depth", max_depth), ("max_children", max_children)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a static int >= 0, got {value!r}")


def outcome_distribution(rule: str, draft: Draft, target_logits: jax.Array, sampling: Sampling,
                         *, max_depth: int, max_children: int) -> jax.Array:
    """Exact law [B, N, V] of a lossless rule's outcome: stop at node i, then emit token y.

    Per node c the acceptance probability a_c = min(1, p_res(x_c) / q_c(x_c)) is fixed by the
    draft: p_res is the parent's target distribution after its earlier live siblings were
    rejected (normalize(max(p_res - q_s, 0)) each), q_c the node's proposal distribution (one-hot
    of its token when draft.q is None; for speculative_wor with the tokens of earlier siblings
    removed and renormalized). Then P(reach i) = prod over i's path of
    (prod_{earlier siblings s} (1 - a_s)) * a_node, and
    out[b, i, y] = P(reach i) * prod_{children c of i} (1 - a_c) * res_i(y)
    with res_i the residual after all of i's children were rejected (= p_i for a leaf).

    Invalid nodes (and descendants) are skipped: never accepted, residual unchanged. So is a node
    whose token has zero proposal probability. Children of rank >= max_children are never tried
    (still lossless); max_depth must be >= the deepest node's depth.
    """
    if rule not in LOSSLESS_RULES:
        raise ValueError(f"outcome_distribution is defined for the lossless rules "
                         f"{', '.join(LOSSLESS_RULES)}; got {rule!r}")
    _check(rule, draft, target_logits, max_depth, max_children)
    return _outcome(rule == "speculative_wor", draft, _tree(draft, max_depth),
                    probabilities(target_logits, sampling), max_children)


def _outcome(without_replacement: bool, draft: Draft, tree: _Tree, p: jax.Array,
             max_children: int) -> jax.Array:
    """outcome_distribution on the derived tree tables and target probabilities p [B, N, V]."""
    batch, n, vocab = p.shape
    nodes = jnp.arange(n, dtype=jnp.int32)
    residual = p  # [B, N, V]: per node as a parent, its target distribution after rejections
    removed = jnp.zeros((batch, n, vocab), bool)  # [B, N, V]: tokens of earlier tried children
    accept = jnp.zeros((batch, n), jnp.float32)  # a_c per child
    rejected_before = jnp.ones((batch, n), jnp.float32)  # prod (1 - a_s), earlier siblings s
    rejected_all = jnp.ones((batch, n), jnp.float32)  # per parent: prod (1 - a_c), its children
    for r in range(max_children):
        is_r = tree.rank == r  # [B, C]
        # [b, u, c]: c is u's child of rank r (at most one per parent u).
        child_of = is_r[:, None, :] & (tree.parent[:, None, :] == nodes[None, :, None])  # [B, U, C]
        has_child = jnp.any(child_of, axis=-1)  # [B, U]
        child = jnp.sum(jnp.where(child_of, nodes, 0), axis=-1, dtype=jnp.int32)  # [B, U]
        token = jnp.take_along_axis(draft.tokens, child, axis=1).astype(jnp.int32)  # [B, U]
        if draft.q is None:
            q_child = jax.nn.one_hot(token, vocab, dtype=jnp.float32)  # [B, U, V]
        else:
            q_child = jnp.take_along_axis(draft.q.astype(jnp.float32), child[..., None], axis=1)
        if without_replacement:
            q_child = jnp.where(removed, 0.0, q_child)
            mass = jnp.sum(q_child, axis=-1, keepdims=True)
            q_child = jnp.where(mass > 0, q_child / jnp.where(mass > 0, mass, 1.0), 0.0)
        q_token = jnp.take_along_axis(q_child, token[..., None], axis=-1)[..., 0]  # [B, U]
        p_token = jnp.take_along_axis(residual, token[..., None], axis=-1)[..., 0]  # [B, U]
        tried = has_child & (q_token > 0)
        a = jnp.where(tried, jnp.minimum(1.0, p_token / jnp.where(tried, q_token, 1.0)), 0.0)
        left = jnp.maximum(residual - q_child, 0.0)  # [B, U, V]
        left_mass = jnp.sum(left, axis=-1, keepdims=True)
        # left_mass == 0 only when a == 1 (p_res == q): the residual then has no weight.
        left = jnp.where(left_mass > 0, left / jnp.where(left_mass > 0, left_mass, 1.0), residual)
        residual = jnp.where(tried[..., None], left, residual)
        accept = jnp.where(is_r, jnp.take_along_axis(a, tree.parent, axis=1), accept)
        rejected_before = jnp.where(
            is_r, jnp.take_along_axis(rejected_all, tree.parent, axis=1), rejected_before)
        rejected_all = rejected_all * (1.0 - a)
        if without_replacement:
            removed = removed | (tried[..., None] & jax.nn.one_hot(token, vocab, dtype=bool))
    step = jnp.where(nodes == 0, 1.0, rejected_before * accept)  # [B, N]: P(reach i | reach parent)
    reach = jnp.prod(jnp.where(tree.ancestors, step[:, None, :], 1.0), axis=-1)  # [B, N]
    reach = jnp.where(tree.live, reach, 0.0)
    return (reach * rejected_all)[..., None] * residual  # [B, N, V]


def verify(rule: str, draft: Draft, target_logits: jax.Array, sampling: Sampling, key: jax.Array,
           *, max_depth: int, max_children: int, eps: float = 0.09, delta: float = 0.3) -> Verdict:
    """Apply acceptance rule `rule` to a batch of drafts and draw the target's next token.

    draft: N nodes per row (node 0 = root). target_logits: [B, N, V], the target's raw logits
    for the token after each node. max_depth / max_children: static bounds of the topology
    (TreeSpec.max_depth / .max_children, or the DynamicTree's) that keep loops static.
    key: used by the lossless rules only.

    "greedy" and "typical" are deterministic; "typical" (Medusa: accept token x if
    p(x) > min(eps, delta * exp(-H(p))), keep the longest accepted path, then emit argmax p)
    is LOSSY at temperature > 0: its output is not the target's distribution. It equals greedy at
    temperature 0. "speculative" is lossless for siblings proposed i.i.d. (or independently, each
    from its own q); "speculative_wor" for siblings drawn without replacement, and also for i.i.d.
    or independent siblings (a duplicate is skipped, a fresh token is a draw from the reduced q).
    """
    _check(rule, draft, target_logits, max_depth, max_children)
    if rule == "auto":
        rule = "greedy" if sampling.greedy else "speculative"
    if rule == "greedy":
        return _greedy(draft, target_logits, max_depth)
    if rule == "typical":
        return _typical(draft, target_logits, sampling, max_depth, eps, delta)
    tree = _tree(draft, max_depth)
    out = _outcome(rule == "speculative_wor", draft, tree, probabilities(target_logits, sampling),
                   max_children)  # [B, N, V]
    batch, n, vocab = out.shape
    drawn = sample_from_probs(key, out.reshape(batch, n * vocab))  # [B]
    return _verdict(tree, drawn // vocab, drawn % vocab, max_depth)
