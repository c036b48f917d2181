"""Eagle (jaxspec/speculative/drafters/eagle.py) and its training loss (jaxspec/train/eagle.py).

* Greedy exactness end to end (js.generate) on the shared ragged prompts: chains of 1 and 4, a
  k-ary tree, a from_paths tree with VocabTrim, and a drafter trained for 150 steps on
  the target's own greedy outputs (accepted drafts, and its final cache checked slot by slot).
* Alignment with the training code: the first two chain tokens of round 1 are the argmax of
  `step_one` / `step_two` at the last prompt position (and under sampling their q is exactly the
  softmax of those logits on the head tokens); after a full round the next catch-up leaves the
  drafter cache as a fresh init over the longer committed prefix would.
* Sampling: a seeded chi-square of the first three tokens against the target's exact law (chain
  with VocabTrim, static tree), and of the root's first two children against the
  without-replacement (Plackett-Luce) law of q.
* save / load / with_tree; every refusal's message; VocabTrim ids, FeatureBatches, the loss.

Models are the shared tiny ones (conftest.py: vocabulary 32; test_tree_drafters.py: vocabulary 8
for the distribution tests), so the greedy runs reuse the shapes of the other drafter tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec.decoding import COMPILATIONS, prefill
from jaxspec.models.cache import KVCache
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import create, forward, forward_train
from jaxspec.sampling import Sampling
from jaxspec.speculative.draft import Context
from jaxspec.speculative.drafters.eagle import Eagle, EagleState, draft_features, head_logits
from jaxspec.speculative.verify import Verdict
from jaxspec.train import eagle as eagle_train
from test_tree_drafters import CHI_TREE, ROWS, SMALL_VOCAB, _chi_square_pvalue, _exact_law, _spec
from test_tree_drafters import models as small_models

MAX_LEN = 48           # drafter / target cache slots in the hand-driven rounds
PATHS_TREE = js.trees.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])


def _head(target, head_ids):
    """The drafter head the training code is given: the target's LM-head rows of the head ids
    (the untied lm_head kernel's columns here; the embedding rows for a tied target)."""
    head_ids = jnp.asarray(head_ids)
    if target.config.tie_word_embeddings:
        return target.params["embed"][head_ids]
    return target.params["lm_head"]["kernel"][:, head_ids].T


def _sharpened(drafter: Eagle, seed: int = 0, head_ids=None) -> Eagle:
    """A random drafter whose layer matters: attention sharp (q, k x3), residual branches at full
    scale (o, down x10), so a wrong position or a leaked key changes its output."""
    params = jax.tree_util.tree_map(lambda x: x, drafter.params)
    layer = dict(params["layer"])
    for name, scale in (("q", 3.0), ("k", 3.0), ("o", 10.0), ("down", 10.0)):
        layer[name] = {"kernel": layer[name]["kernel"] * scale}
    params["layer"] = layer
    params["fc"] = {"kernel": params["fc"]["kernel"] * 2.0,
                    "bias": 0.1 * jax.random.normal(jax.random.PRNGKey(seed),
                                                    params["fc"]["bias"].shape)}
    if head_ids is not None:
        params["head_ids"] = jnp.asarray(head_ids, jnp.int32)
    return drafter.replace(params=params)


def _prompt_arrays(prompts, width=16):
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_len",))
def _round_one(target, drafter, tokens, lengths, sampling, key, max_len=MAX_LEN):
    """What the loop does up to the first proposal: prefill (all hidden states), the first token
    (argmax), init, propose. Returns (first [B], draft, state after propose, target cache,
    history [B, max_len])."""
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
    draft, state = drafter.propose(state, ctx, sampling, key, target.config.vocab_size)
    return first, draft, state, cache, history


# -- 1. greedy: identical to the target's own output -------------------------------------------

GREEDY_DRAFTERS = {
    "chain1": dict(num_tokens=1),
    "chain4": dict(num_tokens=4),
    "kary": dict(tree=js.trees.kary(2, 3)),
    "paths_trim": dict(tree=PATHS_TREE, head_tokens=12),
    "dynamic": dict(tree=js.trees.dynamic(6, 3, 2)),
    "dynamic_trim": dict(tree=js.trees.dynamic(8, 3, 3), head_tokens=12),
}


@pytest.mark.parametrize("name", GREEDY_DRAFTERS)
def test_greedy_identical_to_autoregressive(name, tiny, target, greedy_ref):
    drafter = Eagle.create(target, key=1, **GREEDY_DRAFTERS[name])
    if name.endswith("_trim"):  # VocabTrim: 12 of the 32 ids, not a prefix of the vocabulary
        drafter = drafter.replace(params=dict(drafter.params,
                                              head_ids=jnp.arange(3, 27, 2, dtype=jnp.int32)))
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    assert isinstance(out.drafter_state, EagleState)


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
    """A chain-4 Eagle trained 150 AdamW steps (default loss weights) on the target's greedy
    outputs after the shared prompts and 9 random ones: (drafter, per-step losses, first / last
    metrics, items)."""
    import optax

    rng = np.random.default_rng(0)
    extra = [rng.integers(1, tiny.vocab, int(n)).tolist() for n in rng.integers(2, 15, 9)]
    seqs = _greedy_sequences(target, list(tiny.prompts) + extra, tiny.max_new)
    items = eagle_train.compute_features(target, seqs, max_len=64, batch_size=8, log=lambda s: None)
    assert items[0][1].shape == (len(seqs[0][0]), target.config.hidden_size)
    drafter = Eagle.create(target, num_tokens=4, key=2)
    head_ids = drafter.params["head_ids"]
    assert not target.config.tie_word_embeddings      # the head must be the LM head's columns
    loss = eagle_train.make_loss(drafter.config, target.params["embed"], head_ids,
                                 head=_head(target, head_ids))
    data = eagle_train.FeatureBatches(items, length=32, batch_size=8)
    opt = optax.adamw(3e-3, weight_decay=0.0)
    params = {k: v for k, v in drafter.params.items() if k != "head_ids"}

    @jax.jit
    def step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: loss(dict(p, head_ids=head_ids), batch), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state, position, history = opt.init(params), 0, []
    for _ in range(150):
        batch, position = data.batch(position)
        params, opt_state, metrics = step(params, opt_state, jax.tree_util.tree_map(jnp.asarray, batch))
        history.append(jax.device_get(metrics))
    done = drafter.replace(params=dict(params, head_ids=head_ids))
    return done, [float(m["loss"]) for m in history], (history[0], history[-1]), items


def test_training_lowers_the_loss(trained):
    _, losses, (first, last), _ = trained
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:3]), (losses[:3], losses[-10:])
    for step in (1, 2):
        assert last[f"ce{step}"] < 0.25 * first[f"ce{step}"]
        assert last[f"reg{step}"] < 0.75 * first[f"reg{step}"]
        assert last[f"top1_{step}"] > 0.9 > 0.1 > first[f"top1_{step}"]


