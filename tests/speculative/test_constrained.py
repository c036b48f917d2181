"""Speculative decoding under a js.Constraint: pruned drafts, constrained verification.

Exact: walking the DFA along a draft and masking q keeps every lossless rule lossless (the law of
the first emitted token, enumerated over the draft's draws, is the constrained target's), and
masking q is what makes it so (pruning alone is not). Greedy: constrained speculative output is
token for token constrained greedy autoregressive output, for a draft model (chain and tree) and
prompt lookup. Sampling: a seeded chi-square test that the first three tokens of constrained
speculative sampling follow the constrained target's exact law.

The models are the 32-token random llamas of conftest.py; token i spells WORDS[i].
"""

from __future__ import annotations

import functools
import itertools
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec import constraints
from jaxspec.models.transformer import forward_train
from jaxspec.sampling import Sampling, probabilities
from jaxspec.speculative.constrained import constrain_draft, node_states
from jaxspec.speculative.draft import Draft
from jaxspec.speculative.loop import generate_tokens
from jaxspec.speculative.verify import outcome_distribution

WORDS = list(string.ascii_lowercase) + ["ab", "cd", "ef", "gh", "ij", "<eos>"]
STOP = 31
# A letter a-h (or "ab") then pairs (i-p, a-h), optionally closed by q-t: which tokens are allowed
# depends on the state, and every state after an a-h letter is final (the stop is allowed there).
PATTERN = r"(ab|[a-h])([i-p][a-h])*[q-t]?"


@pytest.fixture(scope="module")
def constraint(tiny):
    return js.Constraint.regex(PATTERN, tiny.make_tokenizer(WORDS), stop_tokens=[STOP])


def _text(tokens) -> str:
    return "".join(WORDS[t] for t in tokens if t != STOP)


# -- exact: pruning + masked q keeps the rules lossless ----------------------------------------

def _p_constrained(constraint, logits, state, sampling):
    masked = constraints.mask_logits(constraint, jnp.asarray(logits), jnp.asarray(state))
    return np.asarray(probabilities(masked, sampling), np.float64)


def _first_token_law(constraint, rule, weights, drafted, root_logits, node_logits, q, sampling,
                     mask_q=True):
    """P(first emitted token) [V], summed over every draft: drafted [D, K] sibling tokens under
    the root, with probabilities weights [D]; all D drafts verified as one batch."""
    d, k = drafted.shape
    v = root_logits.shape[-1]
    draft = Draft(tokens=jnp.asarray(np.concatenate([np.zeros((d, 1), int), drafted], 1), jnp.int32),
                  parents=jnp.asarray(np.tile([-1] + [0] * k, (d, 1)), jnp.int32),
                  valid=jnp.ones((d, k + 1), bool),
                  q=jnp.asarray(np.concatenate([np.zeros((d, 1, v)), np.tile(q, (d, k, 1))], 1),
                                jnp.float32))
    start = jnp.full((d,), constraint.start, jnp.int32)
    pruned, state = constrain_draft(constraint, draft, start, 1)
    if not mask_q:
        pruned = pruned.replace(q=draft.q)
    logits = np.concatenate([np.tile(root_logits, (d, 1, 1)), node_logits[drafted]], 1)
    masked = constraints.mask_logits(constraint, jnp.asarray(logits, jnp.float32), state)
    out = np.asarray(outcome_distribution(rule, pruned, masked, sampling, max_depth=1,
                                          max_children=k), np.float64)         # [D, K+1, V]
    first = out[:, 0].copy()                                                    # [D, V]
    for i in range(k):                          # node i + 1 accepted: its token comes first
        np.add.at(first, (np.arange(d), drafted[:, i]), out[:, i + 1].sum(-1))
    return weights @ first


@pytest.mark.parametrize("rule, siblings", [("speculative", 1), ("speculative", 2),
                                            ("speculative_wor", 2)])
def test_pruned_draft_keeps_the_constrained_law(constraint, rule, siblings):
    """Enumerate every draft (siblings i.i.d. from q, or without replacement for
    speculative_wor): the first emitted token has exactly the constrained target's law; with the
    pruned draft's q left unmasked it does not."""
    rng = np.random.default_rng(0)
    v = len(WORDS)
    sampling = Sampling(temperature=0.9)
    root_logits = rng.normal(0, 2, v)[None]     # [1, V]
    node_logits = rng.normal(0, 2, (v, v))      # [V, V]: the target after each draft token
    q = rng.dirichlet(np.full(v, 0.5))
    if siblings == 1:
        drafted = np.arange(v)[:, None]
        weights = q
    else:
        drafted = np.asarray(list(itertools.product(range(v), repeat=2)))
        a, b = drafted.T
        weights = q[a] * q[b] if rule == "speculative" else np.where(
            a != b, q[a] * q[b] / (1 - q[a]), 0.0)          # without replacement: b != a
    start = int(constraint.start)
    allowed = np.asarray(constraints.allowed_tokens(constraint, jnp.asarray(start)))
    assert 0.2 < q[allowed].sum() < 0.8        # the draft leaves the language often
    args = (constraint, rule, weights, drafted, root_logits, node_logits, q, sampling)
    law = _first_token_law(*args)
    want = _p_constrained(constraint, root_logits[0], start, sampling)
    np.testing.assert_allclose(law, want, atol=1e-5)
    assert law[~allowed].sum() < 1e-7
    naive = _first_token_law(*args, mask_q=False)
    assert np.abs(naive - want).max() > 1e-2


