"""Hybrid (jaxspec/speculative/drafters/hybrid.py): a trained Eagle chain and prompt lookup.

* Greedy exactness end to end on the shared ragged prompts (one repetitive, so lookup matches),
  with per-round sizing off and on, and with a drafter that lookup always outbids.
* The choice itself, on a hand-built round: each row verifies lookup's chain or the Eagle's, as
  the rows' records say; the records move with what the round committed.
* Sampling: a seeded chi-square of the first three tokens against the target's exact law, on a
  prompt where lookup matches for some rows and not for others.
* Refusals: a drafter that is not an Eagle chain, a lookup tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec.sampling import Sampling
from jaxspec.speculative.costs import CostModel
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.eagle import Eagle
from jaxspec.speculative.drafters.hybrid import Hybrid, HybridState
from jaxspec.speculative.verify import Verdict
from test_eagle import _sharpened
from test_tree_drafters import ROWS, SMALL_VOCAB, _chi_square_pvalue, _exact_law, _spec
from test_tree_drafters import models as small_models

COSTS = CostModel(sizes=(1, 2, 4, 5), ms=(1.0, 1.1, 1.3, 1.4))


@pytest.mark.parametrize("sizing", [None, COSTS], ids=["whole", "sized"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_greedy_identical_to_autoregressive(tiny, target, greedy_ref, sizing, num_tokens):
    eagle = Eagle.create(target, num_tokens=num_tokens, key=1)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=4), sizing=sizing)
    assert drafter.tree.num_nodes == 5
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    state = out.drafter_state
    assert isinstance(state, HybridState)
    # The records moved from their priors: both drafters were scored every round.
    assert not np.allclose(np.asarray(state.model_hits), 0.5)
    assert sum(out.stats["accepted"]) > 0


def _round(target, drafter, history, length, records):
    """propose on a hand-built context (rows of `history`, committed `length` tokens)."""
    batch = history.shape[0]
    tokens = jnp.asarray(history)
    lengths = jnp.asarray(length, jnp.int32)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (batch, history.shape[1],
                                                       target.config.hidden_size))
    state = drafter.init(target, tokens, lengths - 1, 32, target_hidden=hidden)
    state = state.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in records.items()})
    ctx = Context(history=tokens, length=lengths, cache_lengths=lengths - 1,
                  active=jnp.ones((batch,), bool))
    draft, after = drafter.propose(state, ctx, Sampling(), jax.random.PRNGKey(1),
                                   target.config.vocab_size)
    eagle_draft, _ = drafter.drafter.propose(state.inner, ctx, Sampling(), jax.random.PRNGKey(1),
                                             target.config.vocab_size)
    return draft, after, eagle_draft, ctx


def test_each_row_verifies_the_chain_its_records_favour(target):
    eagle = Eagle.create(target, num_tokens=2, key=1).replace(stop_below=None).bind(target)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=3))
    # Rows 0, 1: "... 4 5 6 7 ... 4 5" -> lookup proposes 6 7 8; row 2 matches nothing.
    history = np.zeros((3, 12), np.int32)
    history[:, :9] = [4, 5, 6, 7, 8, 1, 2, 4, 5]
    history[2, :9] = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    length = [9, 9, 9]
    records = dict(lookup_first=[0.95, 0.0, 0.95], lookup_next=[0.95, 0.95, 0.95],
                   model_hits=[0.5, 0.5, 0.5], model_claimed=[0.5, 0.5, 0.5])
    draft, state, eagle_draft, ctx = _round(target, drafter, history, length, records)
    tokens, valid = np.asarray(draft.tokens), np.asarray(draft.valid)
    np.testing.assert_array_equal(tokens[0], [5, 6, 7, 8])          # lookup: a sure match
    assert valid[0].all()
    np.testing.assert_allclose(np.asarray(draft.confidence[0, 1:]), [0.95, 0.95, 0.95])
    for row in (1, 2):                                               # the Eagle's chain
        np.testing.assert_array_equal(tokens[row, :3], np.asarray(eagle_draft.tokens[row]))
        np.testing.assert_array_equal(valid[row], [True, True, True, False])
    np.testing.assert_array_equal(np.asarray(state.lookup_tokens[0]), [6, 7, 8])
    assert not np.asarray(state.lookup_valid[2]).any()

    # The round commits 6 then 9 on row 0 (lookup's 6 right, 7 wrong), 3 on rows 1 and 2.
    verdict = Verdict(path=jnp.asarray([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], jnp.int32),
                      num_accepted=jnp.asarray([1, 0, 0], jnp.int32),
                      next_token=jnp.asarray([9, 3, 3], jnp.int32))
    hidden = jnp.zeros((3, 4, target.config.hidden_size))
    after = drafter.commit(state, ctx, draft, verdict, jnp.zeros((3, 4, 32)), target_hidden=hidden)
    decay = 0.7
    np.testing.assert_allclose(np.asarray(after.lookup_first),
                               [decay * 0.95 + 0.3, 0.0, 0.95], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(after.lookup_next),        # row 0: 7 tried, wrong
                               [decay * 0.95, 0.95, 0.95], rtol=1e-6)
    model_hit = (np.asarray(eagle_draft.tokens[:, 1]) == [6, 3, 3]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(after.model_hits), decay * 0.5 + 0.3 * model_hit,
                               rtol=1e-6)


def test_sampling_distribution_chi_square():
    """The first three tokens of 2000 rows after a prompt that lookup continues for some rows
    (its 1-gram and 2-gram matches depend on the sampled first token) follow the target's exact
    law (temperature 0.9, top-k 5), with a sized round. Seeded; a correct rule passes p > 1e-3
    with probability 0.999."""
    sampling = Sampling(temperature=0.9, top_k=5)
    target, _ = small_models(SMALL_VOCAB)
    eagle = _sharpened(Eagle.create(target, num_tokens=2, key=4), seed=4)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=3),
                     sizing=CostModel(sizes=(1, 2, 4), ms=(1.0, 1.05, 1.1)))
    prompt = [1, 2, 3, 1, 2]
    tokens = jnp.asarray(np.tile(prompt, (ROWS, 1)), jnp.int32)
    lengths = jnp.full((ROWS,), len(prompt), jnp.int32)
    out, state, _ = _spec(target, drafter, tokens, lengths, sampling, jax.random.PRNGKey(7),
                          jnp.zeros((0,), jnp.int32), None, 3)
    got = np.asarray(out.tokens)[:, :3]
    assert (np.asarray(out.lengths) == 3).all()
    v = SMALL_VOCAB
    observed = np.bincount(got[:, 0] * v * v + got[:, 1] * v + got[:, 2], minlength=v ** 3)
    law = _exact_law(target, prompt, sampling)
    pvalue, cells = _chi_square_pvalue(observed, law, ROWS)
    accepted = np.asarray(out.accepted)
    print(f"hybrid: p={pvalue:.3g} over {cells} cells, accepted per row {accepted.mean():.2f}")
    assert cells >= 20
    assert (accepted == 0).any() and (accepted >= 2).any()
    # Some rows' lookup records moved (it matched there), some did not (no match).
    first = np.asarray(state.lookup_first)
    assert (first != 0.5).any() and (first == 0.5).any()
    assert pvalue > 1e-3
    wrong, _ = _chi_square_pvalue(observed, _exact_law(target, prompt, Sampling(temperature=0.9)),
                                  ROWS)
    assert wrong < 1e-3


def test_refusals(target):
    eagle = Eagle.create(target, num_tokens=2, key=1)
    with pytest.raises(ValueError, match="must be a js.Eagle chain"):
        Hybrid(js.PromptLookup())
    with pytest.raises(ValueError, match="must draft a chain: use eagle.with_tree"):
        Hybrid(eagle.with_tree(tree=js.trees.kary(2, 2)))
    with pytest.raises(ValueError, match="must draft a chain: use eagle.with_tree"):
        Hybrid(eagle.with_tree(tree=js.trees.dynamic(4, 2, 2)))
    with pytest.raises(ValueError, match="lookup must be a js.PromptLookup"):
        Hybrid(eagle, lookup=eagle)
    with pytest.raises(ValueError, match="num_candidates=1"):
        Hybrid(eagle, lookup=js.PromptLookup(num_candidates=2))
    with pytest.raises(ValueError, match="sizing"):
        Hybrid(eagle, sizing="fast")
