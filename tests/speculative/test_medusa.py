"""Medusa (jaxspec/speculative/drafters/medusa.py) and its training (jaxspec/train/medusa.py).

* Greedy exactness end to end (js.generate) on the shared ragged prompts: a chain of 3 and the
  default 10-node tree with random heads, the default tree with identity heads and a VocabTrim
  head that is not a prefix of the vocabulary, and heads trained for a few hundred steps on the
  target's own greedy outputs (whose drafts are then accepted).
* Alignment: an untrained head predicts what the target predicts (tied and untied targets); the
  first round's depth-k tokens are head k's top tokens on the target's feature at the prompt's
  last position (the training code's f_t for x_{t+k+1}); commit keeps the feature of the deepest
  accepted node; the loss is the cross-entropy written out by hand.
* Sampling: a seeded chi-square of the first three tokens against the target's exact law
  (deterministic candidates verified as one-hot proposals); rule="typical" equals greedy at
  temperature 0 and, at temperature > 0, every emitted token meets the typical criterion.
* save / load / with_tree, and every refusal's message.

Models are the shared tiny ones (conftest.py: vocabulary 32; test_tree_drafters.py: vocabulary 8
for the distribution test).
"""

from __future__ import annotations

import dataclasses
import json
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec.decoding import COMPILATIONS, prefill
from jaxspec.models.cache import KVCache
from jaxspec.models.transformer import forward_train, lm_head
from jaxspec.sampling import Sampling, probabilities
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.medusa import Medusa, MedusaConfig, MedusaState, head_logits
from jaxspec.speculative.loop import generate_tokens
from jaxspec.speculative.verify import Verdict
from jaxspec.train import medusa as medusa_train
from jaxspec.train.trainer import TrainConfig
from test_tree_drafters import CHI_TREE, ROWS, SMALL_VOCAB, _chi_square_pvalue, _exact_law, _spec
from test_tree_drafters import models as small_models

HEADS = 4
TRIM_IDS = np.arange(3, 27, 2, dtype=np.int32)          # 12 of the 32 ids, not a prefix


def _prompt_arrays(prompts, width=16):
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _mean_accepted(out) -> float:
    return float(out.stats["mean_accepted"])


# -- 1. greedy: identical to the target's own output -------------------------------------------

GREEDY_DRAFTERS = {
    "chain3_random": dict(num_tokens=3, init_std=1.0, key=1),
    "tree_random": dict(init_std=1.0, key=1),
    "tree_identity_trim": dict(head_tokens=TRIM_IDS),
}


@pytest.mark.parametrize("name", GREEDY_DRAFTERS)
def test_greedy_identical_to_autoregressive(name, tiny, target, greedy_ref):
    drafter = Medusa.create(target, HEADS, **GREEDY_DRAFTERS[name])
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    assert isinstance(out.drafter_state, MedusaState)
    assert out.drafter_state.pending.shape == (len(tiny.prompts), target.config.hidden_size)
    print(f"{name}: mean accepted {_mean_accepted(out):.2f}")


def _greedy_sequences(target, prompts, max_new):
    """[(prompt + the target's greedy continuation, prompt length)], 3 prompts per call (the
    shape of the shared greedy program)."""
    seqs = []
    for i in range(0, len(prompts), 3):
        batch = prompts[i:i + 3]
        out = js.generate(target, batch, max_new_tokens=max_new)
        seqs += [(np.asarray(p + out.tokens[b].tolist(), np.int32), len(p))
                 for b, p in enumerate(batch)]
    return seqs