def test_soft_labels_take_the_cross_entropy_against_the_target_distribution(target, trained):
    """soft_labels: step 1's classification term is sum_v p(v) (-log q(v)) with p the target's
    distribution over the head tokens at the next position (from its cached feature) and q the
    drafter's, averaged over valid positions, written out here; the feature term and the greedy
    top-1 are those of the hard-label loss."""
    drafter, _, _, items = trained
    head_ids = drafter.params["head_ids"]
    head = _head(target, head_ids)
    batch, _ = eagle_train.FeatureBatches(items, length=32, batch_size=4, seed=3).batch(0)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    args = (drafter.config, target.params["embed"], head_ids)
    _, soft = eagle_train.make_loss(*args, head=head, soft_labels=True)(drafter.params, batch)
    _, hard = eagle_train.make_loss(*args, head=head)(drafter.params, batch)

    tokens, f = batch["tokens"], batch["features"].astype(jnp.float32)
    t = tokens.shape[1] - 3
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (tokens.shape[0], t))
    x1 = draft_features(drafter.params, drafter.config, f[:, :t],
                        target.params["embed"][tokens[:, 1:t + 1]])
    h1, _ = eagle_train.step_one(drafter.params, drafter.config, x1, positions)
    p = np.asarray(jax.nn.softmax(head_logits(head, f[:, 1:t + 1]), -1), np.float64)
    log_q = np.asarray(jax.nn.log_softmax(head_logits(head, h1), -1), np.float64)
    mask = np.asarray(batch["valid"][:, 2:t + 2])
    expected = (-(p * log_q).sum(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(soft["ce1"]), expected, rtol=1e-4)
    assert float(soft["ce1"]) > float(hard["ce1"])     # the target's entropy is in it
    for key in ("reg1", "reg2", "top1_1", "top1_2"):
        assert float(soft[key]) == float(hard[key]), key
    # A soft-capped target (Gemma 2/3): the teacher is softmax(cap * tanh(logits / cap)).
    _, capped = eagle_train.make_loss(*args, head=head, soft_labels=True,
                                      logit_softcap=0.5)(drafter.params, batch)
    z = np.asarray(head_logits(head, f[:, 1:t + 1]), np.float64)
    z = 0.5 * np.tanh(z / 0.5)
    p_cap = np.exp(z - z.max(-1, keepdims=True))
    p_cap /= p_cap.sum(-1, keepdims=True)
    expected_cap = (-(p_cap * log_q).sum(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(capped["ce1"]), expected_cap, rtol=1e-4)
    assert abs(expected_cap - expected) > 1e-2 * expected


def test_trained_drafter_is_accepted_and_exact(tiny, target, greedy_ref, trained):
    """Same program as "chain4" (only the weights differ); its drafts are now accepted. Its final
    cache holds, slot by slot, what the layer computes from true features: drafted positions
    (fed with predicted features inside rounds) never stay in it."""
    drafter, _, _, _ = trained
    before = COMPILATIONS["speculative"]
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    print(f"trained Eagle: mean accepted {out.stats['mean_accepted']:.2f}")
    assert out.stats["mean_accepted"] > 2.0
    random = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new,
                         drafter=Eagle.create(target, num_tokens=4, key=1))
    assert out.stats["mean_accepted"] > random.stats["mean_accepted"]
    assert COMPILATIONS["speculative"] - before <= 1  # chain4's program, if not compiled already

    state = out.drafter_state
    seqs = [list(p) + greedy_ref.tokens[b].tolist() for b, p in enumerate(tiny.prompts)]
    tokens, lengths = _prompt_arrays(seqs, width=32)
    cache = KVCache.create(target.config, len(seqs), 32, target.dtype)
    _, hidden, _ = prefill(target, tokens, lengths, cache, all_hidden=True)
    ref = drafter.init(target, tokens, lengths, state.cache.max_len, target_hidden=hidden).cache
    upto = np.asarray(state.cache.lengths)
    assert np.all(upto >= np.asarray(lengths) - 4) and np.all(upto <= np.asarray(lengths))
    for b, n in enumerate(upto):
        for got, want in ((state.cache.k, ref.k), (state.cache.v, ref.v)):
            np.testing.assert_allclose(np.asarray(got)[:, b, :, :n], np.asarray(want)[:, b, :, :n],
                                       atol=2e-5, rtol=1e-4, err_msg=f"row {b}")


def test_trained_drafter_in_a_dynamic_tree_is_accepted_and_exact(tiny, target, greedy_ref, trained):
    """The trained chain-4 weights drafting an EAGLE-2 tree (budget 8, depth 4, top 2, the whole
    tree verified): the target's greedy output, and its drafts are accepted (a random drafter's
    almost never are)."""
    drafter, _, _, _ = trained
    tree = drafter.with_tree(tree=js.trees.dynamic(8, 4, 2), sizing=None)
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=tree)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    random = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new,
                         drafter=Eagle.create(target, tree=js.trees.dynamic(8, 4, 2), key=1,
                                              ).replace(sizing=None))
    print(f"trained Eagle, dynamic tree: mean accepted {out.stats['mean_accepted']:.2f} "
          f"(random: {random.stats['mean_accepted']:.2f})")
    assert out.stats["mean_accepted"] > 2.0 > random.stats["mean_accepted"]