def test_node_states_walk_the_tree(constraint):
    """Node states follow the parent chain; a node off the language and its subtree get -1."""
    t = {w: i for i, w in enumerate(WORDS)}
    # root = "c" (state after it), children: "i" (ok), "b" (off: a-h after a-h), "q" (ok);
    # grandchildren under "i": "c" (ok), "j" (off); under "b": "a" (off: its parent is off).
    tokens = [t["c"], t["i"], t["b"], t["q"], t["c"], t["j"], t["a"]]
    parents = [-1, 0, 0, 0, 1, 1, 2]
    draft = Draft(tokens=jnp.asarray([tokens], jnp.int32), parents=jnp.asarray([parents], jnp.int32),
                  valid=jnp.ones((1, 7), bool))
    root = constraints.advance(constraint, constraint.start, jnp.asarray(t["c"]))[None]
    state = np.asarray(node_states(constraint, root, draft, max_depth=2))[0]
    assert (state[[0, 1, 3, 4]] >= 0).all() and (state[[2, 5, 6]] == -1).all()
    pruned, _ = constrain_draft(constraint, draft, root, max_depth=2)
    assert np.asarray(pruned.valid)[0].tolist() == [True, True, False, True, True, False, False]
    table = np.asarray(constraint.next_state)
    assert state[4] == table[table[state[0], t["i"]], t["c"]]


# -- greedy: identical to constrained greedy autoregressive -------------------------------------

@functools.partial(jax.jit, static_argnames=("max_new",))
def _run(target, drafter, tokens, lengths, sampling, key, constraint, max_new):
    out, _ = generate_tokens(target, drafter, tokens, lengths, max_new, sampling, key,
                             stop_tokens=constraint.stop_tokens, constraint=constraint)
    return out


def _prompts(tiny):
    tp = max(map(len, tiny.prompts))
    tokens = np.zeros((len(tiny.prompts), tp), np.int32)
    for i, p in enumerate(tiny.prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in tiny.prompts], jnp.int32)


@pytest.fixture(scope="module")
def constrained_greedy(tiny, target, constraint):
    tokens, lengths = _prompts(tiny)
    return jax.device_get(_run(target, None, tokens, lengths, Sampling(), jax.random.PRNGKey(0),
                               constraint, tiny.max_new))


@pytest.mark.parametrize("name", ["draft_model", "draft_model_tree", "prompt_lookup"])
def test_greedy_identical_to_constrained_autoregressive(name, tiny, target, related_draft,
                                                        constraint, constrained_greedy):
    drafter = {"draft_model": js.DraftModel(related_draft, num_tokens=3),
               "draft_model_tree": js.DraftModel(related_draft, tree=js.trees.kary(2, 2)),
               "prompt_lookup": js.PromptLookup(ngram=1, num_tokens=4)}[name]
    tokens, lengths = _prompts(tiny)
    out = jax.device_get(_run(target, drafter, tokens, lengths, Sampling(), jax.random.PRNGKey(0),
                              constraint, tiny.max_new))
    ref = constrained_greedy
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert out.accepted.sum() > 0, "no draft token survived pruning: the test shows nothing"
    for row, n in zip(ref.tokens, ref.lengths):
        text = _text(row[:n])
        if row[n - 1] == STOP:
            assert re.fullmatch(PATTERN, text), text
        else:                                  # cut by max_new_tokens: a prefix of a match
            assert any(re.fullmatch(PATTERN, text + end) for end in ("", "a", "q"))


# -- sampling: the constrained target's law -----------------------------------------------------

SAMPLING = Sampling(temperature=0.8, top_k=6)
ROWS = 4000
PROMPT = [5, 9, 3]
END = len(WORDS)         # the cell index for "nothing: the row had stopped"