@pytest.fixture(scope="module")
def trained(tiny, target):
    """4 heads trained 300 steps (jaxspec.train.medusa.train, i.e. trainer.train) on the target's
    greedy outputs after the shared prompts and 9 random ones: (drafter, loss before / after and
    metrics on the first batches, the items, the RunResult)."""
    rng = np.random.default_rng(0)
    extra = [rng.integers(1, tiny.vocab, int(n)).tolist() for n in rng.integers(2, 15, 9)]
    seqs = _greedy_sequences(target, list(tiny.prompts) + extra, tiny.max_new)
    items = medusa_train.compute_features(target, seqs, max_len=64, batch_size=8,
                                          log=lambda s: None)
    drafter = Medusa.create(target, HEADS)
    data = medusa_train.MedusaBatches(items, num_heads=HEADS, length=16, batch_size=8)
    loss = jax.jit(medusa_train.make_loss(drafter.config, drafter.params["head_ids"]))
    batches = [jax.tree_util.tree_map(jnp.asarray, data.batch(p)[0]) for p in (0, 8, 16)]

    def evaluate(d):
        ms = [jax.device_get(loss(medusa_train.trainable(d.params), b)[1]) for b in batches]
        return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}

    before = evaluate(drafter)
    cfg = TrainConfig(batch_size=8, learning_rate=1e-2, warmup_steps=10, max_steps=300,
                      weight_decay=0.0, log_every=10, checkpoint_every=10_000)
    done, result = medusa_train.train(drafter, data, cfg, quiet=True)
    return done, (before, evaluate(done)), items, result


def test_training_lowers_the_loss(trained):
    drafter, (before, after), _, result = trained
    assert result.finished and result.step == 300
    losses = [m["loss"] for _, m in result.history]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    print({k: (round(before[k], 3), round(after[k], 3)) for k in before})
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    for k in range(1, HEADS + 1):
        assert after[f"ce{k}"] < before[f"ce{k}"]
        assert after[f"top1_{k}"] > before[f"top1_{k}"]
    assert after["top1_1"] > 0.6
    # head ids stay data; the blocks moved away from the identity
    np.testing.assert_array_equal(np.asarray(drafter.params["head_ids"]), np.arange(32))
    assert float(jnp.abs(drafter.params["heads"]["kernel"]).max()) > 0


@pytest.mark.parametrize("kind", ["chain3", "tree"])
def test_trained_heads_are_accepted_and_exact(kind, tiny, target, greedy_ref, trained):
    """Same programs as the random-head runs (only the weights differ); drafts now accepted."""
    drafter, _, _, _ = trained
    random = Medusa.create(target, HEADS, init_std=1.0, key=1)
    if kind == "chain3":
        drafter, random = drafter.with_tree(num_tokens=3), random.with_tree(num_tokens=3)
    # Whole trees every round (sizing off), so acceptance measures the heads, not the sizing.
    drafter, random = drafter.replace(sizing=None), random.replace(sizing=None)
    before = COMPILATIONS["speculative"]
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    base = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=random)
    print(f"trained Medusa {kind}: mean accepted {_mean_accepted(out):.2f} "
          f"(random heads {_mean_accepted(base):.2f})")
    assert _mean_accepted(out) > 1.0 and _mean_accepted(out) > _mean_accepted(base)
    assert COMPILATIONS["speculative"] - before <= 1   # the random-head program, if not compiled


# -- 2. alignment ---------------------------------------------------------------------------------

def test_untrained_heads_predict_what_the_target_predicts(target):
    """Identity blocks + the target's LM head rows: head logits = target logits on the head
    tokens, for every head, on an untied (conftest) and a tied target."""
    tied = target.replace(config=dataclasses.replace(target.config, tie_word_embeddings=True),
                          params={k: v for k, v in target.params.items() if k != "lm_head"})
    h = jax.random.normal(jax.random.PRNGKey(0), (5, 32))
    for model in (target, tied):
        d = Medusa.create(model, 3, head_tokens=TRIM_IDS)
        got = np.asarray(head_logits(d.params, h))                                 # [5, 3, V']
        want = np.asarray(lm_head(model.params, h, model.config))[:, TRIM_IDS]
        for k in range(3):
            np.testing.assert_allclose(got[:, k], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(Medusa.create(tied, 2).params["lm_head"][1]),
                                  np.asarray(tied.params["embed"]))


