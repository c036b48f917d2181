"""Speculation under a constraint: walk the DFA along a draft, prune what leaves the language.

Each node's state is the DFA state after its token: the root's is the row's state (the root is
the last committed token), node i's is next_state[state(parent(i)), token(i)]. A node whose token
is not allowed at its parent's state is marked invalid, and with it its subtree (a pruned tree is
a valid tree). The target's logits at node i are then masked at state(i), so verification uses
the constrained target distribution at every node.

Why this stays lossless. A node's token x was drawn from q (its proposal distribution at the
parent). Pruning it when x is off the language is a decision made from draft-side values only,
before the target's logits are seen; a kept node's x is, conditionally on being kept, a draw
from q' = q restricted to the allowed tokens and renormalised. So the proposals verification
sees are draws from q', and the draft's q is replaced by q' (masked at the parent's state). The
acceptance rules are lossless for any proposal law and for any skipping of proposals decided
before the target is seen, so the output has the constrained target's law. (Keeping q
unmasked while pruning would not be: the residual max(p' - q, 0) would then be the wrong one.)
Greedy verification compares tokens with the masked target's argmax: constrained greedy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec import constraints
from jaxspec.constraints import Constraint
from jaxspec.speculative.draft import Draft


def node_states(constraint: Constraint, root_state: jax.Array, draft: Draft,
                max_depth: int) -> jax.Array:
    """[B, N] int32: the DFA state after each node's token; -1 where a node or one of its
    ancestors is off the language. root_state: [B]."""
    batch, n = draft.tokens.shape
    parents = jnp.maximum(draft.parents, 0)                                    # [B, N]
    is_root = jnp.arange(n)[None, :] == 0
    state = jnp.broadcast_to(root_state[:, None], (batch, n))
    for _ in range(max_depth):  # after d passes every node of depth <= d is exact
        parent_state = jnp.take_along_axis(state, parents, axis=1)             # [B, N]
        state = jnp.where(is_root, root_state[:, None],
                          constraints.advance(constraint, parent_state, draft.tokens))
    return state


def constrain_draft(constraint: Constraint, draft: Draft, root_state: jax.Array,
                    max_depth: int) -> tuple[Draft, jax.Array]:
    """Prune a draft to the constraint's language; returns (pruned draft, node states [B, N]).

    Pruned nodes (and their descendants) become invalid; each kept node's proposal distribution
    q [B, N, V] is masked at its parent's state and renormalised (see the module docstring).
    """
    state = node_states(constraint, root_state, draft, max_depth)             # [B, N]
    valid = draft.valid & (state >= 0)
    q = draft.q
    if q is not None:
        parent_state = jnp.take_along_axis(state, jnp.maximum(draft.parents, 0), axis=1)
        q = jnp.where(constraints.allowed_tokens(constraint, parent_state), q, 0.0)
        mass = jnp.sum(q, axis=-1, keepdims=True)
        q = jnp.where(mass > 0, q / jnp.where(mass > 0, mass, 1.0), 0.0)
    return draft.replace(valid=valid, q=q), state

