"""Acceptance rules: exact greedy tables, exact losslessness by enumeration, sampling, errors.

The enumeration tests use a tiny Markov "language": the target's (and draft's) distribution
after a token depends only on that token and its depth. For every possible draft (all token
assignments, weighted by their probability under the drafting scheme) the rule's exact outcome
law is combined with the target's continuation, and the law of the generated stream must equal
the target's own, for every prefix length.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.sampling import Sampling, probabilities
from jaxspec.speculative import trees
from jaxspec.speculative.draft import Draft
from jaxspec.speculative.verify import Verdict, outcome_distribution, verify

ROOT_TOKEN = 0


def _draft(parents, tokens, valid=None, q=None):
    """A batch-1 Draft from python lists."""
    parents = jnp.asarray([parents], jnp.int32)
    tokens = jnp.asarray([tokens], jnp.int32)
    valid = jnp.ones_like(tokens, bool) if valid is None else jnp.asarray([valid], bool)
    return Draft(tokens=tokens, parents=parents, valid=valid, q=q)


def _peaked_logits(top, vocab=10, seed=0):
    """[1, N, V] logits whose argmax at node i is top[i]."""
    noise = np.random.default_rng(seed).uniform(0, 1, (1, len(top), vocab))
    return jnp.asarray(noise + 5 * np.eye(vocab)[list(top)][None], jnp.float32)


def _verify(rule, draft, logits, sampling=Sampling(), key=jax.random.key(0), **kw):
    max_depth = kw.pop("max_depth", draft.tokens.shape[1] - 1)
    max_children = kw.pop("max_children", draft.tokens.shape[1] - 1)
    return verify(rule, draft, logits, sampling, key, max_depth=max_depth,
                  max_children=max_children, **kw)


# ---------------------------------------------------------------------------------------------
# greedy: table-driven exact cases
# (parents, tokens, valid, target argmax per node) -> (path, num_accepted, next_token)

R = ROOT_TOKEN
GREEDY_CASES = {
    "chain all accepted": ((-1, 0, 1, 2), (R, 5, 6, 7), None, (5, 6, 7, 8), ((0, 1, 2, 3), 3, 8)),
    "chain second rejected": ((-1, 0, 1, 2), (R, 5, 9, 7), None, (5, 6, 7, 8), ((0, 1, 0, 0), 1, 6)),
    "chain first rejected": ((-1, 0, 1, 2), (R, 4, 6, 7), None, (5, 6, 7, 8), ((0, 0, 0, 0), 0, 5)),
    "chain padded tail": ((-1, 0, 1, 2), (R, 5, 6, 7), (1, 1, 1, 0), (5, 6, 7, 8),
                          ((0, 1, 2, 0), 2, 7)),
    "chain invalid middle cuts descendants": ((-1, 0, 1, 2), (R, 5, 6, 7), (1, 1, 0, 1),
                                              (5, 6, 7, 8), ((0, 1, 0, 0), 1, 6)),
    "tree second branch": ((-1, 0, 0, 1, 2), (R, 4, 5, 6, 7), None, (5, 1, 7, 2, 3),
                           ((0, 2, 4), 2, 3)),
    "tree deepest wins over first": ((-1, 0, 0, 1, 2, 4), (R, 5, 5, 9, 1, 2), None,
                                     (5, 1, 1, 3, 2, 6), ((0, 2, 4, 5), 3, 6)),
    "tie between duplicate siblings: lowest index": ((-1, 0, 0), (R, 5, 5), None, (5, 8, 9),
                                                    ((0, 1), 1, 8)),
    "tie at depth 2: lowest index": ((-1, 0, 0, 1, 2), (R, 5, 5, 3, 3), None, (5, 3, 3, 7, 8),
                                     ((0, 1, 3), 2, 7)),
    "invalid matching sibling skipped": ((-1, 0, 0), (R, 5, 5), (1, 0, 1), (5, 8, 9),
                                         ((0, 2), 1, 9)),
    "padding nodes hung on the root": ((-1, 0, 0, 0, 1), (R, 5, 5, 5, 6), (1, 1, 0, 0, 1),
                                       (5, 6, 6, 6, 4), ((0, 1, 4), 2, 4)),
    "root-only draft": ((-1,), (R,), None, (3,), ((0,), 0, 3)),
}


@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_greedy_table(case):
    parents, tokens, valid, top, (path, num_accepted, next_token) = case
    draft = _draft(parents, tokens, valid)
    max_depth = int(trees.from_parents(parents).max_depth)
    verdict = _verify("greedy", draft, _peaked_logits(top), max_depth=max_depth)
    assert isinstance(verdict, Verdict)
    assert verdict.path.shape == (1, max_depth + 1) and verdict.path.dtype == jnp.int32
    assert verdict.path[0].tolist() == list(path)
    assert verdict.num_accepted.tolist() == [num_accepted]
    assert verdict.next_token.tolist() == [next_token]


def test_greedy_batch_rows_are_independent():
    """Rows of one batch (different topologies, same N) give their own single-row answers."""
    rows = [((-1, 0, 1, 2, 3), (R, 5, 6, 7, 1), (5, 6, 7, 8, 9)),
            ((-1, 0, 0, 1, 2), (R, 5, 5, 3, 3), (5, 3, 3, 7, 8)),
            ((-1, 0, 0, 1, 2), (R, 4, 5, 6, 7), (5, 1, 7, 2, 3))]
    draft = Draft(tokens=jnp.asarray([r[1] for r in rows]),
                  parents=jnp.asarray([r[0] for r in rows]), valid=jnp.ones((3, 5), bool))
    logits = jnp.concatenate([_peaked_logits(r[2]) for r in rows])  # [3, 5, V]
    batched = _verify("greedy", draft, logits, max_depth=4)
    for b, (parents, tokens, top) in enumerate(rows):
        single = _verify("greedy", _draft(parents, tokens), _peaked_logits(top), max_depth=4)
        for field in ("path", "num_accepted", "next_token"):
            assert getattr(batched, field)[b].tolist() == getattr(single, field)[0].tolist()
