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


_verify_jit = jax.jit(verify, static_argnames=("rule", "max_depth", "max_children"))


def _verify(rule, draft, logits, sampling=Sampling(), key=jax.random.key(0), **kw):
    max_depth = kw.pop("max_depth", draft.tokens.shape[1] - 1)
    max_children = kw.pop("max_children", draft.tokens.shape[1] - 1)
    return _verify_jit(rule, draft, logits, sampling, key, max_depth=max_depth,
                       max_children=max_children, **kw)


# ---------------------------------------------------------------------------------------------
# greedy: table-driven exact cases
# (parents, tokens, valid, target argmax per node) -> (path, num_accepted, next_token)

R = ROOT_TOKEN
GREEDY_CASES = {
    "chain all accepted": ((-1, 0, 1, 2), (R, 5, 6, 7), None, (5, 6, 7, 8), ((0, 1, 2, 3), 3, 8)),
    "chain second rejected": ((-1, 0, 1, 2), (R, 5, 9, 7), None, (5, 6, 7, 8),
                              ((0, 1, 0, 0), 1, 6)),
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


# ---------------------------------------------------------------------------------------------
# lossless rules: exact enumeration on a tiny vocabulary

V = 4  # vocabulary
N = 7  # nodes per draft, topologies padded with invalid nodes (one compile for all of them)
L = 4  # stream length checked = max_depth + 1
M = V ** 6  # rows: every token assignment of the largest topology, smaller ones padded
BOUNDS = dict(max_depth=L - 1, max_children=3)

# name -> (parents, valid); missing nodes are padding: parent 0, invalid.
TOPOLOGIES = {
    "chain1": ((-1, 0), None),
    "chain2": ((-1, 0, 1), None),
    "chain3": ((-1, 0, 1, 2), None),
    "fork3": ((-1, 0, 0, 0), None),
    "tree2x1": ((-1, 0, 0, 1, 2), None),
    "tree2x2": ((-1, 0, 0, 1, 1, 2, 2), None),
    "lopsided": ((-1, 0, 0, 1, 3), None),
    "invalid middle sibling": ((-1, 0, 0, 0, 1, 3), (1, 1, 0, 1, 1, 1)),
}

PLAIN = Sampling(temperature=1.0, filtered=True)  # same program as FILTERED, no filter values
FILTERED = Sampling(temperature=0.8, top_k=3, top_p=0.9)
GREEDY = Sampling(temperature=0.0)

_outcome = jax.jit(outcome_distribution, static_argnames=("rule", "max_depth", "max_children"))


def _markov_tables(sampling, seed):
    """Raw target logits [L, V, V]; processed target [L, V, V] (float64), draft [L, V, V] and
    per-node draft [N, V, V] distributions. table[d, t]: the token after token t at depth d."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(0, 1.5, (2 * L + N, V, V)), jnp.float32)
    draft_sampling = PLAIN if sampling.greedy else sampling
    target = np.asarray(probabilities(logits[:L], sampling), np.float64)
    draft = np.asarray(probabilities(logits[L:], draft_sampling), np.float32)
    return np.asarray(logits[:L]), target, draft[:L], draft[L:]


def _topology(name):
    parents, valid = TOPOLOGIES[name]
    valid = (1,) * len(parents) if valid is None else valid
    pad = N - len(parents)
    parents = np.array(parents + (0,) * pad)
    valid = np.array(valid + (0,) * pad, bool)
    depth = np.zeros(N, int)
    for i in range(1, N):
        depth[i] = depth[parents[i]] + 1
    path = [[i] for i in range(N)]
    for i in range(N):
        while path[i][0] != 0:
            path[i].insert(0, parents[path[i][0]])
    live = np.array([all(valid[j] for j in path[i]) for i in range(N)])
    drafted = [i for i in range(1, N) if live[i]]
    return parents, valid, depth, path, drafted


def _enumerate(name, scheme, target_table, q_ctx, q_node):
    """All drafts of a topology: tokens [M, N], their probability [M], stored q [M, N, V] | None."""
    parents, valid, depth, _, drafted = _topology(name)
    combos = np.array(list(itertools.product(range(V), repeat=len(drafted))), int)
    combos = combos.reshape(-1, len(drafted))
    tokens = np.zeros((M, N), int)
    tokens[:, 0] = ROOT_TOKEN
    tokens[:len(combos), drafted] = combos
    weight = np.zeros(M)
    weight[:len(combos)] = 1.0
    q = np.zeros((M, N, V))
    valid = np.broadcast_to(valid, (M, N)).copy()
    for u in range(N):
        children = [c for c in drafted if parents[c] == u]
        shared = q_ctx[depth[u], tokens[:, u]].astype(np.float64)  # [M, V]
        taken = np.zeros((M, V))  # WOR: proposal mass already used by earlier siblings
        for c in children:
            x = tokens[:, c]
            if scheme == "independent":
                q[:, c] = q_node[c, tokens[:, u]]
            elif scheme in ("wor", "wor_conditional"):
                rest = np.where(taken > 0, 0.0, shared)
                mass = rest.sum(-1, keepdims=True)
                cond = np.divide(rest, mass, out=np.zeros_like(rest), where=mass > 0)
                q[:, c] = shared if scheme == "wor" else cond
                taken[np.arange(M), x] = 1
                # More siblings than the support holds: a drafter marks the extras invalid; the
                # enumeration still lists their V token values, each with weight 1/V.
                exhausted = mass[:, 0] == 0
                valid[exhausted, c] = False
                weight *= np.where(exhausted, 1.0 / V, cond[np.arange(M), x])
                continue
            else:
                q[:, c] = shared
            weight *= q[np.arange(M), c, x]
    if scheme == "onehot":
        weight[:len(combos)] = 1.0
    target_logits = target_table[depth[None, :], tokens]  # [M, N, V] raw logits
    draft = Draft(tokens=jnp.asarray(tokens, jnp.int32),
                  parents=jnp.asarray(np.broadcast_to(np.where(np.arange(N) == 0, -1, parents),
                                                      (M, N)), jnp.int32),
                  valid=jnp.asarray(valid),
                  q=None if scheme == "onehot" else jnp.asarray(q, jnp.float32))
    return draft, target_logits, weight, len(combos)


def _continuation(target):
    """cont[l]: [V, V**(L-l)], target probability of tokens l+1..L given token l (at depth l)."""
    cont = {L: np.ones((V, 1))}
    for l in range(L - 1, 0, -1):
        # [s_l, s_{l+1}, rest] = P(s_{l+1} | s_l at depth l) * cont[l+1][s_{l+1}, rest]
        cont[l] = (target[l][:, :, None] * cont[l + 1][None]).reshape(V, -1)
    return cont


def _stream_law(name, draft, out, target):
    """Per row: law [M, V**L] of the first L generated tokens (emitted, then the target's)."""
    parents, _, depth, path, drafted = _topology(name)
    cont = _continuation(target)
    tokens = np.asarray(draft.tokens)
    law = np.zeros((M, V ** L))
    rows = np.arange(M)[:, None]
    for i in [0] + drafted:
        d = depth[i]
        prefix = sum((tokens[:, path[i][k]] * V ** (L - k) for k in range(1, d + 1)),
                     np.zeros(M, int))  # [M]
        block = (out[:, i, :, None] * cont[d + 1][None]).reshape(M, -1)  # [M, V**(L-d)]
        np.add.at(law, (rows, prefix[:, None] + np.arange(V ** (L - d))), block)
    expected = (target[0, ROOT_TOKEN][:, None] * cont[1]).reshape(-1)  # [V**L]
    return law, expected


def _prefix_errors(law, expected):
    """Max abs error of the law of the first l tokens, for l = 1..L."""
    return [np.abs(law.reshape(-1, V ** l, V ** (L - l)).sum(-1)
                   - expected.reshape(V ** l, -1).sum(-1)).max() for l in range(1, L + 1)]


# (scheme, rule, sampling): how siblings are drafted, the rule that must be lossless for them.
SCHEMES = {
    "iid plain": ("iid", "speculative", PLAIN),
    "iid top-k top-p": ("iid", "speculative", FILTERED),
    "iid greedy target": ("iid", "speculative", GREEDY),
    "independent per-node q": ("independent", "speculative", FILTERED),
    "wor plain": ("wor", "speculative_wor", PLAIN),
    "wor top-k top-p": ("wor", "speculative_wor", FILTERED),
    "wor conditional q stored": ("wor_conditional", "speculative_wor", FILTERED),
    "iid drafts, wor rule": ("iid", "speculative_wor", FILTERED),
    "independent q, wor rule": ("independent", "speculative_wor", PLAIN),
    "onehot speculative": ("onehot", "speculative", FILTERED),
    "onehot speculative greedy": ("onehot", "speculative", GREEDY),
    "onehot wor": ("onehot", "speculative_wor", PLAIN),
}


def _law(name, scheme, rule, sampling, seed):
    table, target, q_ctx, q_node = _markov_tables(sampling, seed)
    draft, target_logits, weight, rows = _enumerate(name, scheme, table, q_ctx, q_node)
    out = np.asarray(_outcome(rule, draft, jnp.asarray(target_logits, jnp.float32), sampling,
                              **BOUNDS), np.float64)  # [M, N, V]
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum((1, 2)), 1.0, atol=1e-6)
    law, expected = _stream_law(name, draft, out, target)
    return law[:rows], weight[:rows], expected


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("name", TOPOLOGIES)
def test_lossless_by_enumeration(name, scheme_name):
    scheme, rule, sampling = SCHEMES[scheme_name]
    seed = list(TOPOLOGIES).index(name) * 100 + list(SCHEMES).index(scheme_name)
    law, weight, expected = _law(name, scheme, rule, sampling, seed)
    if scheme == "onehot":
        # a deterministic draft: every single draft must already be lossless
        errors = [max(_prefix_errors(row[None], expected)) for row in law]
    else:
        np.testing.assert_allclose(weight.sum(), 1.0, atol=1e-6)
        errors = _prefix_errors(weight @ law, expected)
    assert max(errors) < 1e-6, errors


@pytest.mark.parametrize("name", ["fork3", "tree2x2"])
def test_enumeration_detects_a_mismatched_rule(name):
    """Negative control: the i.i.d. rule on siblings drawn without replacement is not lossless."""
    law, weight, expected = _law(name, "wor", "speculative", PLAIN, seed=7)
    assert max(_prefix_errors(weight @ law, expected)) > 1e-3


# ---------------------------------------------------------------------------------------------
# verify draws from outcome_distribution

@pytest.mark.parametrize("scheme, rule", [("iid", "speculative"), ("wor", "speculative_wor")])
def test_verify_samples_the_outcome_distribution(scheme, rule):
    table, target, q_ctx, q_node = _markov_tables(FILTERED, seed=11)
    drafts, target_logits, weight, _ = _enumerate("tree2x2", scheme, table, q_ctx, q_node)
    m = int(np.argmax(weight))  # the most likely draft: accepts often, on several branches
    draft = jax.tree.map(lambda x: x[m:m + 1], drafts)
    logits = jnp.asarray(target_logits[m:m + 1], jnp.float32)  # [1, N, V]
    exact = np.asarray(_outcome(rule, draft, logits, FILTERED, **BOUNDS))[0]  # [N, V]
    keys = jax.random.split(jax.random.key(1), 20_000)
    verdicts = jax.vmap(lambda k: _verify_jit(rule, draft, logits, FILTERED, k, **BOUNDS))(keys)
    path, accepted = np.asarray(verdicts.path[:, 0]), np.asarray(verdicts.num_accepted[:, 0])
    node = path[np.arange(len(keys)), accepted]
    _, _, _, node_paths, _ = _topology("tree2x2")
    for i in np.unique(node):  # the path is the node's ancestor chain, zero-padded
        expected_path = node_paths[i] + [0] * (L - len(node_paths[i]))
        assert (path[node == i] == expected_path).all()
    freq = np.zeros((N, V))
    np.add.at(freq, (node, np.asarray(verdicts.next_token[:, 0])), 1.0 / len(keys))
    assert (freq[exact == 0] == 0).all()
    assert np.abs(freq - exact).max() < 0.015, np.abs(freq - exact).max()
    assert len(np.unique(node)) >= 3  # several outcomes were exercised


# ---------------------------------------------------------------------------------------------
# typical (lossy), auto, temperature 0

def _random_drafts(parents, rows, seed):
    """Random drafts [rows, N] over V tokens and logits [rows, N, V] (V small: many accepts)."""
    rng = np.random.default_rng(seed)
    n = len(parents)
    draft = Draft(tokens=jnp.asarray(rng.integers(0, V, (rows, n)), jnp.int32),
                  parents=jnp.asarray(np.broadcast_to(parents, (rows, n)), jnp.int32),
                  valid=jnp.asarray(rng.uniform(size=(rows, n)) < 0.9))
    return draft, jnp.asarray(rng.normal(size=(rows, n, V)), jnp.float32)


def _same(a: Verdict, b: Verdict):
    for field in ("path", "num_accepted", "next_token"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_typical_and_speculative_equal_greedy_at_temperature_0():
    tree = trees.from_parents(TOPOLOGIES["tree2x2"][0])
    draft, logits = _random_drafts(tree.parents, 256, seed=3)
    bounds = dict(max_depth=tree.max_depth, max_children=tree.max_children)
    greedy = _verify("greedy", draft, logits, **bounds)
    assert 0 < float(greedy.num_accepted.mean()) < tree.max_depth
    _same(_verify("typical", draft, logits, GREEDY, **bounds), greedy)
    _same(_verify("auto", draft, logits, GREEDY, **bounds), greedy)
    # on chains (no duplicate siblings to choose between) the lossless rule is greedy too
    draft, logits = _random_drafts(trees.chain(3).parents, 256, seed=4)
    _same(_verify("speculative", draft, logits, GREEDY, max_depth=3, max_children=1),
          _verify("greedy", draft, logits, max_depth=3, max_children=1))


def test_auto_samples_with_speculative():
    draft, logits = _random_drafts(TOPOLOGIES["tree2x2"][0], 64, seed=5)
    key = jax.random.key(3)
    _same(_verify("auto", draft, logits, FILTERED, key, max_depth=2, max_children=2),
          _verify("speculative", draft, logits, FILTERED, key, max_depth=2, max_children=2))


# root distribution [0.5, 0.3, 0.15, 0.05]: entropy 1.142, delta * exp(-H) = 0.0958 for delta 0.3
TYPICAL_CASES = {
    "p 0.15 > min(0.09, 0.0958)": (2, {}, 1),
    "p 0.05 < 0.09": (3, {}, 0),
    "p 0.3 accepted": (1, {}, 1),
    "larger eps: threshold 0.0958": (2, dict(eps=0.2), 1),
    "larger eps and delta: threshold 0.2": (2, dict(eps=0.2, delta=1.0), 0),
}


@pytest.mark.parametrize("case", TYPICAL_CASES.values(), ids=TYPICAL_CASES.keys())
def test_typical_threshold(case):
    token, kwargs, accepted = case
    root = np.log([0.5, 0.3, 0.15, 0.05])
    after = np.log([0.1, 0.2, 0.3, 0.4])  # argmax 3 after the drafted token
    logits = jnp.asarray([[root, after]], jnp.float32)  # [1, 2, V]
    verdict = _verify("typical", _draft((-1, 0), (R, token)), logits, PLAIN, max_depth=1,
                      max_children=1, **kwargs)
    assert verdict.num_accepted.tolist() == [accepted]
    assert verdict.next_token.tolist() == [3 if accepted else 0]  # argmax of p, no sampling


def test_typical_is_documented_lossy():
    # drafting token 1 (p = 0.3) always emits it first: not the target's distribution
    root = np.log([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray([[root, root]], jnp.float32)
    for seed in range(3):
        verdict = _verify("typical", _draft((-1, 0), (R, 1)), logits, PLAIN, jax.random.key(seed),
                          max_depth=1, max_children=1)
        assert verdict.path[0, 1] == 1
    assert "LOSSY" in verify.__doc__


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_rule_name():
    draft, logits = _random_drafts((-1, 0), 1, seed=0)
    with pytest.raises(ValueError, match="unknown verification rule 'nope'; expected one of "
                                         "greedy, speculative, speculative_wor, typical, auto"):
        verify("nope", draft, logits, FILTERED, jax.random.key(0), max_depth=1, max_children=1)
    with pytest.raises(ValueError, match="rules speculative, speculative_wor; got 'greedy'"):
        outcome_distribution("greedy", draft, logits, FILTERED, max_depth=1, max_children=1)


@pytest.mark.parametrize("change, message", [
    (dict(logits=jnp.zeros((1, 3, V))), r"target_logits must be \[B, N, V\] = \[1, 2, V\]"),
    (dict(q=jnp.full((1, 2, V + 1), 0.2)), r"draft.q must be \[B, N, V\] = \[1, 2, 4\]"),
    (dict(parents=jnp.asarray([[-1, 0, 1]])), r"draft.parents must be \[B, N\] = \[1, 2\]"),
    (dict(max_depth=-1), "max_depth must be a static int >= 0, got -1"),
])
def test_bad_shapes(change, message):
    draft, logits = _random_drafts((-1, 0), 1, seed=0)
    draft = draft.replace(q=change.get("q"), parents=change.get("parents", draft.parents))
    with pytest.raises(ValueError, match=message):
        verify("speculative", draft, change.get("logits", logits), FILTERED, jax.random.key(0),
               max_depth=change.get("max_depth", 1), max_children=1)