def test_dynamic_tree_is_the_best_budget_of_the_expansion(target, aligned):
    """Round 1 of dynamic(7, 3, 3) against an independent reference: the static 3-ary tree of
    depth 3 drafts every top-3 path (its tokens and confidences are the same layer's), EAGLE-2's
    expansion is replayed on it in numpy (level 1: the root's 3 children; level 2: the children
    of the top 3 of level 1; level 3: the children of the top 3 of level 2, by path
    log-probability), and the 7 best candidates must be the dynamic draft's nodes, in score order,
    with the same tokens, parents and confidences."""
    tokens, lengths = _prompt_arrays(ALIGN_PROMPTS)
    key = jax.random.PRNGKey(0)
    kary = js.trees.kary(3, 3)
    static = _round_one(target, aligned.with_tree(tree=kary), tokens, lengths, Sampling(), key)[1]
    dyn = _round_one(target, aligned.with_tree(tree=js.trees.dynamic(7, 3, 3)), tokens, lengths,
                     Sampling(), key)[1]
    parents_k, depths_k = np.asarray(kary.parents), kary.depths
    for b in range(len(ALIGN_PROMPTS)):
        conf = np.asarray(static.confidence[b], np.float64)
        score = np.zeros(kary.num_nodes)
        for i in range(1, kary.num_nodes):
            score[i] = score[parents_k[i]] + np.log(conf[i])
        candidates, frontier = [], [0]
        for depth in range(1, 4):
            level = [i for i in range(kary.num_nodes) if parents_k[i] in frontier]
            candidates += level
            frontier = sorted(level, key=lambda i: -score[i])[:3]
        best = sorted(candidates, key=lambda i: -score[i])[:7]

        def path(tok, par, i):
            out = []
            while i > 0:
                out.append(int(tok[i]))
                i = int(par[i])
            return tuple(reversed(out))
        want = [path(np.asarray(static.tokens[b]), parents_k, i) for i in best]
        d_tok, d_par = np.asarray(dyn.tokens[b]), np.asarray(dyn.parents[b])
        got = [path(d_tok, d_par, i) for i in range(1, 8)]
        assert got == want, b
        assert d_par[0] == -1 and all(0 <= d_par[i] < i for i in range(1, 8))
        np.testing.assert_allclose(np.asarray(dyn.confidence[b, 1:]), conf[best], rtol=1e-4)
        assert np.asarray(dyn.valid[b]).all() and d_tok[0] == int(static.tokens[b, 0])
        assert dyn.q is None and depths_k[best].max() >= 2     # deeper than one level
    assert np.all(np.isin(np.asarray(dyn.tokens[:, 1:]), HEAD_IDS))     # VocabTrim ids


# -- 2. alignment with the training code ---------------------------------------------------------

HEAD_IDS = np.sort(np.random.default_rng(5).choice(32, 20, replace=False)).astype(np.int32)
ALIGN_PROMPTS = [[5], [3, 9, 3, 9, 3, 9], list(range(1, 14)), [7, 30, 2, 2, 19, 4, 4, 11, 28]]