def _constrained_law(target, constraint, sampling, unconstrained=False):
    """P(x1, x2, x3) [V, V+1, V+1] of constrained autoregressive sampling (END after a stop);
    unconstrained=True: the law without the constraint (a wrong law for the power check)."""
    v = len(WORDS)
    x1, x2 = np.meshgrid(np.arange(v), np.arange(v), indexing="ij")
    seqs = np.concatenate([np.tile(PROMPT, (v * v, 1)), x1.reshape(-1, 1), x2.reshape(-1, 1)], 1)
    logits, _ = forward_train(target.params, target.config, jnp.asarray(seqs, jnp.int32))
    t = len(PROMPT)
    s0 = jnp.full((v * v,), constraint.start, jnp.int32)
    s1 = constraints.advance(constraint, s0, jnp.asarray(x1.reshape(-1)))
    s2 = constraints.advance(constraint, s1, jnp.asarray(x2.reshape(-1)))

    def law(step_logits, state):
        ok = constraints.allowed_tokens(constraint, state) & (state >= 0)[:, None]
        if unconstrained:
            ok = jnp.ones_like(ok)
        return np.asarray(probabilities(jnp.where(ok, step_logits, -jnp.inf), sampling), np.float64)

    p1 = law(logits[:, t - 1], s0)[0]                                           # [V]
    p2 = law(logits[:, t], s1).reshape(v, v, v)[:, 0]                           # [x1, x2]
    p3 = law(logits[:, t + 1], s2).reshape(v, v, v)                             # [x1, x2, x3]
    p2, p3 = np.nan_to_num(p2), np.nan_to_num(p3)           # rows after an off-language prefix
    out = np.zeros((v, v + 1, v + 1))
    out[:, :v, :v] = p1[:, None, None] * p2[:, :, None] * p3
    out[:, STOP, :] = 0.0
    out[:, STOP, END] = p1 * p2[:, STOP]
    out[STOP] = 0.0
    out[STOP, END, END] = p1[STOP]
    return out


def _chi_square(observed, law, rows):
    """Pearson chi-square p-value; cells expected below 5 pooled into one. (p, cells)."""
    from scipy.stats import chi2

    expected, observed = law.reshape(-1) * rows, observed.reshape(-1)
    big = expected >= 5
    exp = np.append(expected[big], expected[~big].sum())
    obs = np.append(observed[big], observed[~big].sum())
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    return float(chi2.sf(stat, keep.sum() - 1)), int(keep.sum())


@pytest.mark.parametrize("name", ["draft_model", "draft_model_tree"])
def test_sampled_law_is_the_constrained_targets(name, target, related_draft, constraint):
    """Seeded chi-square test: the first three tokens (a stop ends a row early) of constrained
    speculative sampling follow constrained autoregressive sampling's exact law.

    Mask first, then temperature / top-k, is the constrained distribution. The draft model's q is
    stochastic, so pruning its off-language draws is only lossless because q is masked too (the
    exact test above shows the unmasked version is wrong). p > 1e-3 is a loose bar a correct
    sampler passes with probability 0.999 under a fresh seed (seeds 3 and 4: p = 1.0 / 0.09 for
    the chain, 0.30 / 0.44 for the tree); power: the same sample is rejected against the
    unconstrained law and the constrained law without top-k (p < 1e-75). Checked by hand, not in
    the suite: pruning without masking q gives p ~ 1e-44 (chain).
    """
    drafter = {"draft_model": js.DraftModel(related_draft, num_tokens=3),
               "draft_model_tree": js.DraftModel(related_draft, tree=js.trees.kary(2, 2))}[name]
    tokens = jnp.asarray(np.tile(PROMPT, (ROWS, 1)), jnp.int32)
    lengths = jnp.full((ROWS,), len(PROMPT), jnp.int32)
    out = jax.device_get(_run(target, drafter, tokens, lengths, SAMPLING, jax.random.PRNGKey(3),
                              constraint, 3))
    got = np.where(np.arange(3)[None, :] < out.lengths[:, None], out.tokens[:, :3], END)
    v = len(WORDS)
    observed = np.zeros((v, v + 1, v + 1))
    np.add.at(observed, tuple(got.T), 1)
    assert 0.2 < out.accepted.mean() and (got == STOP).any()   # acceptances and stops
    law = _constrained_law(target, constraint, SAMPLING)
    assert law.sum() == pytest.approx(1.0, abs=1e-4)
    pvalue, cells = _chi_square(observed, law, ROWS)
    assert cells >= 20
    assert pvalue > 1e-3, f"p={pvalue:.2e} over {cells} cells"
    for wrong in (_constrained_law(target, constraint, Sampling(temperature=0.8)),
                  _constrained_law(target, constraint, SAMPLING, unconstrained=True)):
        assert _chi_square(observed, wrong, ROWS)[0] < 1e-3
    texts = [_text(row[:n]) for row, n in zip(out.tokens, out.lengths)]
    assert all(any(re.fullmatch(PATTERN, s + end) for end in ("", "a", "q")) for s in texts)
