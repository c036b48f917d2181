"""Sharding: the same outputs on one device and on 8 CPU devices, the specified placements,
clear refusals of meshes that do not divide the model, sharded HF and orbax loading.

The 8-device work runs in two subprocesses (tests/sharding_worker.py) side by side: the number
of CPU devices must be set before jax starts, and each worker compiles a share of the programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from jaxspec import sharding

WORKER = Path(__file__).with_name("sharding_worker.py")
ROOT = Path(__file__).resolve().parent.parent
MESHES = ("8x1", "2x4", "1x8")
# Method -> meshes it runs on (see sharding_worker.methods), all at temperature 0.
GREEDY = {"autoregressive": MESHES, "tree": ("8x1", "1x8"), "draft_model": ("8x1", "2x4"),
          "prompt_lookup": ("2x4", "1x8")}
TREE_DRAFTERS = ("token_recycling", "draft_tree")   # js.TokenRecycling, DraftModel(tree=...) on 2x4
SAMPLED = {"draft_model_sampled": ("2x4",)}
TIMEOUT_S = 600


def worker_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # Programs are compared within and across these workers, which all use the same flags;
    # skipping LLVM's expensive passes roughly halves compile time on CPU.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    jobs = {"a": ["single", "8x1", "errors", "loading"], "b": ["2x4", "1x8", "placement"]}
    procs = {k: subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"{k}.json"), *sections],
                                 env=worker_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
             for k, sections in jobs.items()}
    merged: dict = {}
    for k, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"sharding worker {jobs[k]} timed out after {TIMEOUT_S}s")
        path = tmp / f"{k}.json"
        if proc.returncode != 0 or not path.exists():
            pytest.fail(f"sharding worker {jobs[k]} failed (rc={proc.returncode}):\n{output[-4000:]}")
        part = json.loads(path.read_text())
        assert part["devices"] == 8
        for name, runs in part.pop("generate", {}).items():
            merged.setdefault("generate", {}).setdefault(name, {}).update(runs)
        merged.setdefault("failures", {}).update(part.pop("failures", {}))
        merged.update(part)
    return merged


def _section(results, name):
    if name in results["failures"]:
        pytest.fail(f"worker section {name!r} raised:\n{results['failures'][name]}")
    return results[name]


def _mismatches(runs, name, meshes):
    single = runs[name]["single"]["tokens"]
    return {m: runs[name][m]["tokens"] for m in meshes if runs[name][m]["tokens"] != single}


def test_greedy_outputs_identical_on_every_mesh(results):
    runs = _section(results, "generate")
    for name, meshes in GREEDY.items():
        assert set(meshes) <= set(runs[name]), f"{name} did not run on {meshes}"
        assert not _mismatches(runs, name, meshes), f"{name} differs from one device"
    for name in TREE_DRAFTERS:
        assert "2x4" in runs.get(name, {}), f"{name} did not run"
        assert not _mismatches(runs, name, ("2x4",)), f"{name} differs from one device"


def test_sampled_outputs_identical_for_the_same_seed(results):
    runs = _section(results, "generate")
    for name, meshes in SAMPLED.items():
        assert set(meshes) <= set(runs[name])
        assert not _mismatches(runs, name, meshes), f"{name} differs from one device"
    # The sampled run is really sampled (differs from greedy decoding somewhere).
    assert runs["draft_model_sampled"]["single"]["tokens"] != runs["draft_model"]["single"]["tokens"]


def test_drafters_accept_tokens_so_the_comparison_covers_verification(results):
    runs = _section(results, "generate")
    for name in ("draft_model", "prompt_lookup", "tree", "draft_model_sampled", *TREE_DRAFTERS):
        assert runs[name]["single"]["accepted"] > 0, name


def test_parameters_carry_the_partition_rules(results):
    placement = _section(results, "placement")
    for mesh in MESHES:
        wrong = [p for p, ok in placement[mesh]["params"].items() if not ok]
        assert not wrong, f"{mesh}: {wrong}"
        assert placement[mesh]["draft_replicated"]
    shapes = placement["1x8"]["shard_shapes"]
    assert shapes["embed"] == [8, 64]                    # vocab-parallel [V/8, D]
    assert shapes["lm_head/kernel"] == [64, 8]
    assert shapes["layers/q/kernel"] == [2, 64, 8]       # column-parallel [L, D, H*Dh/8]
    assert shapes["layers/k/kernel"] == [2, 64, 4]
    assert shapes["layers/up/kernel"] == [2, 64, 16]
    assert shapes["layers/o/kernel"] == [2, 8, 64]       # row-parallel [L, H*Dh/8, D]
    assert shapes["layers/down/kernel"] == [2, 16, 64]
    assert shapes["layers/attn_norm/scale"] == [2, 64]   # replicated
    assert placement["8x1"]["shard_shapes"]["embed"] == [64, 64]


def test_kv_caches_carry_the_specified_shardings(results):
    placement = _section(results, "placement")
    for mesh in MESHES:
        p = placement[mesh]
        assert p["cache_k"] and p["cache_v"] and p["cache_lengths"], (mesh, p["cache_spec"])
        assert p["draft_cache_k"], mesh                  # drafter caches: batch only
    # [L, B, Hkv, S, Dh] with B = 8 and Hkv = 8
    assert placement["2x4"]["cache_shard_shape"] == [2, 4, 2, 32, 4]
    assert placement["1x8"]["cache_shard_shape"] == [2, 8, 1, 32, 4]
    assert placement["8x1"]["cache_shard_shape"] == [2, 1, 8, 32, 4]


def test_bad_meshes_are_refused_with_the_dimension_and_axis(results):
    errors = _section(results, "errors")
    assert "num_kv_heads=4" in errors["kv_heads"] and "'model' has size 8" in errors["kv_heads"]
    assert "num_heads=12" in errors["heads"] and "'model'" in errors["heads"]
    assert "vocab_size=62" in errors["vocab"] and "'model' has size 4" in errors["vocab"]
    assert "batch of 6 rows" in errors["batch"] and "'data' has size 8" in errors["batch"]
    assert "needs 16 devices" in errors["too_many_devices"]
    assert "'data'" in errors["bad_axis_size"]
    assert errors["replicated_ok"] is None               # a replicated model needs no division


def test_sharded_hf_load_equals_unsharded_and_reads_each_slice_once(results):
    loading = _section(results, "loading")
    for key in ("hf_llama_2x4", "hf_llama_1x8", "hf_gpt2_2x4", "hf_gpt2_1x8"):
        r = loading[key]
        assert r["equal"] and r["placed"], key
        # One process: every distinct block is read once, never the whole model per device.
        assert r["elements_read"] == r["elements_total"], key
    assert loading["hf_llama_1x8"]["largest_read"] < loading["hf_llama_2x4"]["largest_read"]


def test_sharded_orbax_restore_equals_unsharded(results):
    loading = _section(results, "loading")
    for key in ("orbax_1x8", "orbax_8x1", "orbax_2x4_replicated", "orbax_no_mesh"):
        assert loading[key] == {"equal": True, "placed": True, "config_equal": True}, key


# -- in-process, one device -------------------------------------------------------------------

def test_rule_table_covers_every_parameter_of_every_family():
    from jaxspec.models.config import ModelConfig
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, intermediate_size=64, max_position_embeddings=64)
    configs = [ModelConfig(family="llama", **base),
               ModelConfig(family="qwen3", qk_norm=True, qkv_bias=True, o_bias=True, **base),
               ModelConfig(family="gpt2", tie_word_embeddings=True, qkv_bias=True, o_bias=True,
                           mlp_bias=True, **{**base, "num_kv_heads": 4})]
    for config in configs:
        specs = sharding.param_specs(config)   # raises if a parameter has no rule
        assert specs["embed"] == P("model", None)
    assert sharding.partition_spec("layers/o/bias") == P()
    assert sharding.partition_spec("layers/q/bias") == P(None, "model")
    assert sharding.partition_spec("layers/q_norm/scale") == P()
    with pytest.raises(ValueError, match="no partition rule matches parameter 'layers/new/kernel'"):
        sharding.partition_spec("layers/new/kernel")


def test_mesh_axes_are_auto_and_named():
    import jax
    mesh = sharding.make_mesh(data=1, model=1)
    assert mesh.axis_names == ("data", "model")
    if hasattr(jax.sharding, "AxisType"):
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