@functools.partial(jax.jit, static_argnames=("max_len",))
def _round_one(target, drafter, tokens, lengths, max_len=48):
    """The loop up to the first proposal: prefill (all hidden states), first token (argmax),
    init, propose. Returns (first [B], draft, state)."""
    batch, tp = tokens.shape
    rows = jnp.arange(batch)
    cache = KVCache.create(target.config, batch, max_len, target.dtype)
    logits, hidden_all, cache = prefill(target, tokens, lengths, cache, all_hidden=True)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    history = jnp.zeros((batch, max_len), jnp.int32).at[:, :tp].set(tokens)
    history = history.at[rows, lengths].set(first)
    ctx = Context(history=history, length=lengths + 1, cache_lengths=lengths,
                  active=jnp.ones((batch,), bool))
    state = drafter.init(target, tokens, lengths, max_len, target_hidden=hidden_all)
    draft, state = drafter.propose(state, ctx, Sampling(), jax.random.PRNGKey(0),
                                   target.config.vocab_size)
    return first, draft, state


def test_first_round_drafts_are_head_k_top_tokens_at_the_last_prompt_feature(tiny, target):
    """Node at depth d with child rank r = head d's rank-r head token on f_{len-1} (the training
    code's features, forward_train), on ragged prompts; the root is the target's first token."""
    tree = js.trees.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)])
    drafter = Medusa.create(target, 3, tree=tree, head_tokens=TRIM_IDS, init_std=1.0, key=5)
    prompts = list(tiny.prompts)
    tokens, lengths = _prompt_arrays(prompts)
    first, draft, state = _round_one(target, drafter, tokens, lengths)
    logits, feats = forward_train(target.params, target.config, tokens)
    rows, last = np.arange(len(prompts)), np.asarray(lengths) - 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(logits)[rows, last].argmax(-1))
    f = np.asarray(feats)[rows, last]                                                # [B, D]
    np.testing.assert_allclose(np.asarray(state.pending), f, rtol=1e-5, atol=1e-5)
    order = np.argsort(-np.asarray(head_logits(drafter.params, jnp.asarray(f))), axis=-1)
    drafted = np.asarray(draft.tokens)
    np.testing.assert_array_equal(drafted[:, 0], np.asarray(first))
    for node in range(1, tree.num_nodes):
        d, r = tree.depths[node], tree.child_rank[node]
        np.testing.assert_array_equal(drafted[:, node], TRIM_IDS[order[:, d - 1, r]])
    assert draft.q is None and np.asarray(draft.valid).all()
    np.testing.assert_array_equal(np.asarray(draft.parents), np.broadcast_to(tree.parents, (3, 9)))
    # siblings differ (distinct ranks of one head)
    for node in range(1, tree.num_nodes):
        sibs = [j for j in range(1, tree.num_nodes) if tree.parents[j] == tree.parents[node]]
        assert len(set(map(tuple, drafted[:, sibs].T))) == len(sibs)


def test_commit_keeps_the_feature_of_the_deepest_accepted_node(target):
    drafter = Medusa.create(target, 2, tree=js.trees.kary(2, 2))
    hidden = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 32))
    state = MedusaState(pending=jnp.zeros((3, 32)))
    verdict = Verdict(path=jnp.asarray([[0, 2, 6], [0, 0, 0], [0, 1, 0]], jnp.int32),
                      num_accepted=jnp.asarray([2, 0, 1], jnp.int32),
                      next_token=jnp.zeros((3,), jnp.int32))
    ctx = Context(history=jnp.zeros((3, 8), jnp.int32), length=jnp.ones((3,), jnp.int32),
                  cache_lengths=jnp.zeros((3,), jnp.int32),
                  active=jnp.asarray([True, True, False]))
    draft = Draft(tokens=jnp.zeros((3, 7), jnp.int32), parents=jnp.zeros((3, 7), jnp.int32),
                  valid=jnp.ones((3, 7), bool))
    new = drafter.commit(state, ctx, draft, verdict, None, target_hidden=hidden).pending
    np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(hidden[0, 6]))
    np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(hidden[1, 0]))
    np.testing.assert_array_equal(np.asarray(new[2]), 0.0)          # inactive row: unchanged


