"""Tree topologies for speculative drafts: static `TreeSpec`s and the run-time `DynamicTree` spec.

A tree is a parent array over N nodes; node 0 is the root (the last committed token) and every
other node's parent comes before it. A chain of n draft tokens is the tree whose node i has
parent i - 1. Topology is static configuration: a `TreeSpec` is frozen and hashable so it can
key jit caches, and its derived tables (depths, ancestor mask, children) are numpy arrays that
drafters and the scoring step bake into the program as constants.

Constructors: `chain`, `kary`, `from_paths` (the Medusa / EAGLE "choices" format), `from_parents`,
and `dynamic` for EAGLE-2-style trees whose topology is chosen at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only view, so a cached table cannot be changed behind the hashable spec's back."""
    a.setflags(write=False)
    return a


def _int(value, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """A static draft-tree topology: `parents[i]` is node i's parent, `parents[0] == -1`.

    Node 0 is the root (the last committed token); draft nodes are 1..N-1 and every parent
    precedes its child. Derived tables are computed once and cached; they are read-only numpy
    arrays (or tuples) so the spec stays a value that can be hashed and passed as a static arg.
    """

    parents: tuple[int, ...]

    def __post_init__(self):
        parents = tuple(_int(p, "a parent index") for p in self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents:
            raise ValueError("a tree needs at least the root node: parents must be non-empty, "
                             "with parents[0] == -1")
        if parents[0] != -1:
            raise ValueError(f"node 0 is the root and its parent must be -1, got {parents[0]}")
        for i, p in enumerate(parents[1:], start=1):
            if p == -1:
                raise ValueError(f"node {i} has parent -1, but only node 0 (the root) may; "
                                 f"node {i} needs a parent in [0, {i})")
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}, which does not come before it; "
                                 f"parents must satisfy 0 <= parents[{i}] < {i}")

    @functools.cached_property
    def num_nodes(self) -> int:
        """N: the root plus the draft nodes."""
        return len(self.parents)

    @functools.cached_property
    def depths(self) -> np.ndarray:
        """int32 [N]: edges from the root (root 0, its children 1, ...)."""
        depths = np.zeros(self.num_nodes, np.int32)
        for i, p in enumerate(self.parents[1:], start=1):
            depths[i] = depths[p] + 1
        return _frozen(depths)

    @functools.cached_property
    def max_depth(self) -> int:
        """D: the deepest node's depth = the most draft tokens one step can accept."""
        return int(self.depths.max())

    @functools.cached_property
    def position_offsets(self) -> np.ndarray:
        """int32 [N]: position of each node relative to the root's (= depth)."""
        return self.depths

    @functools.cached_property
    def ancestor_mask(self) -> np.ndarray:
        """bool [N, N]: row i is true at i's ancestors, i itself and the root (the tree mask)."""
        mask = np.zeros((self.num_nodes, self.num_nodes), bool)
        mask[0, 0] = True
        for i, p in enumerate(self.parents[1:], start=1):
            mask[i] = mask[p]
            mask[i, i] = True
        return _frozen(mask)

    @functools.cached_property
    def max_children(self) -> int:
        """K: the largest number of children of any node (0 for a root-only tree)."""
        counts = np.bincount(np.asarray(self.parents[1:], np.int64), minlength=self.num_nodes)
        return int(counts.max()) if self.num_nodes > 1 else 0

    @functools.cached_property
    def children(self) -> np.ndarray:
        """int32 [N, K]: each node's children in node order, padded with -1."""
        table = np.full((self.num_nodes, self.max_children), -1, np.int32)
        for i, rank in enumerate(self.child_rank[1:], start=1):
            table[self.parents[i], rank] = i
        return _frozen(table)

    @functools.cached_property
    def child_rank(self) -> np.ndarray:
        """int32 [N]: position of each node among its parent's children (root: -1)."""
        ranks = np.full(self.num_nodes, -1, np.int32)
        seen = [0] * self.num_nodes
        for i, p in enumerate(self.parents[1:], start=1):
            ranks[i] = seen[p]
            seen[p] += 1
        return _frozen(ranks)

    @functools.cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Root-to-leaf node lists, one per leaf, in leaf order; each starts at node 0."""
        is_leaf = np.ones(self.num_nodes, bool)
        is_leaf[list(self.parents[1:])] = False
        out = []
        for leaf in np.flatnonzero(is_leaf):
            path = [int(leaf)]
            while path[-1] != 0:
                path.append(self.parents[path[-1]])
            out.append(tuple(reversed(path)))
        return tuple(out)


def from_parents(parents: Iterable[int]) -> TreeSpec:
    """A TreeSpec from an explicit parent array (validated: the error names the bad node)."""
    return TreeSpec(tuple(parents))


def chain(n: int) -> TreeSpec:
    """A chain of n draft tokens after the root: N = n + 1 nodes, parent of i is i - 1."""
    n = _int(n, "chain length n")
    if n < 0:
        raise ValueError(f"chain length must be >= 0 draft tokens, got {n}")
    return TreeSpec(tuple(range(-1, n)))


def kary(k: int, depth: int) -> TreeSpec:
    """A full k-ary tree of the given depth (root excluded from the depth), nodes in BFS order."""
    k, depth = _int(k, "branching factor k"), _int(depth, "depth")
    if k < 1:
        raise ValueError(f"kary needs k >= 1 children per node, got k={k}")
    if depth < 0:
        raise ValueError(f"kary needs depth >= 0, got depth={depth}")
    parents, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for u in level:
            for _ in range(k):
                nxt.append(len(parents))
                parents.append(u)
        level = nxt
    return TreeSpec(tuple(parents))


def from_paths(paths: Iterable[Sequence[int]]) -> TreeSpec:
    """A TreeSpec from Medusa/EAGLE "choices": each path lists child ranks from the root.

    (0,) is the root's first child, (0, 1) that child's second child. The root is added; nodes
    are ordered by depth, then lexicographically, so a node's child rank equals its last path
    entry. Every prefix and every lower-ranked sibling of a listed path must be listed too.
    """
    norm = []
    for path in paths:
        try:
            t = tuple(operator.index(r) for r in path)
        except TypeError:
            raise ValueError(f"path {path!r} must be a sequence of integer child ranks") from None
        if not t:
            raise ValueError("path () is empty; the root is added automatically, list only "
                             "draft nodes")
        if any(r < 0 for r in t):
            raise ValueError(f"path {t} has a negative child rank; ranks are >= 0")
        norm.append(t)
    if not norm:
        raise ValueError("from_paths needs at least one path (use chain(0) for a root-only tree)")
    seen = set()
    for t in norm:
        if t in seen:
            raise ValueError(f"duplicate path {t}")
        seen.add(t)
    ordered = sorted(norm, key=lambda t: (len(t), t))
    for t in ordered:
        if len(t) > 1 and t[:-1] not in seen:
            raise ValueError(f"path {t} needs its prefix {t[:-1]} (its parent) to be listed")
        if t[-1] > 0 and t[:-1] + (t[-1] - 1,) not in seen:
            raise ValueError(f"path {t} needs its earlier sibling {t[:-1] + (t[-1] - 1,)}; "
                             f"child ranks must be 0, 1, 2, ... without gaps")
    index = {(): 0}
    parents = [-1]
    for t in ordered:
        index[t] = len(parents)
        parents.append(index[t[:-1]])
    return TreeSpec(tuple(parents))


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """Spec for a tree whose topology is chosen per row at run time (EAGLE-2 style).

    The drafter expands, per level, the top_k nodes by cumulative draft probability, each with
    its top_k children, for max_depth levels, then keeps the best `budget` nodes (ancestors of a
    kept node are kept). Shapes are static: always budget + 1 nodes; parents become per-row arrays.
    """

    budget: int
    max_depth: int
    top_k: int

    def __post_init__(self):
        for name in ("budget", "max_depth", "top_k"):
            value = _int(getattr(self, name), name)
            object.__setattr__(self, name, value)
            if value < 1:
                raise ValueError(f"dynamic tree needs {name} >= 1, got {name}={value}")
        if self.budget > self.max_candidates:
            raise ValueError(
                f"dynamic tree budget={self.budget} exceeds the {self.max_candidates} nodes that "
                f"max_depth={self.max_depth}, top_k={self.top_k} can produce "
                f"(top_k + (max_depth - 1) * top_k**2); lower the budget or widen the expansion")

    @property
    def max_candidates(self) -> int:
        """Nodes the expansion produces: top_k at level 1, top_k**2 at each later level."""
        return self.top_k + (self.max_depth - 1) * self.top_k ** 2

    @property
    def num_nodes(self) -> int:
        """N = budget + 1 (the root)."""
        return self.budget + 1

    @property
    def max_children(self) -> int:
        """At most top_k children per node (and never more than the budget)."""
        return min(self.top_k, self.budget)


def dynamic(budget: int, max_depth: int, top_k: int) -> DynamicTree:
    """A validated DynamicTree spec: budget draft nodes, at most max_depth deep, top_k wide."""
    return DynamicTree(budget, max_depth, top_k)


def ancestors_of(parents: jax.Array, steps: int) -> jax.Array:
    """Run-time ancestor mask of per-row parent arrays (dynamic trees): parents [B, T] (-1 at
    roots, parents[:, i] < i) -> [B, T, T] bool, row i true at i and its ancestors. `steps`
    bounds the depth (static)."""
    batch, t = parents.shape
    nodes = jnp.arange(t)
    mask = jnp.broadcast_to(jnp.eye(t, dtype=bool), (batch, t, t))
    cur = jnp.broadcast_to(nodes, (batch, t))
    for _ in range(steps):
        cur = jnp.where(cur >= 0, jnp.take_along_axis(parents, jnp.maximum(cur, 0), axis=1), -1)
        mask = mask | ((cur[..., None] == nodes) & (cur >= 0)[..., None])
    return mask


def _token_recycling_paths() -> list[tuple[int, ...]]:
    """80 draft nodes over 6 levels (8, 20, 22, 16, 9, 5), wide near the root, ranks < 8."""
    fanout = {
        (): 8,
        (0,): 8, (1,): 6, (2,): 4, (3,): 2,
        (0, 0): 8, (0, 1): 4, (1, 0): 4, (0, 2): 2, (2, 0): 2, (1, 1): 1, (0, 3): 1,
        (0, 0, 0): 6, (0, 0, 1): 3, (0, 1, 0): 2, (1, 0, 0): 2, (0, 0, 2): 1, (0, 2, 0): 1,
        (2, 0, 0): 1,
        (0, 0, 0, 0): 4, (0, 0, 0, 1): 2, (0, 0, 1, 0): 1, (0, 1, 0, 0): 1, (1, 0, 0, 0): 1,
        (0, 0, 0, 0, 0): 3, (0, 0, 0, 0, 1): 1, (0, 0, 0, 1, 0): 1,
    }
    return [prefix + (r,) for prefix, n in fanout.items() for r in range(n)]


# The Medusa "mc_sim_7b_63" choice list: 63 draft nodes, depth 4, ten children under the root.
_MEDUSA_63_PATHS = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3),
    (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0),
    (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
]

MEDUSA_63: TreeSpec = from_paths(_MEDUSA_63_PATHS)
TOKEN_RECYCLING_80: TreeSpec = from_paths(_token_recycling_paths())
