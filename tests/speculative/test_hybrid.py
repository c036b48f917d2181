"""Hybrid (jaxspec/speculative/drafters/hybrid.py): a trained Eagle chain and prompt lookup.

* Greedy exactness end to end on the shared ragged prompts (one repetitive, so lookup matches),
  with per-round sizing off and on, and with a drafter that lookup always outbids.
* The choice itself, on a hand-built round: each row verifies lookup's chain or the Eagle's, as
  the rows' records say; the records move with what the round committed.
* Sampling: a seeded chi-square of the first three tokens against the target's exact law, on a
  prompt where lookup matches for some rows and not for others.
* Skipping the Eagle (skip_below / probe_every): greedy exactness when most rounds skip it; the
  Eagle's state after skipped rounds and one wide catch-up equals its state after running every
  round; which rounds run it, from the records, the probe count and the pending room.
* Refusals: a drafter that is not an Eagle chain, a lookup tree, bad skip settings.
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


@pytest.mark.parametrize("skip_below,probe_every", [(None, 8), (1.0, 3)],
                         ids=["never", "mostly"])
def test_greedy_identical_when_the_eagle_skips_rounds(tiny, target, greedy_ref, skip_below,
                                                      probe_every):
    eagle = Eagle.create(target, num_tokens=2, key=1)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=4), sizing=COSTS,
                     skip_below=skip_below, probe_every=probe_every)
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    skipped = np.asarray(out.drafter_state.skipped)
    assert skipped.max() < probe_every
    if skip_below is None:
        assert (skipped == 0).all()


@pytest.mark.parametrize("sizing", [None, COSTS], ids=["whole", "sized"])
def test_eagle_alone_greedy_identical_with_skipped_rounds(tiny, target, greedy_ref, sizing):
    """lookup=None: the Eagle's chain alone, its rounds skipped while its record is low (here
    always: skip_below=1.0, a probe every third round). Greedy output is the target's; no row
    ever verifies a lookup chain."""
    eagle = Eagle.create(target, num_tokens=2, key=1)
    drafter = Hybrid(eagle, None, sizing=sizing, skip_below=1.0, probe_every=3)
    assert drafter.tree.num_nodes == 3
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    state = out.drafter_state
    assert not np.asarray(state.lookup_valid).any()
    assert np.asarray(state.skipped).max() < 3
    assert not np.allclose(np.asarray(state.model_hits), 0.5)   # probed rounds were scored
    with pytest.raises(ValueError, match=r"this Hybrid has no prompt lookup \(lookup=None\): "
                                         "lookup_tokens does not apply"):
        drafter.with_tree(lookup_tokens=4)
    assert drafter.with_tree(num_tokens=3).tree.num_nodes == 4


def test_catch_up_after_skipped_rounds_matches_running_every_round(target):
    """Two rounds appended behind (Eagle.commit(behind=...)) and one wide catch-up leave the
    Eagle's cache and next draft as running it every round does."""
    eagle = Eagle.create(target, num_tokens=2, key=3).replace(stop_below=None).bind(target)
    batch, width, d = 2, 24, target.config.hidden_size
    history = jnp.asarray(np.random.default_rng(0).integers(1, 32, (batch, width)), jnp.int32)
    hidden = jax.random.normal(jax.random.PRNGKey(2), (batch, width, d))   # feature per position
    start = jnp.asarray([5, 7], jnp.int32)
    accepted = [jnp.asarray([2, 0], jnp.int32), jnp.asarray([1, 2], jnp.int32)]
    chain = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (batch, 3))
    rows = jnp.arange(batch)[:, None]

    def ctx_at(c):
        return Context(history=history, length=c + 1, cache_lengths=c,
                       active=jnp.ones((batch,), bool))

    def commit(state, c, a, behind):
        verdict = Verdict(path=chain, num_accepted=a, next_token=jnp.zeros((batch,), jnp.int32))
        path_hidden = hidden[rows, c[:, None] + jnp.arange(3)[None, :]]           # [B, 3, D]
        return eagle.commit(state, ctx_at(c), None, verdict, None, target_hidden=path_hidden,
                            behind=behind)

    key, greedy = jax.random.PRNGKey(0), Sampling()
    every = eagle.init(target, history, start, width, target_hidden=hidden)
    piled = eagle.init(target, history, start, width, target_hidden=hidden, capacity=9)
    assert piled.pending.shape[1] == 9 and piled.window == 3
    c = start
    for a in accepted:
        _, every = eagle.propose(every, ctx_at(c), greedy, key, 32)
        every = commit(every, c, a, None)
        piled = commit(piled, c, a, jnp.ones((batch,), bool))
        c = c + a + 1
    np.testing.assert_array_equal(np.asarray(piled.num_pending), np.asarray(c - start + 1))
    want, every = eagle.propose(every, ctx_at(c), greedy, key, 32)
    got, piled = eagle.propose(piled, ctx_at(c), greedy, key, 32)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.confidence), np.asarray(want.confidence),
                               rtol=1e-5, atol=1e-6)
    for b in range(batch):
        upto = int(c[b])
        np.testing.assert_allclose(np.asarray(piled.cache.k[:, b, :, :upto]),
                                   np.asarray(every.cache.k[:, b, :, :upto]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(piled.cache.lengths), np.asarray(c))


def test_which_rounds_run_the_eagle(target):
    eagle = Eagle.create(target, num_tokens=2, key=1).bind(target)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=3), skip_below=0.4,
                     probe_every=3)
    history = np.zeros((2, 12), np.int32)
    history[:, :9] = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    low = dict(model_hits=[0.2, 0.3], model_claimed=[0.5, 0.5])
    for records, pending, runs in [
            (low, [1, 1], False),                                   # both records low: skip
            (dict(low, model_hits=[0.2, 0.5]), [1, 1], True),       # one row asks for it
            (dict(low, skipped=[2, 2]), [1, 1], True),              # a probe is due
            (dict(low, skipped=[1, 1]), [1, 13], True)]:            # 13 + 4 > 16 slots
        draft, state, eagle_draft, ctx = _round(target, drafter, history, [9, 9], records,
                                                num_pending=pending)
        np.testing.assert_array_equal(np.asarray(state.model_ran), [runs, runs])
        valid = np.asarray(draft.valid)
        if runs:
            np.testing.assert_array_equal(np.asarray(draft.tokens[:, :3]),
                                          np.asarray(eagle_draft.tokens))
        else:
            np.testing.assert_array_equal(valid[:, 1:], False)
            np.testing.assert_array_equal(np.asarray(draft.tokens[:, 0]), [18, 18])
            # untouched: the catch-up did not run
            np.testing.assert_array_equal(np.asarray(state.inner.cache.lengths), [7, 7])
        verdict = Verdict(path=jnp.zeros((2, 4), jnp.int32), num_accepted=jnp.zeros((2,), jnp.int32),
                          next_token=jnp.asarray([3, 3], jnp.int32))
        after = drafter.commit(state, ctx, draft, verdict, None,
                               target_hidden=jnp.zeros((2, 4, target.config.hidden_size)))
        hits = np.asarray(records["model_hits"], np.float32)
        if runs:
            np.testing.assert_array_equal(np.asarray(after.skipped), [0, 0])
            np.testing.assert_array_equal(np.asarray(after.inner.num_pending), [1, 1])
        else:   # not scored; one more round behind, its feature appended
            np.testing.assert_array_equal(np.asarray(after.model_hits), hits)
            np.testing.assert_array_equal(np.asarray(after.skipped), [1, 1])
            np.testing.assert_array_equal(np.asarray(after.inner.num_pending),
                                          np.asarray(pending) + 1)


