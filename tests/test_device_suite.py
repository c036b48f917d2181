"""benchmarks/device_suite.py: the smoke run (every step, CPU, toy sizes, in a subprocess that
cannot import `gguf`, as on the GPU image), its time boxes and error capture, and the figures
its projection is built from."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_suite.py"
# Imported lazily by jaxspec where used, and missing from the GPU machine's image.
NOT_ON_THE_GPU_IMAGE = ("gguf", "outlines_core")


def _load_suite():
    spec = importlib.util.spec_from_file_location("device_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_suite"] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


def test_smoke_run_records_every_step(tmp_path):
    out = tmp_path / "out"
    # gguf and outlines-core blocked (the GPU image has neither): `import jaxspec` and everything
    # the suite runs must work without them. Time boxes 30x the smoke defaults, so that even a
    # badly loaded CI machine runs every sub-measurement (the boxes are tested below).
    argv = [str(SCRIPT), "--smoke", "--out", str(out), "--budget-scale", "30"]
    code = ("import runpy, sys; "
            + "".join(f"sys.modules[{name!r}] = None; " for name in NOT_ON_THE_GPU_IMAGE)
            + f"sys.argv = {argv!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               JAXSPEC_CACHE=str(tmp_path / "cache"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3000)
    elapsed = time.monotonic() - start
    report = out / "device_suite.json"
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    steps = data["steps"]
    problems = {k: (s["status"], s["error"], s["row_errors"]) for k, s in steps.items()
                if s["status"] not in ("ok", "partial")}
    assert proc.returncode == 0 and not problems, (problems, proc.stdout[-3000:],
                                                   proc.stderr[-3000:])
    assert list(steps) == list(suite.STEPS)
    for key, step in steps.items():
        assert any(step["tables"].values()), f"step {key} recorded no results"
    assert data["meta"]["smoke"] is True and data["meta"]["device"] == "cpu"
    env_table = {r["what"]: r["value"] for r in steps["environment"]["tables"]["environment"]}
    assert env_table["backend"] == "cpu" and env_table["gguf_installed"] is False

    kernel = steps["tree_attention"]["tables"]
    assert len(kernel["cuda_lowering"]) == 10 and all(r["lowered_for_cuda"]
                                                      for r in kernel["cuda_lowering"])
    assert kernel["correctness"] and all(r["ok"] for r in kernel["correctness"])
    assert kernel["timing"] and all("pallas_ms" in r and r["ok"] for r in kernel["timing"])

    costs = steps["cost_curves"]["tables"]
    impls = {r["impl"] for r in costs["curves"]}
    assert impls == {"xla", "pallas_interpret"}
    assert all(r["ms"] > 0 for r in costs["_points"])
    assert costs["projection"] and costs["_projection"]
    assert any("PROJECTION" in n for n in steps["cost_curves"]["notes"])

    e2e = steps["end_to_end"]["tables"]
    assert [r["batch"] for r in e2e["jaxspec_vs_transformers"]] == [1, 8]
    for r in e2e["jaxspec_vs_transformers"]:
        assert r["speedup_vs_transformers"] > 0 and "rows_identical" in r
    assert e2e["logits"][0]["max_abs_err"] < 0.1 * e2e["logits"][0]["logit_scale"]
    methods = [r["method"] for r in e2e["tiny_pair"]]
    assert methods == list(suite.SMOKE_TINY_PAIR_METHODS)
    assert all(r["identical"] and r["speedup"] > 0 for r in e2e["tiny_pair"])

    md = (out / "device_suite.md").read_text()
    for key in suite.STEPS:
        assert suite.TITLES[key] in md
    assert "PROJECTION, NOT A MEASUREMENT" in md
    print(f"smoke run: {elapsed:.0f} s")  # the issue asks for < 1 minute on an idle machine


def _run(tmp_path, fn, budget, monkeypatch, finalize=None):
    monkeypatch.setattr(suite, "HARD_GRACE_S", 0.2)
    report = suite.Report(tmp_path, dict(device="test", smoke=True))
    args = suite.parse_args(["--smoke"])
    status = suite.run_step(report, "environment", fn, budget, args, {}, finalize)
    return status, json.loads((tmp_path / "device_suite.json").read_text())["steps"]["environment"]


def test_a_step_past_its_budget_is_cut_and_keeps_its_rows(tmp_path, monkeypatch):
    finalized = []

    def slow(step):
        step.add("rows", dict(i=0))
        time.sleep(30)

    start = time.monotonic()
    status, step = _run(tmp_path, slow, 0.3, monkeypatch, finalize=finalized.append)
    assert time.monotonic() - start < 5
    assert status == "timeout" and step["status"] == "timeout"
    assert step["tables"]["rows"] == [dict(i=0)] and "StepTimeout" in step["error"]
    assert len(finalized) == 1   # the projection is built from whatever was measured


def test_a_failing_step_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    def broken(step):
        step.add("rows", dict(i=0))
        raise RuntimeError("kernel exploded")

    status, step = _run(tmp_path, broken, 10, monkeypatch)
    assert status == "failed" and "RuntimeError: kernel exploded" in step["error"]
    assert step["tables"]["rows"] == [dict(i=0)]
    assert "kernel exploded" in (tmp_path / "device_suite.md").read_text()


def test_a_failing_sub_measurement_is_a_row_and_the_step_goes_on(tmp_path, monkeypatch):
    def mixed(step):
        step.attempt("rows", dict(i=0), lambda: 1 / 0)
        step.attempt("rows", dict(i=1), lambda: dict(ms=1.0))

    status, step = _run(tmp_path, mixed, 10, monkeypatch)
    assert status == "errors"
    first, second = step["tables"]["rows"]
    assert first["error"].startswith("ZeroDivisionError") and second["ms"] == 1.0
    assert "ZeroDivisionError" in step["row_errors"][0]


def test_skipping_for_time_marks_the_step_partial(tmp_path, monkeypatch):
    def short(step):
        step.add("rows", dict(i=0))
        step.skip("the rest")

    status, step = _run(tmp_path, short, 10, monkeypatch)
    assert status == "partial" and any("skipped the rest" in n for n in step["notes"])


def test_steps_selection():
    assert suite.parse_args(["--steps", "2,4"]).steps == ["tree_attention", "end_to_end"]
    assert suite.parse_args(["--steps", "cost_curves"]).steps == ["cost_curves"]
    with pytest.raises(SystemExit):
        suite.parse_args(["--steps", "5"])


def test_default_budgets_fit_in_eight_minutes():
    assert sum(suite.BUDGETS_S.values()) + len(suite.STEPS) * suite.HARD_GRACE_S < 8 * 60 - 20


def test_bundled_cpu_figures_match_the_committed_benchmarks(tmp_path):
    committed = {(f["run"], f["method"]): f for f in suite.cpu_figures(ROOT)}
    bundled = {(f["run"], f["method"]): f for f in suite.cpu_figures(tmp_path)}  # no files there
    assert set(bundled) <= set(committed)
    assert {method for _, method in bundled} <= set(suite.VERIFY_NODES)
    stale = "benchmarks/bench_smollm2_cpu_*.json changed: update BUNDLED_CPU_FIGURES"
    for key, fig in bundled.items():
        assert "bundled copy" in fig["source"]
        ours = committed[key]
        assert ours["source"].startswith("benchmarks/")
        assert fig["mean_accepted"] == pytest.approx(ours["mean_accepted"], abs=1e-3), stale
        assert fig["cpu_speedup"] == pytest.approx(ours["cpu_speedup"], abs=1e-3), stale
        assert fig["cpu_curve"] == pytest.approx(ours["cpu_curve"], abs=0.01), stale


def test_verify_nodes_match_the_benchmarked_drafters(monkeypatch):
    import jaxspec as js
    from jaxspec.bench import chat_bench
    from jaxspec.speculative import default
    from jaxspec.speculative.drafters.medusa import Medusa

    config = js.ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=1,
                            num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                            max_position_embeddings=1024)
    target = js.models.create(config, 0)
    eagle = js.Eagle.create(target, key=1, num_tokens=3)
    medusa_dir = next(d for d, meta in default.shipped_drafters() if meta["kind"] == "medusa")
    medusa = Medusa.load(medusa_dir)  # the shipped heads: their tree is the benchmarked one
    # The Eagle and Medusa rows too, as chat_bench builds them for SmolLM2.
    monkeypatch.setattr(default, "shipped_drafter",
                        lambda t, kind: {"eagle": eagle, "medusa": medusa}.get(kind))
    table = chat_bench.method_table(target)
    nodes = {name: d.tree.num_nodes for name, d in table.items() if d is not None}
    assert {name: nodes.get(name) for name in suite.VERIFY_NODES} == suite.VERIFY_NODES


def test_model_shapes_have_their_real_parameter_counts():
    from jaxspec.models.config import ModelConfig

    counts = {name: ModelConfig(**fields).num_params() for name, fields in suite.SHAPES.items()}
    # SmolLM2-135M-Instruct as benchmarked (benchmarks/bench_smollm2_cpu_chat.json); Llama 3.2 1B
    # and Llama 3.1 8B as their model cards count them.
    assert counts == {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400,
                      "llama-3.1-8b": 8_030_261_248}
    for name, fields in suite.SMOKE_SHAPES.items():
        real, toy = ModelConfig(**suite.SHAPES[name]), ModelConfig(**fields)
        assert toy.num_heads // toy.num_kv_heads == real.num_heads // real.num_kv_heads
        assert toy.tie_word_embeddings == real.tie_word_embeddings
        assert (toy.rope_scaling is None) == (real.rope_scaling is None)


def test_projection_formula():
    figures = [dict(run="r", method="eagle_k3", mean_accepted=1.0, cpu_speedup=1.0,
                    cpu_curve={1: 10.0, 4: 15.0}, source="test")]
    flat = {"m/xla": {1: 2.0, 2: 2.0, 4: 2.0}}
    (row,) = suite.projection_rows(flat, figures)
    assert row["projected_drafting_free"] == pytest.approx(2.0)     # (1 + a) c(1) / c(4)
    # CPU: 2 tokens per round at speedup 1 means a round cost 2 steps, 1.5 of them the verify.
    assert row["cpu_overhead_steps"] == pytest.approx(0.5)
    assert row["projected_with_cpu_overhead"] == pytest.approx(2.0 / 1.5, abs=1e-3)
    assert row["extrapolated"] is False
    assert suite.projection_rows({"m/xla": {1: 2.0, 2: 3.0}}, figures)[0]["extrapolated"]
    pivot = suite.projection_pivot([row])
    assert pivot == [dict(cpu_run="r", method="eagle_k3", nodes=4, cpu_accepted=1.0,
                          cpu_speedup=1.0, cpu_overhead_steps=0.5,
                          **{"m/xla (hypothetical)": "2.00x / 1.33x"})]


def test_first_mismatches():
    assert suite.first_mismatches([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]) == [
        dict(row=1, index=1, jaxspec=5, transformers=6)]
    assert suite.first_mismatches([[1, 2]], [[1, 2, 3]]) == [
        dict(row=0, index=2, jaxspec=None, transformers=3)]
