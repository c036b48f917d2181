"""VocabTrim draft models (DraftModel(head_ids=...)) and their files (draft_model_files.py).

* The id mapping: a head of V' logits lands at its head_ids of the target's vocabulary, -inf
  elsewhere, so the draft proposes only those tokens.
* Temperature 0: identical to the target's greedy output on a ragged batch, for a sized chain,
  a static tree and a dynamic tree.
* Sampling: the first three tokens of 2000 rows follow the target's exact law (seeded
  chi-square), for a chain and a static tree drawn without replacement, with a head that leaves
  out two of the eight tokens (the residual must bring their mass back).
* Files: save / load keep the draft's output; another target, another kind of drafter directory
  and a missing directory are refused, as are head_ids that do not fit the head or the vocabulary.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec.models.transformer import Model
from jaxspec.sampling import Sampling
from jaxspec.speculative.costs import CostModel
from jaxspec.speculative.draft import Context
from test_tree_drafters import ROWS, SAMPLING, SMALL_VOCAB, _chi_square_pvalue, _exact_law, _spec
from test_tree_drafters import models as small_models

HEAD_IDS = np.array([0, 2, 3, 5, 7, 11, 12, 13, 17, 19, 20, 23, 24, 29, 30, 31], np.int32)


def trimmed(model: Model, ids) -> Model:
    """The model with its LM head cut to the columns `ids` (untied): a VocabTrim draft."""
    ids = jnp.asarray(ids, jnp.int32)
    kernel = model.params["lm_head"]["kernel"] if "lm_head" in model.params \
        else model.params["embed"].T
    params = dict(model.params, lm_head={"kernel": kernel[:, ids]})
    return model.replace(params=params,
                         config=model.config.__class__(**{**model.config.__dict__,
                                                          "tie_word_embeddings": False}))


def test_head_logits_land_at_their_ids(target, related_draft):
    drafter = js.DraftModel(trimmed(related_draft, HEAD_IDS), head_ids=jnp.asarray(HEAD_IDS))
    logits = jnp.arange(2 * len(HEAD_IDS), dtype=jnp.float32).reshape(2, len(HEAD_IDS))
    full = np.asarray(drafter._logits(logits, 32))
    assert full.shape == (2, 32)
    np.testing.assert_array_equal(full[:, HEAD_IDS], np.asarray(logits))
    outside = np.setdiff1d(np.arange(32), HEAD_IDS)
    assert np.isneginf(full[:, outside]).all()


def test_drafts_only_head_tokens(tiny, target, related_draft):
    drafter = js.DraftModel(trimmed(related_draft, HEAD_IDS), head_ids=jnp.asarray(HEAD_IDS),
                            num_tokens=4)
    prompts = jnp.asarray([[3, 9, 3, 9, 3, 9], [1, 2, 3, 4, 5, 6]], jnp.int32)
    lengths = jnp.asarray([6, 6], jnp.int32)
    state = drafter.init(target, prompts, lengths, 16)
    history = jnp.zeros((2, 16), jnp.int32).at[:, :6].set(prompts)
    ctx = Context(history=history, length=lengths, cache_lengths=lengths - 1,
                  active=jnp.ones((2,), bool))
    for sampling in (Sampling(), Sampling(temperature=1.0)):
        draft, _ = drafter.propose(state, ctx, sampling, jax.random.PRNGKey(3), 32)
        assert np.isin(np.asarray(draft.tokens[:, 1:]), HEAD_IDS).all()
        if draft.q is not None:   # the draft's law puts nothing outside its head
            outside = np.setdiff1d(np.arange(32), HEAD_IDS)
            assert float(np.abs(np.asarray(draft.q)[:, 1:, outside]).max()) == 0.0


@pytest.mark.parametrize("shape", ["chain_sized", "static_tree", "dynamic_tree"])
def test_greedy_identical_to_autoregressive(shape, tiny, target, related_draft, greedy_ref):
    draft = trimmed(related_draft, HEAD_IDS)
    ids = jnp.asarray(HEAD_IDS)
    drafter = {
        "chain_sized": lambda: js.DraftModel(draft, num_tokens=3, head_ids=ids,
                                             sizing=CostModel(sizes=(1, 2, 4), ms=(1.0, 1.2, 1.5))),
        "static_tree": lambda: js.DraftModel(draft, tree=js.trees.kary(2, 2), head_ids=ids),
        "dynamic_tree": lambda: js.DraftModel(draft, tree=js.trees.dynamic(6, 2, 2), head_ids=ids),
    }[shape]()
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    assert sum(out.stats["accepted"]) > 0


@pytest.mark.parametrize("shape", ["chain", "static_tree"])
def test_sampling_distribution_chi_square(shape):
    """2000 rows' first three tokens against the target's exact law (token 1 from the prefill,
    tokens 2-3 from the first round). The head leaves out tokens 1 and 6, which the target
    draws with about 0.16 of its mass, so rounds where the target wants them run through the
    residual. Seeded, so deterministic; a correct rule passes p > 1e-3 with probability 0.999."""
    target, draft = small_models(SMALL_VOCAB)
    ids = np.array([0, 2, 3, 4, 5, 7], np.int32)
    tree = js.trees.chain(3) if shape == "chain" else \
        js.trees.from_paths([(0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)])
    dm = js.DraftModel(trimmed(draft, ids), tree=tree, head_ids=jnp.asarray(ids), sizing=None)
    prompt = [1, 2, 3]
    tokens = jnp.asarray(np.tile(prompt, (ROWS, 1)), jnp.int32)
    lengths = jnp.full((ROWS,), len(prompt), jnp.int32)
    out, _, _ = _spec(target, dm, tokens, lengths, SAMPLING, jax.random.PRNGKey(5),
                      jnp.zeros((0,), jnp.int32), None, 3)
    got = np.asarray(out.tokens)[:, :3]
    v = SMALL_VOCAB
    observed = np.bincount(got[:, 0] * v * v + got[:, 1] * v + got[:, 2], minlength=v ** 3)
    law = _exact_law(target, prompt, SAMPLING)
    # The left-out tokens do occur after the first token: the residual must supply them.
    assert observed.reshape(v, v, v)[:, [1, 6]].sum() > 100
    pvalue, cells = _chi_square_pvalue(observed, law, ROWS)
    assert cells >= 20
    assert (np.asarray(out.accepted) == 0).any() and (np.asarray(out.accepted) >= 2).any()
    assert pvalue > 1e-3


def _shared_draft(target: Model, ids, seed: int = 3) -> js.DraftModel:
    """A one-layer draft over the target's embedding and head rows (what the recipe trains)."""
    from jaxspec.models import create

    config = target.config.__class__(**{**target.config.__dict__, "num_layers": 1,
                                        "tie_word_embeddings": False})
    own = create(config, seed).params
    ids = jnp.asarray(ids, jnp.int32)
    kernel = target.params["lm_head"]["kernel"] if "lm_head" in target.params \
        else target.params["embed"].T
    params = dict(own, embed=target.params["embed"], lm_head={"kernel": kernel[:, ids]})
    return js.DraftModel(Model(config=config, params=params), num_tokens=3, head_ids=ids)