def _round(target, drafter, history, length, records, num_pending=None):
    """propose on a hand-built context (rows of `history`, committed `length` tokens)."""
    batch = history.shape[0]
    tokens = jnp.asarray(history)
    lengths = jnp.asarray(length, jnp.int32)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (batch, history.shape[1],
                                                       target.config.hidden_size))
    state = drafter.init(target, tokens, lengths - 1, 32, target_hidden=hidden)
    state = state.replace(**{k: jnp.asarray(v, jnp.int32 if k == "skipped" else jnp.float32)
                             for k, v in records.items()})
    if num_pending is not None:
        state = state.replace(inner=state.inner.replace(
            num_pending=jnp.asarray(num_pending, jnp.int32)))
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


@pytest.mark.parametrize("skip_below,probe_every,with_lookup", [(None, 8, True), (1.0, 2, True),
                                                               (1.0, 2, False)],
                         ids=["eagle_every_round", "eagle_every_other_round", "eagle_alone"])
def test_sampling_distribution_chi_square(skip_below, probe_every, with_lookup):
    """The first three tokens of 2000 rows after a prompt that lookup continues for some rows
    (its 1-gram and 2-gram matches depend on the sampled first token) follow the target's exact
    law (temperature 0.9, top-k 5), with a sized round; with the Eagle run every round, and
    skipped every other round (its features piled up, then caught up on); and the Eagle alone
    (lookup=None), skipped every other round. Seeded; a correct rule passes p > 1e-3 with
    probability 0.999."""
    sampling = Sampling(temperature=0.9, top_k=5)
    target, _ = small_models(SMALL_VOCAB)
    eagle = _sharpened(Eagle.create(target, num_tokens=2, key=4), seed=4)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=3) if with_lookup else None,
                     sizing=CostModel(sizes=(1, 2, 4), ms=(1.0, 1.05, 1.1)),
                     skip_below=skip_below, probe_every=probe_every)
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
    first = np.asarray(state.lookup_first)
    if with_lookup:   # some rows' lookup records moved (it matched there), some did not
        assert (first != 0.5).any() and (first == 0.5).any()
    else:             # no lookup: its records never move
        assert (first == 0.5).all()
    assert pvalue > 1e-3
    wrong, _ = _chi_square_pvalue(observed, _exact_law(target, prompt, Sampling(temperature=0.9)),
                                  ROWS)
    assert wrong < 1e-3