def test_loss_is_the_decayed_cross_entropy_of_x_t_plus_k_plus_1():
    """make_loss against the formula written out position by position (labels outside V' and
    padding ignored; head weights decay**(k-1), normalised)."""
    rng = np.random.default_rng(0)
    k_heads, length, d, v = 3, 5, 8, 10
    head_ids = np.asarray([0, 2, 3, 5, 7, 9], np.int32)
    config = MedusaConfig(hidden_size=d, vocab_size=v, num_heads=k_heads)
    params = {"heads": {"kernel": jnp.asarray(rng.normal(size=(k_heads, d, d)) * 0.3, jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(k_heads, d)) * 0.1, jnp.float32)},
              "lm_head": jnp.asarray(rng.normal(size=(k_heads, len(head_ids), d)), jnp.float32)}
    w = length + k_heads + 1
    tokens = rng.integers(0, v, (2, w)).astype(np.int32)
    feats = rng.normal(size=(2, w, d)).astype(np.float32)
    valid = np.ones((2, w), bool)
    valid[1, 6:] = False                                        # row 1 padded after 6 tokens
    loss, metrics = medusa_train.make_loss(config, head_ids, decay=0.5)(
        params, {"tokens": jnp.asarray(tokens), "features": jnp.asarray(feats),
                 "valid": jnp.asarray(valid)})
    logits = np.asarray(head_logits(params, jnp.asarray(feats)), np.float64)      # [2, W, K, V']
    to_head = {int(t): i for i, t in enumerate(head_ids)}
    total = 0.0
    for k in range(1, k_heads + 1):
        terms, hits = [], []
        for b in range(2):
            for t in range(length):
                if not (valid[b, t] and valid[b, t + k + 1]) or int(tokens[b, t + k + 1]) not in to_head:
                    continue
                z = logits[b, t, k - 1]
                label = to_head[int(tokens[b, t + k + 1])]
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[label])
                hits.append(z.argmax() == label)
        assert terms
        np.testing.assert_allclose(float(metrics[f"ce{k}"]), np.mean(terms), rtol=1e-5)
        np.testing.assert_allclose(float(metrics[f"top1_{k}"]), np.mean(hits), rtol=1e-6)
        total += 0.5 ** (k - 1) * np.mean(terms)
    np.testing.assert_allclose(float(loss), total / (1 + 0.5 + 0.25), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss))
    # An "answer" mask (MedusaBatches(starts=)): labels before row 0's answer start not counted.
    answer = valid.copy()
    answer[0, :4] = False
    _, scored = medusa_train.make_loss(config, head_ids, decay=0.5)(
        params, {"tokens": jnp.asarray(tokens), "features": jnp.asarray(feats),
                 "valid": jnp.asarray(valid), "answer": jnp.asarray(answer)})
    for k in range(1, k_heads + 1):
        terms = []
        for b in range(2):
            for t in range(length):
                if not (valid[b, t] and answer[b, t + k + 1]) or int(tokens[b, t + k + 1]) not in to_head:
                    continue
                z = logits[b, t, k - 1]
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[to_head[int(tokens[b, t + k + 1])]])
        np.testing.assert_allclose(float(scored[f"ce{k}"]), np.mean(terms), rtol=1e-5)
    # A frozen LM head instead of a trained one: same value when it is the same matrix.
    frozen = medusa_train.make_loss(config, head_ids, decay=0.5, lm_head=params["lm_head"])
    batch = {"tokens": jnp.asarray(tokens), "features": jnp.asarray(feats), "valid": jnp.asarray(valid)}
    np.testing.assert_allclose(float(frozen({"heads": params["heads"]}, batch)[0]), float(loss),
                               rtol=1e-6)


def test_medusa_batches(trained):
    _, _, items, _ = trained
    data = medusa_train.MedusaBatches(items, num_heads=3, length=8, batch_size=4, seed=3)
    assert data.win == 12 and len(data.windows) > len(items)
    b, nxt = data.batch(5)
    assert nxt == 9 and b["tokens"].shape == (4, 12) and b["features"].shape == (4, 12, 32)
    assert b["valid"].dtype == bool and b["features"].dtype == np.float32
    again, _ = medusa_train.MedusaBatches(items, num_heads=3, length=8, batch_size=4, seed=3).batch(5)
    shifted, _ = data.batch(6)
    for key in b:
        np.testing.assert_array_equal(b[key], again[key])
        np.testing.assert_array_equal(b[key][1:], shifted[key][:-1])
    for row in range(4):      # each row is a slice of one sequence, features aligned, zero-padded
        n = int(b["valid"][row].sum())
        hits = [(i, s) for i, s in data.windows
                if np.array_equal(items[i][0][s:s + 12], b["tokens"][row, :n])
                and np.array_equal(np.asarray(items[i][1][s:s + 12], np.float32), b["features"][row, :n])]
        assert hits and not b["tokens"][row, n:].any()
    with pytest.raises(ValueError, match="no training windows"):
        medusa_train.MedusaBatches([(np.arange(2, dtype=np.int32), np.zeros((2, 4)))], num_heads=2)


