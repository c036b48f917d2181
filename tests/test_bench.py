"""`jaxspec bench` end to end on the shipped pair, tiny settings: files written, ratios sane."""

import argparse
import json

import pytest

from jaxspec.bench import harness


def test_bench_writes_json_markdown_and_png(tmp_path):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--prompts", "1", "--max-new-tokens", "8", "--repeats", "1",
                              "--methods", "autoregressive,prompt_lookup", "--no-hf",
                              "--out", str(tmp_path), "--name", "smoke"])
    assert harness.main(args) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    methods = {r["method"]: r for r in data["results"]}
    assert set(methods) == {"autoregressive", "prompt_lookup"}
    assert methods["autoregressive"]["speedup"] == pytest.approx(1.0)
    assert methods["prompt_lookup"]["tokens"] > 0 and methods["prompt_lookup"]["tree_nodes"] == 8
    assert 0.0 <= methods["prompt_lookup"]["acceptance_rate"] <= 1.0
    assert "| prompt_lookup |" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_bench_refuses_unknown_method(tmp_path):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--methods", "warp_drive", "--no-hf", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown methods \\['warp_drive'\\]"):
        harness.main(args)