def test_lookup_wins_by_expected_tokens_per_ms_of_the_cost_curve():
    """lookup_wins by hand: row 0's lookup chain (8 deep, middling records) expects more accepted
    tokens than the Eagle's chain of 2 but fewer per ms at its best verify size, so the Eagle's
    chain is verified; row 1's sure lookup chain wins either way. Without a cost model (sizing
    None, or choose_by="tokens") the tokens decide, as before."""
    from jaxspec.speculative.drafters.hybrid import lookup_wins

    costs = CostModel(sizes=(1, 2, 3, 4, 8, 9), ms=(20.0, 22.0, 23.5, 25.0, 29.5, 30.5))
    depth = np.arange(8)
    # Per-depth confidences r_1, then r_n (running products r_1 r_n^(d-1)), as the hybrid gives.
    lookup_conf = np.where(depth == 0, [[0.4], [0.9]], [[0.7], [0.9]]).astype(np.float32)
    lookup_valid = np.ones((2, 8), bool)
    model_conf = np.zeros((2, 8), np.float32)
    model_conf[:, :2] = [0.6, 0.5]
    model_valid = np.broadcast_to(depth < 2, (2, 8))

    def best_rate(conf, valid):                      # written out: max_s (1 + E_s) / ms(s)
        reach = np.cumsum(np.cumprod(np.where(valid, conf, 0.0)))
        return max((1 + (reach[s - 2] if s > 1 else 0.0)) / ms for s, ms in zip(costs.sizes, costs.ms))

    want = [best_rate(lookup_conf[r], lookup_valid[r]) > best_rate(model_conf[r], model_valid[r])
            for r in range(2)]
    assert want == [False, True]
    got = lookup_wins(jnp.asarray(model_conf), jnp.asarray(model_valid), jnp.asarray(lookup_conf),
                      jnp.asarray(lookup_valid), costs)
    np.testing.assert_array_equal(np.asarray(got), want)
    tokens_rule = lookup_wins(jnp.asarray(model_conf), jnp.asarray(model_valid),
                              jnp.asarray(lookup_conf), jnp.asarray(lookup_valid), None)
    np.testing.assert_array_equal(np.asarray(tokens_rule), [True, True])   # 1.26 > 0.9 accepted