def test_medusa_batches_starts_count_only_answer_labels(trained):
    """starts: an "answer" mask False before each item's start (valid unchanged, so features
    there still predict answer tokens); the loss then counts only answer labels."""
    drafter, _, items, _ = trained
    starts = [min(6, len(it[0]) - 1) for it in items]
    data = medusa_train.MedusaBatches(items, num_heads=HEADS, length=8, batch_size=1, seed=3)
    answers = medusa_train.MedusaBatches(items, num_heads=HEADS, length=8, batch_size=1, seed=3,
                                         starts=starts)
    assert "answer" not in data.batch(0)[0] and answers.windows == data.windows
    perm = np.random.default_rng((3, 0)).permutation(len(data.windows))
    for position in range(len(data.windows)):
        plain, scored = data.batch(position)[0], answers.batch(position)[0]
        i, s = data.windows[int(perm[position])]
        np.testing.assert_array_equal(scored["valid"], plain["valid"])
        np.testing.assert_array_equal(scored["answer"][0],
                                      plain["valid"][0] & (np.arange(data.win) + s >= starts[i]))
    loss = medusa_train.make_loss(drafter.config, drafter.params["head_ids"])
    batch, _ = answers.batch(0)
    everything = dict(batch, answer=batch["valid"])
    first = lambda b: float(loss(drafter.params, jax.tree_util.tree_map(jnp.asarray, b))[1]["ce1"])
    assert first(everything) == pytest.approx(first({k: v for k, v in batch.items() if k != "answer"}))
    with pytest.raises(ValueError, match=r"starts needs one entry per item: 1 for \d+ items"):
        medusa_train.MedusaBatches(items, num_heads=HEADS, starts=[0])


# -- 3. sampling ------------------------------------------------------------------------------------

SAMPLING = Sampling(temperature=0.9, top_k=5)


def test_sampling_distribution_chi_square():
    """The first three tokens of 2000 rows follow the target's exact law (temperature 0.9, top-k
    5) with Medusa's deterministic candidates on CHI_TREE (root fanout 6 > top_k: one candidate
    always outside the target's support), verified by the drafter's rule "speculative" as one-hot
    multi-draft proposals. Seeded, deterministic; a correct rule passes p > 1e-3 with probability
    0.999."""
    target, _ = small_models(SMALL_VOCAB)
    drafter = Medusa.create(target, 3, tree=CHI_TREE, init_std=1.0, key=4)
    assert drafter.rule == "speculative"
    prompt = [1, 2, 3]
    tokens = jnp.asarray(np.tile(prompt, (ROWS, 1)), jnp.int32)
    lengths = jnp.full((ROWS,), len(prompt), jnp.int32)
    out, _, _ = _spec(target, drafter, tokens, lengths, SAMPLING, jax.random.PRNGKey(7),
                      jnp.zeros((0,), jnp.int32), None, 3)
    got = np.asarray(out.tokens)[:, :3]
    assert (np.asarray(out.lengths) == 3).all()
    v = SMALL_VOCAB
    observed = np.bincount(got[:, 0] * v * v + got[:, 1] * v + got[:, 2], minlength=v ** 3)
    law = _exact_law(target, prompt, SAMPLING)
    pvalue, cells = _chi_square_pvalue(observed, law, ROWS)
    accepted = np.asarray(out.accepted)
    print(f"medusa: p={pvalue:.3g} over {cells} cells, accepted per row {accepted.mean():.2f}")
    assert cells >= 20
    assert (accepted == 0).any() and (accepted >= 2).any()    # rejections and long paths
    assert pvalue > 1e-3
    wrong, _ = _chi_square_pvalue(observed, _exact_law(target, prompt, Sampling(temperature=0.9)),
                                  ROWS)
    assert wrong < 1e-3