@pytest.fixture(scope="module")
def aligned(target):
    """A sharpened chain-3 drafter with a 20-token VocabTrim head that is not a prefix."""
    return _sharpened(Eagle.create(target, num_tokens=3, head_tokens=20, key=3), head_ids=HEAD_IDS)


def _training_logits(target, drafter, prompts, first, second):
    """step_one / step_two head logits at position len - 1 of prompt + [first] (step_two with
    x_{len+1} = second), computed by jaxspec.train.eagle on the whole padded sequence."""
    width = 18
    batch = len(prompts)
    seq = np.zeros((batch, width), np.int32)
    for b, p in enumerate(prompts):
        seq[b, :len(p) + 1] = p + [int(first[b])]
    seq = jnp.asarray(seq)
    embed, params, config = target.params["embed"], drafter.params, drafter.config
    _, feats = forward_train(target.params, target.config, seq)                 # [B, W, D]
    t = width - 1
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    x1 = draft_features(params, config, feats[:, :t], embed[seq[:, 1:]])
    h1, (k1, v1) = eagle_train.step_one(params, config, x1, positions)
    last = jnp.asarray([len(p) - 1 for p in prompts])
    nxt2 = jnp.concatenate([seq[:, 2:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
    nxt2 = nxt2.at[jnp.arange(batch), last].set(jnp.asarray(second, jnp.int32))  # x_{len+1}
    x2 = draft_features(params, config, h1, embed[nxt2])
    h2 = eagle_train.step_two(params, config, x2, positions, k1, v1)
    head = _head(target, params["head_ids"])
    rows = jnp.arange(batch)
    return (np.asarray(head_logits(head, h1[rows, last])),
            np.asarray(head_logits(head, h2[rows, last])))


def test_first_round_drafts_are_the_training_predictions(target, aligned):
    """Greedy: token 1 = head_ids[argmax step_one], token 2 = head_ids[argmax step_two fed with
    token 1], on ragged prompts (lengths 1, 6, 13, 9) in one padded batch."""
    tokens, lengths = _prompt_arrays(ALIGN_PROMPTS)
    first, draft, state, _, _ = _round_one(target, aligned, tokens, lengths, Sampling(),
                                           jax.random.PRNGKey(0))
    drafted = np.asarray(draft.tokens)
    np.testing.assert_array_equal(drafted[:, 0], np.asarray(first))
    assert draft.q is None and np.asarray(draft.valid).all()
    np.testing.assert_array_equal(np.asarray(state.cache.lengths), np.asarray(lengths))
    logits1, logits2 = _training_logits(target, aligned, ALIGN_PROMPTS, first, drafted[:, 1])
    np.testing.assert_array_equal(drafted[:, 1], HEAD_IDS[logits1.argmax(-1)])
    np.testing.assert_array_equal(drafted[:, 2], HEAD_IDS[logits2.argmax(-1)])
    assert set(drafted[:, 1:].ravel()) <= set(HEAD_IDS.tolist())
    # The head tokens' logits are far from ties (so the argmax comparison is meaningful).
    top2 = np.sort(logits1, -1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)


def test_first_round_q_is_the_training_distribution(target, aligned):
    """Sampling (temperature 0.7): q of chain node 1 and 2 is softmax(logits / 0.7) of the
    training code's step_one / step_two (step two fed with the sampled token 1), zero outside the
    head tokens; the sampled tokens are head tokens of positive probability."""
    sampling = Sampling(temperature=0.7)
    tokens, lengths = _prompt_arrays(ALIGN_PROMPTS)
    first, draft, _, _, _ = _round_one(target, aligned, tokens, lengths, sampling,
                                       jax.random.PRNGKey(1))
    drafted, q = np.asarray(draft.tokens), np.asarray(draft.q)
    logits1, logits2 = _training_logits(target, aligned, ALIGN_PROMPTS, first, drafted[:, 1])
    outside = np.setdiff1d(np.arange(32), HEAD_IDS)
    for node, logits in ((1, logits1), (2, logits2)):
        want = np.asarray(jax.nn.softmax(jnp.asarray(logits) / 0.7, axis=-1))
        np.testing.assert_allclose(q[:, node][:, HEAD_IDS], want, atol=2e-5, rtol=1e-4)
        assert np.all(q[:, node][:, outside] == 0)
        assert np.all(q[np.arange(len(q)), node, drafted[:, node]] > 0)


def _accept(target, draft, cache, tree, paths, num_accepted):
    """One verification done by hand: the target scores the draft (tree mask, positions
    len + depth) and the given paths are accepted; the next token is the target's argmax after
    the deepest accepted node. Returns (verdict, target_logits, target_hidden)."""
    batch, n = draft.tokens.shape
    positions = cache.lengths[:, None] + jnp.asarray(tree.depths)[None, :]
    mask = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask), (batch, n, n))
    logits, hidden, _ = forward(target, draft.tokens, cache, positions, mask)
    path = jnp.asarray(paths, jnp.int32)
    num = jnp.asarray(num_accepted, jnp.int32)
    deepest = path[jnp.arange(batch), num]
    nxt = jnp.argmax(logits[jnp.arange(batch), deepest], axis=-1).astype(jnp.int32)
    return Verdict(path=path, num_accepted=num, next_token=nxt), logits, hidden


@functools.partial(jax.jit, static_argnames=("tree", "num_accepted"))
def _two_rounds(target, drafter, tokens, lengths, tree, paths, num_accepted):
    """Round 1 (propose, hand verification, commit), then round 2's proposal. Returns (round-2
    draft, state after round-2 propose, committed history [B, MAX_LEN], committed length c')."""
    sampling, key = Sampling(), jax.random.PRNGKey(0)
    first, draft, state, cache, history = _round_one(target, drafter, tokens, lengths, sampling, key)
    batch = tokens.shape[0]
    rows = jnp.arange(batch)
    ctx = Context(history=history, length=lengths + 1, cache_lengths=lengths,
                  active=jnp.ones((batch,), bool))
    verdict, logits, hidden = _accept(target, draft, cache, tree, paths, num_accepted)
    state = drafter.commit(state, ctx, draft, verdict, logits, target_hidden=hidden)
    acc = verdict.num_accepted
    path_tokens = jnp.take_along_axis(draft.tokens, verdict.path, axis=1)      # [B, D+1]
    d = verdict.path.shape[1]
    emitted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
    emitted = emitted.at[rows, acc].set(verdict.next_token)
    offs = jnp.arange(d)[None, :]
    slots = jnp.where(offs <= acc[:, None], lengths[:, None] + 1 + offs, MAX_LEN)
    history = history.at[rows[:, None], slots].set(emitted, mode="drop")
    committed = lengths + acc + 1
    ctx2 = Context(history=history, length=committed + 1, cache_lengths=committed,
                   active=jnp.ones((batch,), bool))
    draft2, state2 = drafter.propose(state, ctx2, sampling, key, target.config.vocab_size)
    return draft2, state2, history, committed


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_catch_up_equals_a_fresh_start_on_the_longer_prefix(target, aligned, kind):
    """After round 1 (accepted paths of 3, 0, 2 and 1 nodes / 2, 0, 1 and 2 in a tree, through
    second children), round 2's catch-up leaves the drafter cache equal (1e-5) to init + catch-up
    from scratch over the committed prefix with true features, and round 2 drafts the same tokens
    (the prefixes fit the prompt width 16: the chain's fresh start reuses the alignment program)."""
    tokens, lengths = _prompt_arrays(ALIGN_PROMPTS)
    if kind == "chain":
        drafter, tree = aligned, aligned.tree
        paths, num = ((0, 1, 2, 3), (0, 0, 0, 0), (0, 1, 2, 0), (0, 1, 0, 0)), (3, 0, 2, 1)
    else:
        tree = js.trees.kary(2, 2)          # 1, 2 under the root; 3, 4 under 1; 5, 6 under 2
        drafter = aligned.with_tree(tree=tree)
        paths, num = ((0, 2, 6), (0, 0, 0), (0, 2, 0), (0, 1, 4)), (2, 0, 1, 2)
    draft2, state2, history, committed = _two_rounds(target, drafter, tokens, lengths, tree,
                                                     paths, num)
    committed = np.asarray(committed)
    np.testing.assert_array_equal(committed, np.asarray(lengths) + np.asarray(num) + 1)
    np.testing.assert_array_equal(np.asarray(state2.cache.lengths), committed)
    # From scratch: prompt = the committed prefix; its first token must be round 2's root.
    history = np.asarray(history)
    fresh_prompts = [history[b, :c].tolist() for b, c in enumerate(committed)]
    fresh_tokens, fresh_lengths = _prompt_arrays(fresh_prompts)
    first, fresh_draft, fresh_state, _, _ = _round_one(target, drafter, fresh_tokens,
                                                       fresh_lengths, Sampling(),
                                                       jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(first), history[np.arange(len(committed)), committed])
    np.testing.assert_array_equal(np.asarray(fresh_state.cache.lengths), committed)
    for b, c in enumerate(committed):
        for got, want in ((state2.cache.k, fresh_state.cache.k), (state2.cache.v, fresh_state.cache.v)):
            np.testing.assert_allclose(np.asarray(got)[:, b, :, :c], np.asarray(want)[:, b, :, :c],
                                       atol=1e-5, rtol=1e-5, err_msg=f"row {b}")
    np.testing.assert_array_equal(np.asarray(draft2.tokens), np.asarray(fresh_draft.tokens))


# -- 3. sampling: the output law is the target's -------------------------------------------------

SAMPLING = Sampling(temperature=0.9, top_k=5)


@pytest.mark.parametrize("kind", ["chain_trim", "tree", "dynamic"])
def test_sampling_distribution_chi_square(kind):
    """The first three tokens of 2000 rows follow the target's exact law (temperature 0.9,
    top-k 5). chain_trim: a chain of 3 whose head keeps 6 of the 8 ids (q = 0 on the others);
    tree: test_tree_drafters' CHI_TREE (root fanout 6 > top_k: the sixth sibling is invalid);
    dynamic: an EAGLE-2 tree (budget 6, depth 2, top 3) verified as one-hot proposals.
    Seeded, deterministic; a correct rule passes p > 1e-3 with probability 0.999."""
    target, _ = small_models(SMALL_VOCAB)
    if kind == "chain_trim":
        drafter = Eagle.create(target, num_tokens=3, head_tokens=6, key=4)
        drafter = drafter.replace(params=dict(drafter.params,
                                              head_ids=jnp.asarray([0, 1, 3, 4, 6, 7], jnp.int32)))
    elif kind == "tree":
        drafter = Eagle.create(target, tree=CHI_TREE, key=4)
    else:
        drafter = Eagle.create(target, tree=js.trees.dynamic(6, 2, 3), key=4)
        assert drafter.rule == "auto"
    drafter = _sharpened(drafter, seed=4)
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
    print(f"{kind}: p={pvalue:.3g} over {cells} cells, accepted per row {accepted.mean():.2f}")
    assert cells >= 20
    assert (accepted == 0).any() and (accepted >= 2).any()    # rejections and long paths
    assert pvalue > 1e-3
    # The sample can tell the law apart from a plausible wrong one (no top-k).
    wrong, _ = _chi_square_pvalue(observed, _exact_law(target, prompt, Sampling(temperature=0.9)),
                                  ROWS)
    assert wrong < 1e-3


def test_root_children_follow_q_without_replacement():
    """The root's first two children over 2000 identical rows (independent Gumbel noise per row):
    P(c1 = i, c2 = j) = q_i q_j / (1 - q_i), the law "speculative_wor" assumes (seeded chi-square);
    q is the processed (top-k 5) distribution, and the sixth child of CHI_TREE is invalid. (The
    drafter is not sharpened here: its q is flatter, so more cells are testable.) Power: i.i.d.
    siblings conditioned on being distinct, P ~ q_i q_j, is rejected (p ~ 1e-24 at this seed)."""
    target, _ = small_models(SMALL_VOCAB)
    drafter = Eagle.create(target, tree=CHI_TREE, key=4)
    tokens = jnp.asarray(np.tile([1, 2, 3], (ROWS, 1)), jnp.int32)
    lengths = jnp.full((ROWS,), 3, jnp.int32)
    _, draft, _, _, _ = _round_one(target, drafter, tokens, lengths, SAMPLING,
                                   jax.random.PRNGKey(3), max_len=16)
    q = np.asarray(draft.q[0, 1], np.float64)
    np.testing.assert_allclose(np.asarray(draft.q[:, 1]), np.broadcast_to(q, (ROWS, SMALL_VOCAB)),
                               atol=1e-6)
    assert (q > 0).sum() == 5 and q.sum() == pytest.approx(1.0, abs=1e-5)
    valid = np.asarray(draft.valid)
    assert valid[:, 1:6].all() and not valid[:, 6].any()
    c1, c2 = np.asarray(draft.tokens[:, 1]), np.asarray(draft.tokens[:, 2])
    assert np.all(c1 != c2)
    law = q[:, None] * q[None, :] / np.maximum(1 - q[:, None], 1e-12)
    np.fill_diagonal(law, 0.0)
    observed = np.bincount(c1 * SMALL_VOCAB + c2, minlength=SMALL_VOCAB ** 2)
    pvalue, cells = _chi_square_pvalue(observed, law, ROWS)
    print(f"children: p={pvalue:.3g} over {cells} cells")
    assert cells >= 15 and pvalue > 1e-3
    iid = q[:, None] * q[None, :]
    np.fill_diagonal(iid, 0.0)
    assert _chi_square_pvalue(observed, iid / iid.sum(), ROWS)[0] < 1e-3


# -- 4. save / load / with_tree ----------------------------------------------------------------

def test_save_load_round_trip(tmp_path, target, aligned):
    aligned.save(tmp_path / "f32", dtype="float32")
    loaded = Eagle.load(tmp_path / "f32")
    assert loaded.config == aligned.config and loaded.tree == aligned.tree
    assert loaded.num_tokens == 3 and loaded.target_fingerprint == aligned.target_fingerprint
    for a, b in zip(jax.tree_util.tree_leaves(aligned.params), jax.tree_util.tree_leaves(loaded.params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(aligned.params) == jax.tree_util.tree_structure(loaded.params)
    tokens, lengths = _prompt_arrays(ALIGN_PROMPTS)
    sampling = Sampling(temperature=0.7)
    runs = [_round_one(target, d, tokens, lengths, sampling, jax.random.PRNGKey(1))[1]
            for d in (aligned, loaded)]
    np.testing.assert_array_equal(np.asarray(runs[0].tokens), np.asarray(runs[1].tokens))
    np.testing.assert_array_equal(np.asarray(runs[0].q), np.asarray(runs[1].q))
    # bfloat16 (the default): the weights rounded, the head ids exact, settings kept.
    tree = js.trees.kary(2, 2)
    aligned.with_tree(tree=tree).save(tmp_path / "bf16")
    half = Eagle.load(tmp_path / "bf16")
    assert half.tree == tree and half.config == aligned.config
    np.testing.assert_array_equal(np.asarray(half.params["head_ids"]), HEAD_IDS)
    np.testing.assert_allclose(np.asarray(half.params["fc"]["kernel"]),
                               np.asarray(aligned.params["fc"]["kernel"]), rtol=1e-2, atol=1e-3)
    assert Eagle.load(tmp_path / "bf16", num_tokens=2).tree == js.trees.chain(2)
    assert Eagle.load(tmp_path / "bf16", tree=js.trees.kary(3, 1)).tree == js.trees.kary(3, 1)
    aligned.with_tree(tree=js.trees.dynamic(5, 2, 2)).save(tmp_path / "dyn")
    assert Eagle.load(tmp_path / "dyn").tree == js.trees.dynamic(5, 2, 2)


def test_with_tree(target, aligned):
    chain = aligned.with_tree(num_tokens=6)
    assert chain.tree == js.trees.chain(6) and chain.num_tokens == 6
    tree = aligned.with_tree(tree=js.trees.kary(2, 3))
    assert tree.tree == js.trees.kary(2, 3) and tree.cache_slack() == 4
    for d in (chain, tree):
        assert d.params is aligned.params and d.target_fingerprint == aligned.target_fingerprint
        d.check_compatible(target)
    assert aligned.with_tree().tree == aligned.tree
    assert tree.rule == "speculative_wor" and Eagle.uses_target_hidden
    dyn = aligned.with_tree(tree=js.trees.dynamic(6, 3, 2))
    assert dyn.rule == "auto" and dyn.cache_slack() == 4 and dyn.tree.num_nodes == 7
    dyn.check_compatible(target)


# -- 5. refusals -----------------------------------------------------------------------------------

def _refused(target, drafter, match):
    """generate refuses before compiling or running anything."""
    before = dict(COMPILATIONS)
    with pytest.raises(ValueError, match=match):
        js.generate(target, [[1, 2, 3]], max_new_tokens=8, drafter=drafter)
    assert dict(COMPILATIONS) == before


def test_refuses_a_drafter_for_another_hidden_size(target):
    config = ModelConfig(family="llama", vocab_size=32, hidden_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=12, intermediate_size=64,
                         max_position_embeddings=64)
    _refused(target, Eagle.create(create(config, 0), num_tokens=3),
             r"this Eagle drafter was built for a target with hidden size 48 \(4 heads of 12\), "
             r"but the target has hidden size 32 \(4 heads of 8\)")


def test_refuses_a_drafter_for_another_vocabulary(tiny, target):
    _refused(target, Eagle.create(tiny.make_model(0, vocab=48), num_tokens=3),
             r"trained for a vocabulary of 48 tokens, but the target's is 32")


def test_refuses_a_drafter_for_other_weights(tiny, target):
    other = tiny.make_model(1)
    drafter = Eagle.create(other, num_tokens=3)
    assert drafter.config == Eagle.create(target, num_tokens=3).config   # same shapes
    _refused(target, drafter, r"this Eagle drafter was trained for another target \(fingerprint "
                              r"[0-9a-f]{16}, this target's is [0-9a-f]{16}\); train one for this "
                              r"target with `jaxspec train eagle`")
    Eagle.create(target, num_tokens=3).check_compatible(target)   # its own target: fine


def test_fingerprint_does_not_depend_on_the_dtype(target):
    """A drafter trained against the float32 target serves the same weights loaded in bfloat16."""
    from jaxspec.speculative.drafters.eagle import fingerprint

    half = target.replace(params=jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                                        target.params))
    assert fingerprint(half) == fingerprint(target)
    Eagle.create(target, num_tokens=3).check_compatible(half)
    Eagle.create(half, num_tokens=3).check_compatible(target)


@pytest.mark.parametrize("tree", [js.trees.kary(4, 1), js.trees.dynamic(4, 2, 4)])
def test_refuses_a_tree_wider_than_the_head(target, tree):
    _refused(target, Eagle.create(target, tree=tree, head_tokens=3),
             r"the tree has up to 4 children per node but the drafter's head has only 3 tokens")


@pytest.mark.parametrize("num_tokens", [0, -1, 65, 2.5, "4", True])
def test_refuses_bad_num_tokens(target, num_tokens):
    with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, 64\], got "):
        Eagle.create(target, num_tokens=num_tokens)


@pytest.mark.parametrize("tree", [[-1, 0, 1], (-1, 0), "dynamic"])
def test_refuses_a_tree_that_is_not_a_tree_spec(target, tree):
    with pytest.raises(ValueError, match=r"Eagle tree must be a js\.trees TreeSpec \(chain, kary, "
                                         r"from_paths\) or js\.trees\.dynamic\(\.\.\.\), got "
                                         r"(list|tuple|str)"):
        Eagle.create(target, tree=tree)


def test_refuses_a_root_only_tree(target):
    with pytest.raises(ValueError, match="Eagle tree drafts nothing"):
        Eagle.create(target, tree=js.trees.chain(0))


def test_load_refuses_a_directory_without_config(tmp_path, aligned):
    with pytest.raises(ValueError, match=r"is not an Eagle drafter directory \(needs config\.json "
                                         r"and model\.safetensors, as written by Eagle\.save\)"):
        Eagle.load(tmp_path)
    aligned.save(tmp_path / "d")
    (tmp_path / "d" / "config.json").unlink()
    with pytest.raises(ValueError, match="is not an Eagle drafter directory"):
        Eagle.load(tmp_path / "d")
    aligned.save(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"kind": "eagle"', '"kind": "medusa"'))
    with pytest.raises(ValueError, match=r"describes a 'medusa' drafter, not an Eagle one"):
        Eagle.load(tmp_path / "m")


def test_init_needs_the_target_hidden_states(target, aligned):
    tokens, lengths = _prompt_arrays(ALIGN_PROMPTS)
    with pytest.raises(ValueError, match=r"Eagle needs the target's hidden states"):
        aligned.init(target, tokens, lengths, MAX_LEN)


# -- 6. training data ------------------------------------------------------------------------------

def test_head_token_ids_keeps_the_most_frequent():
    seqs = [(np.asarray([3, 3, 3, 5, 5, 7, 1]),), (np.asarray([5, 9, 9]),)]
    # counts: 3 -> 3, 5 -> 3, 9 -> 2, 1 -> 1, 7 -> 1, others 0
    for num, want in ((2, [3, 5]), (3, [3, 5, 9]), (4, [1, 3, 5, 9]), (5, [1, 3, 5, 7, 9]),
                      (6, [0, 1, 3, 5, 7, 9])):
        got = eagle_train.head_token_ids(seqs, 12, num)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    # always-included ids beat every count (here two never-seen ids and a rare one)
    np.testing.assert_array_equal(eagle_train.head_token_ids(seqs, 12, 3, always=(11, 0)), [0, 3, 11])
    np.testing.assert_array_equal(eagle_train.head_token_ids(seqs, 12, 4, always=(7, 10)),
                                  [3, 5, 7, 10])


def test_feature_batches_are_a_pure_function_of_position(trained):
    _, _, _, items = trained
    data = eagle_train.FeatureBatches(items, length=8, batch_size=4, seed=3)
    again = eagle_train.FeatureBatches(items, length=8, batch_size=4, seed=3)
    n = len(data.windows)
    assert n > len(items) and data.win == 11
    for position in (0, 5, n - 2, 3 * n + 1):            # also across epoch boundaries
        first, nxt = data.batch(position)
        assert nxt == position + 4
        for other in (data.batch(position)[0], again.batch(position)[0]):
            for key in ("tokens", "features", "valid"):
                np.testing.assert_array_equal(first[key], other[key])
        # row r of batch(p) is window p + r: batch(p + 1) is batch(p) shifted by one row
        shifted = data.batch(position + 1)[0]
        for key in ("tokens", "features", "valid"):
            np.testing.assert_array_equal(first[key][1:], shifted[key][:-1])
    b, _ = data.batch(0)
    assert b["tokens"].shape == (4, 11) and b["tokens"].dtype == np.int32
    assert b["features"].shape == (4, 11, items[0][1].shape[1]) and b["features"].dtype == np.float32
    # Every window is a slice of its sequence (tokens and features), zero-padded, valid marked.
    seen = set()
    for position in range(n):
        row = {k: v[0] for k, v in data.batch(position)[0].items()}
        matches = [(i, s) for i, s in data.windows
                   if len(items[i][0][s:s + 11]) == row["valid"].sum()
                   and np.array_equal(row["tokens"][:row["valid"].sum()], items[i][0][s:s + 11])
                   and np.array_equal(row["features"][:row["valid"].sum()],
                                      np.asarray(items[i][1][s:s + 11], np.float32))]
        assert len(matches) == 1 and not row["tokens"][row["valid"].sum():].any()
        assert not row["features"][row["valid"].sum():].any()
        seen.add(matches[0])
    assert len(seen) == n                                # one epoch visits every window once
    other_seed = eagle_train.FeatureBatches(items, length=8, batch_size=4, seed=4)
    assert not np.array_equal(other_seed.batch(0)[0]["tokens"], data.batch(0)[0]["tokens"])
    with pytest.raises(ValueError, match="no training windows"):
        eagle_train.FeatureBatches([(np.arange(5, dtype=np.int32), np.zeros((5, 32)))])


def test_feature_batches_starts_leave_only_later_tokens_valid(trained):
    _, _, _, items = trained
    starts = [min(9, len(it[0]) - 1) for it in items]
    data = eagle_train.FeatureBatches(items, length=8, batch_size=1, seed=3)
    answers = eagle_train.FeatureBatches(items, length=8, batch_size=1, seed=3, starts=starts)
    assert answers.windows == data.windows
    for position in range(len(data.windows)):
        all_rows, answer_rows = data.batch(position)[0], answers.batch(position)[0]
        i, s = data.windows[int(np.random.default_rng((3, 0)).permutation(len(data.windows))[position])]
        want = all_rows["valid"][0] & (np.arange(data.win) + s >= starts[i])
        np.testing.assert_array_equal(answer_rows["valid"][0], want)
        np.testing.assert_array_equal(answer_rows["tokens"], all_rows["tokens"])
    assert any(not answers.batch(p)[0]["valid"][0, 0] for p in range(len(data.windows)))
    with pytest.raises(ValueError, match=r"starts needs one entry per item: 1 for \d+ items"):
        eagle_train.FeatureBatches(items, length=8, starts=[0])