def test_cost_curve_is_measured_at_the_eagle_chains_size(target, monkeypatch):
    """js.generate's sizing="auto" measures the hybrid's curve at 1, 2, 4, 8 and its node count
    plus its Eagle chain's root + depth (3), so a round verifying that whole chain is not padded
    to a 4-token forward."""
    from jaxspec import api

    seen = []
    monkeypatch.setattr("jaxspec.speculative.costs.calibrate",
                        lambda model, batch, sizes: seen.append(sizes) or CostModel(
                            sizes=sizes, ms=tuple(float(s) for s in sizes)))
    drafter = Hybrid(Eagle.create(target, num_tokens=2, key=1), js.PromptLookup(num_tokens=8))
    assert drafter.verify_sizes == (3,)
    api._cost_model(target, 1, drafter)
    assert seen == [(1, 2, 3, 4, 8, 9)]


def test_refusals(target):
    eagle = Eagle.create(target, num_tokens=2, key=1)
    with pytest.raises(ValueError, match="must be a js.Eagle chain"):
        Hybrid(js.PromptLookup())
    with pytest.raises(ValueError, match="must draft a chain: use eagle.with_tree"):
        Hybrid(eagle.with_tree(tree=js.trees.kary(2, 2)))
    with pytest.raises(ValueError, match="must draft a chain: use eagle.with_tree"):
        Hybrid(eagle.with_tree(tree=js.trees.dynamic(4, 2, 2)))
    with pytest.raises(ValueError, match="lookup must be a js.PromptLookup or None, got Eagle"):
        Hybrid(eagle, lookup=eagle)
    with pytest.raises(ValueError, match="num_candidates=1"):
        Hybrid(eagle, lookup=js.PromptLookup(num_candidates=2))
    with pytest.raises(ValueError, match="sizing"):
        Hybrid(eagle, sizing="fast")
    with pytest.raises(ValueError, match=r"skip_below is a first-token hit rate in \[0, 1\]"):
        Hybrid(eagle, skip_below=1.5)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="probe_every is a number of rounds >= 1"):
            Hybrid(eagle, probe_every=bad)
    with pytest.raises(ValueError, match=r"choose_by is 'rate' \(expected tokens per ms of the "
                                         r"cost curve\) or 'tokens', got 'speed'"):
        Hybrid(eagle, choose_by="speed")
    for name in ("model_prior", "lookup_prior", "lookup_next_prior"):
        for bad in (-0.1, 1.5, True, "high"):
            with pytest.raises(ValueError, match=rf"{name} is a hit rate in \[0, 1\], got"):
                Hybrid(eagle, **{name: bad})


def test_records_start_from_the_priors(target):
    eagle = Eagle.create(target, num_tokens=2, key=1)
    drafter = Hybrid(eagle, js.PromptLookup(ngram=2, num_tokens=3), model_prior=0.25,
                     lookup_prior=0.125, lookup_next_prior=0.375).bind(target)
    prompts = jnp.asarray([[4, 5, 6, 7], [8, 9, 10, 0]], jnp.int32)
    hidden = jnp.zeros((2, 4, target.config.hidden_size))
    state = drafter.init(target, prompts, jnp.asarray([4, 3]), 16, target_hidden=hidden)
    for field, value in (("model_hits", 0.25), ("model_claimed", 0.25), ("lookup_first", 0.125),
                         ("lookup_next", 0.375)):
        np.testing.assert_array_equal(np.asarray(getattr(state, field)), [value, value])