@functools.partial(jax.jit, static_argnames=("rule",))
def _with_rule(target, drafter, tokens, lengths, sampling, rule):
    return generate_tokens(target, drafter, tokens, lengths, 16, sampling, jax.random.PRNGKey(0),
                           rule=rule)[0]


def test_typical_rule_equals_greedy_at_temperature_zero(tiny, target, greedy_ref):
    """verify's "typical" rule forced on the loop at temperature 0 (where "auto" would pick
    greedy, so the drafter's rule is not consulted) gives the target's greedy output."""
    drafter = Medusa.create(target, HEADS, init_std=1.0, key=1, rule="typical")
    tokens, lengths = _prompt_arrays(tiny.prompts)
    out = _with_rule(target, drafter, tokens, lengths, Sampling(), "typical")
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_ref.tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), greedy_ref.lengths)


def _typical_ok(target, prompts, out, sampling, eps=0.09, delta=0.3):
    """[B, M-1] bool: generated token j >= 1 has p > min(eps, delta exp(-H(p))) under the target's
    processed distribution after the prefix (the first token is sampled from the prefill)."""
    seqs = [list(p) + out.tokens[b].tolist() for b, p in enumerate(prompts)]
    tokens, _ = _prompt_arrays(seqs, width=32)
    logits, _ = forward_train(target.params, target.config, tokens)
    p = np.asarray(probabilities(logits, sampling), np.float64)                 # [B, 32, V]
    ok = []
    for b, prompt in enumerate(prompts):
        row = []
        for j in range(1, out.tokens.shape[1]):
            pos = len(prompt) + j                                  # position of generated token j
            dist = p[b, pos - 1]
            h = -np.sum(np.where(dist > 0, dist * np.log(np.where(dist > 0, dist, 1)), 0))
            row.append(dist[seqs[b][pos]] > min(eps, delta * np.exp(-h)) * (1 - 1e-4))
        ok.append(row)
    return np.asarray(ok)


def test_typical_rule_at_temperature_above_zero(tiny, target):
    """rule="typical" reaches the loop at temperature 0.8: every token after the first is a
    typical one (p above the threshold: an accepted draft or the argmax), which plain sampling
    violates; a lossless rule is not in use."""
    sampling = Sampling(temperature=0.8)
    # sizing=None: a sized round can be a plain step, which samples from p (not "typical"), and
    # whether one happens depends on the cost curve measured on the machine running the test.
    drafter = Medusa.create(target, HEADS, init_std=1.0, key=1, rule="typical").replace(sizing=None)
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter,
                      sampling=sampling, seed=3)
    assert np.all(out.lengths == tiny.max_new)
    assert _typical_ok(target, tiny.prompts, out, sampling).all()
    plain = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, sampling=sampling, seed=3)
    assert not _typical_ok(target, tiny.prompts, plain, sampling).all()


