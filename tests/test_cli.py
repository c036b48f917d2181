"""The README's first command, `jaxspec generate`, on the shipped pair (short)."""

from jaxspec import cli


def test_generate_prints_completion_and_speedup(capsys):
    assert cli.main(["generate", "def parse_args(argv):", "--max-new-tokens", "8",
                     "--num-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "def parse_args(argv):" in out
    assert "speedup" in out and "identical to" in out


def test_generate_reports_bad_input_without_traceback(capsys):
    assert cli.main(["generate", "x", "--temperature", "-1", "--drafter", "none"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