def test_save_and_load_keep_the_output(tmp_path, tiny, target, greedy_ref):
    from jaxspec.speculative.drafters.eagle import fingerprint

    drafter = _shared_draft(target, HEAD_IDS)
    drafter.save(tmp_path / "d", dtype="float32", target_fingerprint=fingerprint(target),
                 extra={"training": {"steps": 0}})
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["kind"] == "draft_model" and meta["head_tokens"] == len(HEAD_IDS)
    loaded = js.DraftModel.load(tmp_path / "d", target)
    assert loaded.num_tokens == 3
    np.testing.assert_array_equal(np.asarray(loaded.head_ids), HEAD_IDS)
    before = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    after = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=loaded)
    np.testing.assert_array_equal(after.tokens, greedy_ref.tokens)
    assert after.stats["accepted"] == before.stats["accepted"]
    assert js.DraftModel.load(tmp_path / "d", target, num_tokens=2).num_tokens == 2


def test_refusals(tmp_path, tiny, target, related_draft, unrelated_draft):
    from jaxspec.speculative.drafters.eagle import fingerprint

    draft = trimmed(related_draft, HEAD_IDS)
    cases = [
        (jnp.asarray(HEAD_IDS[:-1]), "head_ids names 15 tokens but the draft model's head gives 16"),
        (jnp.asarray(HEAD_IDS.reshape(2, 8)), "head_ids must be a 1-D integer array"),
        (jnp.asarray(HEAD_IDS, jnp.float32), "head_ids must be a 1-D integer array"),
        (jnp.asarray(np.r_[HEAD_IDS[:-1], 32]), r"distinct token ids in \[0, 32\)"),
        (jnp.asarray(np.r_[HEAD_IDS[:-1], 0]), r"distinct token ids in \[0, 32\)"),
    ]
    for ids, match in cases:
        with pytest.raises(ValueError, match=match):
            js.generate(target, [[1, 2, 3]], max_new_tokens=4,
                        drafter=js.DraftModel(draft, head_ids=ids))
    with pytest.raises(ValueError, match="only a draft sharing its target's embedding"):
        js.DraftModel(related_draft).save(tmp_path / "full")
    _shared_draft(target, HEAD_IDS).save(tmp_path / "d", target_fingerprint=fingerprint(target))
    with pytest.raises(ValueError, match="distilled for another target"):
        js.DraftModel.load(tmp_path / "d", unrelated_draft)
    with pytest.raises(ValueError, match="is not a draft model directory"):
        js.DraftModel.load(tmp_path / "nowhere", target)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({"kind": "eagle"}))
    (tmp_path / "e" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="describes a 'eagle' drafter, not a draft model"):
        js.DraftModel.load(tmp_path / "e", target)
    wide = target.config.__class__(**{**target.config.__dict__, "hidden_size": 48,
                                      "num_heads": 6, "num_kv_heads": 3})
    other = Model(config=wide, params={"embed": jnp.zeros((32, 48))})
    with pytest.raises(ValueError, match="distilled for a target of hidden size 32 and vocabulary "
                                         "32, but the target has 48 and 32"):
        js.DraftModel.load(tmp_path / "d", other)