# -- 4. save / load / with_tree ---------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, target):
    tree = js.trees.from_paths([(0,), (1,), (0, 0), (0, 0, 0)])
    drafter = Medusa.create(target, 3, tree=tree, head_tokens=TRIM_IDS, init_std=1.0, key=2,
                            rule="typical")
    drafter = drafter.replace(params=dict(drafter.params, heads=dict(
        drafter.params["heads"], bias=jnp.linspace(-1, 1, 96).reshape(3, 32))))
    drafter.save(tmp_path / "f32", dtype="float32")
    loaded = Medusa.load(tmp_path / "f32")
    assert (loaded.config, loaded.tree, loaded.rule, loaded.num_tokens) == \
           (drafter.config, tree, "typical", None)
    assert loaded.target_fingerprint == drafter.target_fingerprint
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(drafter.params)
    for a, b in zip(jax.tree_util.tree_leaves(drafter.params), jax.tree_util.tree_leaves(loaded.params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.check_compatible(target)
    # bfloat16 (the default): weights rounded, head ids exact; overrides at load time
    drafter.with_tree(num_tokens=2, rule="speculative").save(tmp_path / "bf16")
    half = Medusa.load(tmp_path / "bf16")
    assert half.tree == js.trees.chain(2) and half.num_tokens == 2 and half.rule == "speculative"
    np.testing.assert_array_equal(np.asarray(half.params["head_ids"]), TRIM_IDS)
    np.testing.assert_allclose(np.asarray(half.params["lm_head"]),
                               np.asarray(drafter.params["lm_head"]), rtol=1e-2, atol=1e-3)
    assert Medusa.load(tmp_path / "bf16", num_tokens=3).tree == js.trees.chain(3)
    assert Medusa.load(tmp_path / "bf16", tree=js.trees.kary(2, 2)).tree == js.trees.kary(2, 2)
    assert Medusa.load(tmp_path / "bf16", rule="typical").rule == "typical"


def test_shared_head_keeps_blocks_only_and_stays_exact(tmp_path, tiny, target, greedy_ref):
    """shared_head=True: no lm_head of its own; bound to the target's rows the logits equal a
    per-head drafter's (same blocks, rows copied); saved and reloaded without an lm_head; exact."""
    from jaxspec.speculative.drafters.medusa import head_logits

    shared = Medusa.create(target, 3, head_tokens=TRIM_IDS, init_std=1.0, key=3, shared_head=True)
    own = Medusa.create(target, 3, head_tokens=TRIM_IDS, init_std=1.0, key=3)
    assert shared.shared_head and not own.shared_head and "lm_head" not in shared.params
    h = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
    np.testing.assert_allclose(head_logits(shared.bind(target)._head_params(), h),
                               head_logits(own.params, h), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"share the target's LM head: bind\(target\) first"):
        shared._head_params()
    shared.save(tmp_path / "shared", dtype="float32")
    loaded = Medusa.load(tmp_path / "shared")
    assert loaded.shared_head and json.loads((tmp_path / "shared/config.json").read_text())["shared_head"]
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=loaded)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)


def test_refuses_a_bad_sizing(target):
    with pytest.raises(ValueError, match="sizing must be 'auto', None, a jaxspec.speculative"):
        Medusa.create(target, 2).replace(sizing="fast")


def test_with_tree_and_defaults(target):
    d = Medusa.create(target)
    assert d.config.num_heads == 4 and d.tree.num_nodes == 11 and d.tree.max_depth == 4
    assert Medusa.create(target, 2).tree == js.trees.from_paths([(0,), (1,), (2,), (0, 0), (0, 1),
                                                                 (1, 0)])
    assert d.uses_target_hidden and d.rule == "speculative" and d.cache_slack() == 5
    chain = d.with_tree(num_tokens=3)
    assert chain.tree == js.trees.chain(3) and chain.cache_slack() == 4
    assert chain.with_tree().tree == chain.tree and d.with_tree().tree == d.tree
    kary = d.with_tree(tree=js.trees.kary(2, 2), rule="speculative_wor")
    assert kary.tree == js.trees.kary(2, 2) and kary.rule == "speculative_wor"
    for x in (chain, kary):
        assert x.params is d.params and x.target_fingerprint == d.target_fingerprint
        x.check_compatible(target)
    assert js.Medusa is Medusa
    # Untrained heads are identity blocks: zero kernels and biases, LM head = target rows
    assert not np.asarray(d.params["heads"]["kernel"]).any()
    assert d.params["lm_head"].shape == (4, 32, 32)


# -- 5. refusals -------------------------------------------------------------------------------------

def _refused(target, drafter, match):
    """generate refuses before compiling or running anything."""
    before = dict(COMPILATIONS)
    with pytest.raises(ValueError, match=match):
        js.generate(target, [[1, 2, 3]], max_new_tokens=8, drafter=drafter)
    assert dict(COMPILATIONS) == before


def test_refuses_heads_for_another_target(tiny, target):
    drafter = Medusa.create(tiny.make_model(1), 3)
    assert drafter.config == Medusa.create(target, 3).config          # same shapes
    _refused(target, drafter, r"this Medusa drafter was trained for another target \(fingerprint "
                              r"[0-9a-f]{16}, this target's is [0-9a-f]{16}\); train heads for "
                              r"this target \(jaxspec\.train\.medusa\)")


