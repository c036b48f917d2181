"""TokenRecycling (Luo et al.): draft from an adjacency matrix of recently seen target top-k.

Training-free and deterministic. The state is one matrix M int32 [V, k] shared by the batch:
M[t] holds the target's top-k next tokens the last time it processed token t. It is filled from
the prompts' prefill in `init` (one extra cache-free target forward over the prompts; an existing
state passed back in, e.g. `drafter_state=out.drafter_state`, keeps its matrix and is refreshed
with the new prompts) and, after every target forward, at every node the target scored:
M[token of node] = top-k(target logits at node). Several positions with the same token in one
update are resolved deterministically: the last one in (row, position) order wins.

Drafting fills a static tree template (80 nodes over 6 levels by default) by gathers: the node of
child rank r under a node with token t gets token M[t, r]. Drafts carry no q: verification is
"greedy" at temperature 0 and the multi-draft rule with one-hot proposals otherwise, which is
lossless for any deterministic draft. A token that was never seen has an all-zero row (token 0 is
proposed under it: harmless, merely rejected).

Sizing (`sizing="auto"`, the default): the draft carries no confidence, so the loop picks each
round's verify size from the row's past acceptance rate of node 1 and the measured cost curve,
as for prompt lookup (costs.choose_size_by_rate); only the verified nodes refresh M (the loop
marks the others invalid in the draft it hands back to `commit`). The template is in
breadth-first order, so a prefix below 1 + (root's children) is one level deep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models.transformer import Model, forward_train
from jaxspec.speculative.costs import checked_sizing
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.trees import TOKEN_RECYCLING_80, TreeSpec


@struct.dataclass
class TokenRecyclingState:
    matrix: jax.Array   # [V, k] int32: the target's top-k successors of each token, last seen


def update_matrix(matrix: jax.Array, tokens: jax.Array, logits: jax.Array,
                  use: jax.Array) -> jax.Array:
    """M[tokens[i]] = top-k(logits[i]) for every i with use[i]; the last such i wins per token.

    matrix: [V, k]; tokens: [...]; logits: [..., Vt]; use: [...] bool.
    """
    vocab, k = matrix.shape
    tokens = tokens.reshape(-1).astype(jnp.int32)                               # [P]
    use = use.reshape(-1) & (tokens >= 0) & (tokens < vocab)
    logits = logits.reshape(tokens.shape[0], -1)[:, :vocab]                     # [P, V]
    _, top = jax.lax.top_k(logits, k)                                           # [P, k]
    # A stable sort by token keeps equal tokens in position order: an entry wins when the next
    # entry in sorted order has another token (or is unused: unused entries sort last).
    key = jnp.where(use, tokens, vocab)
    order = jnp.argsort(key, stable=True)                                       # [P]
    sorted_key = key[order]
    last = jnp.concatenate([sorted_key[1:] != sorted_key[:-1], jnp.ones((1,), bool)])
    win = jnp.zeros_like(use).at[order].set(last & (sorted_key < vocab))
    rows = jnp.where(win, tokens, vocab)                                        # dropped unless won
    return matrix.at[rows].set(top.astype(matrix.dtype), mode="drop")


@struct.dataclass
class TokenRecycling:
    """Training-free drafter (Luo et al. 2024): the target's own recent top-k successors of each
    token, recycled into a static draft tree (`tree`, 80 nodes by default; `k` successors kept
    per token). Deterministic, so lossless under every rule. Pass `drafter_state=out.drafter_state`
    to keep the matrix across calls. Wide trees pay on accelerators, not on CPUs; `sizing`
    ("auto" by default) verifies only as much of the tree per round as the measured cost curve and
    the row's past acceptance justify (docs/sizing.md).
    """

    k: int = struct.field(pytree_node=False, default=8)
    tree: TreeSpec = struct.field(pytree_node=False, default=TOKEN_RECYCLING_80)
    # Per-round verify size from the target's measured cost curve and this row's past acceptance
    # rate: "auto" (js.generate measures the curve once and caches it), a costs.CostModel or a
    # {new tokens: ms} table, or None (verify the whole tree every round).
    sizing: object = struct.field(pytree_node=False, default="auto")

    drafts_confidence = False   # sized by past acceptance rates, greedy or not (loop.py)

    def __post_init__(self):
        object.__setattr__(self, "sizing", checked_sizing(self.sizing))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1 (successors kept per token), got {self.k!r}")
        if not isinstance(self.tree, TreeSpec):
            raise ValueError(f"tree must be a static js.trees TreeSpec (e.g. "
                             f"js.trees.TOKEN_RECYCLING_80), got {type(self.tree).__name__}")
        if self.tree.num_nodes < 2:
            raise ValueError("tree must have at least one draft node besides the root")
        if self.tree.max_children > self.k:
            raise ValueError(f"the tree has a node with {self.tree.max_children} children but "
                             f"k={self.k} successors are kept per token; use k >= "
                             f"{self.tree.max_children} or a narrower tree")

    def cache_slack(self) -> int:
        return self.tree.max_depth + 1

    def check_compatible(self, target: Model) -> None:
        if self.k > target.config.vocab_size:
            raise ValueError(f"k={self.k} exceeds the vocabulary size {target.config.vocab_size}")

    def init(self, target: Model, prompt_tokens, prompt_lengths, max_len: int, state=None):
        """M from the prompts' prefill (prompt_tokens [B, Tp]); an existing state keeps its M."""
        vocab = target.config.vocab_size
        if state is None:
            matrix = jnp.zeros((vocab, self.k), jnp.int32)
        else:
            matrix = state.matrix if isinstance(state, TokenRecyclingState) else None
            if matrix is None or matrix.shape != (vocab, self.k):
                raise ValueError(f"drafter_state must be a TokenRecyclingState with a matrix of "
                                 f"shape ({vocab}, {self.k}) (from an earlier js.generate with "
                                 f"this drafter and target), got {type(state).__name__}"
                                 + (f" with shape {matrix.shape}" if matrix is not None else ""))
            matrix = jnp.asarray(matrix, jnp.int32)
        batch, tp = prompt_tokens.shape
        logits, _ = forward_train(target.params, target.config, prompt_tokens)  # [B, Tp, V]
        use = jnp.arange(tp)[None, :] < prompt_lengths[:, None]
        return TokenRecyclingState(matrix=update_matrix(matrix, prompt_tokens, logits, use))

    def propose(self, state: TokenRecyclingState, ctx: Context, sampling, key, vocab: int):
        batch = ctx.length.shape[0]
        n = self.tree.num_nodes
        parents = np.asarray(self.tree.parents)
        root = ctx.history[jnp.arange(batch), ctx.length - 1]
        tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(root)
        depths = self.tree.depths
        for level in range(1, self.tree.max_depth + 1):
            nodes = np.flatnonzero(depths == level)
            tokens = tokens.at[:, nodes].set(
                state.matrix[tokens[:, parents[nodes]], self.tree.child_rank[nodes]])
        valid = jnp.broadcast_to(ctx.active[:, None], (batch, n)).at[:, 0].set(True)
        draft = Draft(tokens=tokens, parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32),
                                                               (batch, n)), valid=valid, q=None)
        return draft, state

    def commit(self, state: TokenRecyclingState, ctx: Context, draft: Draft, verdict,
               target_logits):
        """Refresh M at every node the target scored. target_logits: [B, N, V].

        A sized round scores a prefix of the nodes (the loop marks the rest invalid), so the
        top-k runs only over the smallest static prefix (1, 2, 4, ..., N) that holds every used
        node: on SmolLM2 a top-8 over 81 x 49152 logits every round cost more than a plain step's
        tenth, for rounds that had verified one or two nodes."""
        use = draft.valid & ctx.active[:, None]                                   # [B, N]
        n = draft.tokens.shape[1]
        needed = jnp.max(jnp.where(use, jnp.arange(1, n + 1)[None, :], 0))        # nodes to read
        sizes, s = [], 1
        while s < n:
            sizes.append(s)
            s *= 2
        sizes.append(n)
        branches = [lambda m, s=s: update_matrix(m, draft.tokens[:, :s], target_logits[:, :s],
                                                 use[:, :s]) for s in sizes]
        index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), needed)
        return state.replace(matrix=jax.lax.switch(index, branches, state.matrix))