def test_refuses_another_hidden_size_or_vocabulary(target):
    """(Heads relabelled as another target's: the shape check comes before any weight is read.)"""
    drafter = Medusa.create(target, 2)
    _refused(target, drafter.replace(config=MedusaConfig(hidden_size=48, vocab_size=32, num_heads=2)),
             r"this Medusa drafter was built for a target with hidden size 48, but the target has "
             r"hidden size 32")
    _refused(target, drafter.replace(config=MedusaConfig(hidden_size=32, vocab_size=48, num_heads=2)),
             r"trained for a vocabulary of 48 tokens, but the target's is 32")


@pytest.mark.parametrize("how", ["tree", "num_tokens", "with_tree", "load"])
def test_refuses_a_tree_deeper_than_the_heads(tmp_path, target, how):
    match = (r"the tree is 4 deep but this Medusa drafter has only 3 heads \(head k drafts depth "
             r"k\); give a tree at most 3 deep \(num_tokens <= 3\) or train more heads")
    with pytest.raises(ValueError, match=match):
        if how == "tree":
            Medusa.create(target, 3, tree=js.trees.kary(1, 4))
        elif how == "num_tokens":
            Medusa.create(target, 3, num_tokens=4)
        elif how == "with_tree":
            Medusa.create(target, 3).with_tree(tree=js.trees.from_paths([(0,), (0, 0), (0, 0, 0),
                                                                        (0, 0, 0, 0)]))
        else:
            Medusa.create(target, 3).save(tmp_path / "m")
            Medusa.load(tmp_path / "m", num_tokens=4)


def test_refuses_a_tree_wider_than_the_head(target):
    _refused(target, Medusa.create(target, 2, tree=js.trees.kary(4, 1), head_tokens=3),
             r"the tree has up to 4 children per node but the Medusa heads have only 3 tokens")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_tokens=0), r"num_tokens must be an integer >= 1 \(at most the number of heads, 4\), got 0"),
    (dict(num_tokens=2.5), r"num_tokens must be an integer >= 1"),
    (dict(num_tokens=True), r"num_tokens must be an integer >= 1"),
    (dict(tree=[-1, 0, 1]), r"Medusa tree must be a js\.trees TreeSpec \(chain, kary, from_paths\), got list"),
    (dict(tree=js.trees.dynamic(6, 2, 3)), r"Medusa tree must be a js\.trees TreeSpec .*DynamicTree"),
    (dict(tree=js.trees.chain(0)), r"Medusa tree drafts nothing"),
    (dict(rule="greedy"), r"Medusa rule must be 'speculative' \(lossless\), 'speculative_wor' "
                          r"\(lossless\) or 'typical' .*got 'greedy'"),
    (dict(num_heads=0), r"num_heads must be an integer >= 1, got 0"),
    (dict(head_tokens=33), r"head_tokens must be in \[1, 32\]"),
    (dict(head_tokens=[3, 40]), r"head_tokens ids must be a non-empty list of token ids in \[0, 32\)"),
])
def test_refuses_bad_arguments(target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Medusa.create(target, **kwargs)


def test_load_refusals(tmp_path, target):
    with pytest.raises(ValueError, match=r"is not a Medusa drafter directory \(needs config\.json "
                                         r"and model\.safetensors, as written by Medusa\.save\)"):
        Medusa.load(tmp_path)
    js.Eagle.create(target, num_tokens=2).save(tmp_path / "eagle")
    with pytest.raises(ValueError, match=r"describes a 'eagle' drafter, not a Medusa one"):
        Medusa.load(tmp_path / "eagle")
    Medusa.create(target, 2, head_tokens=8).save(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"head_tokens": 8', '"head_tokens": 9'))
    with pytest.raises(ValueError, match=r"tensor lm_head is shape \(2, 8, 32\), expected shape "
                                         r"\(2, 9, 32\)"):
        Medusa.load(tmp_path / "m")


def test_init_needs_the_target_hidden_states(target):
    tokens, lengths = _prompt_arrays([[1, 2]])
    with pytest.raises(ValueError, match=r"Medusa needs the target's hidden states"):
        Medusa.create(target, 2).init(target, tokens, lengths, 16)
