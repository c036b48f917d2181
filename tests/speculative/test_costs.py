"""Per-round verify sizing (jaxspec/speculative/costs.py and its use in loop.py): invariant 8.

* CostModel: every refusal's message; from_table (JSON string keys); restricted(); at().
* path_probabilities / choose_size on hand-built trees, against numpy written out by hand.
* calibrate: the on-disk cache (read back, `table=`, a damaged file, refresh=True); measure.
* Temperature 0: Eagle (chain of 4, k-ary tree) under sizing None, "auto" (measured through
  js.generate), cost tables forcing plain steps, the full tree, or a prefix of it, on the shared
  ragged prompts: identical to the target's own greedy output; a briefly trained drafter under a
  mixed table (rounds of several sizes) too; the sized program compiles once per prompt bucket.
* Temperature > 0: seeded chi-square of the first three tokens against the target's exact law,
  with a cost table under which rounds would prune the tree (sizes (1, 2, N)). Each row is its
  own generate_tokens call (jax.vmap over keys, batch 1), so each row's size would be chosen from
  that row's draft alone: in one 2000-row batch the choice averages over rows and hides a choice
  that depends on the drawn tokens (which it did: p ~ 1e-14 before the loop sized greedy rounds
  only).
* PromptLookup sizing by past acceptance rates (greedy identity under every table, a pruned
  doubtful match, the sampled law) and skips_empty_rounds: greedy exactness with and without
  repeats, a round without a match writes only the root's K/V (a plain step), and a sampled
  chi-square over rows with and without a match.

Models are the shared tiny ones (conftest.py, vocabulary 32; test_tree_drafters.py, vocabulary
8). JAXSPEC_CACHE points at a per-test temporary directory (autouse fixture below).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jaxspec as js
from jaxspec.decoding import COMPILATIONS
from jaxspec.sampling import Sampling
from jaxspec.speculative import costs
from jaxspec.speculative.costs import CostModel, calibrate, choose_size, path_probabilities
from jaxspec.speculative.drafters.eagle import Eagle
from jaxspec.speculative.loop import generate_tokens
from test_eagle import _greedy_sequences, _head, _sharpened
from test_tree_drafters import CHI_TREE, SMALL_VOCAB, _chi_square_pvalue, _exact_law
from test_tree_drafters import models as small_models

TREE = js.trees.kary(2, 2)      # 7 nodes: 1, 2 under the root; 3, 4 under 1; 5, 6 under 2


@pytest.fixture(autouse=True)
def _isolated_cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "jaxspec-cache"))
    return tmp_path / "jaxspec-cache"


# -- 1. CostModel ------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, ms, match", [
    ((), (), r"a cost table needs one time per size; got sizes \(\) and ms \(\)"),
    ((1, 2), (1.0,), r"a cost table needs one time per size; got sizes \(1, 2\) and ms \(1\.0,\)"),
    ((1, 2.5), (1.0, 2.0), r"cost table sizes must be distinct integers >= 1 in ascending order, "
                           r"got \(1, 2\.5\)"),
    ((1, "2"), (1.0, 2.0), r"distinct integers >= 1 in ascending order, got \(1, '2'\)"),
    ((True, 2), (1.0, 2.0), r"distinct integers >= 1 in ascending order, got \(True, 2\)"),
    ((0, 2), (1.0, 2.0), r"distinct integers >= 1 in ascending order, got \(0, 2\)"),
    ((4, 2), (1.0, 2.0), r"distinct integers >= 1 in ascending order, got \(4, 2\)"),
    ((2, 2), (1.0, 2.0), r"distinct integers >= 1 in ascending order, got \(2, 2\)"),
    ((1, 2), (1.0, 0.0), r"cost table times must be positive numbers \(ms\), got \(1\.0, 0\.0\)"),
    ((1, 2), (-1.0, 2.0), r"times must be positive numbers \(ms\), got \(-1\.0, 2\.0\)"),
    ((1, 2), (1.0, float("nan")), r"times must be positive numbers \(ms\), got \(1\.0, nan\)"),
    ((1, 2), (1.0, "2"), r"times must be positive numbers \(ms\), got \(1\.0, '2'\)"),
])
def test_cost_model_refusals(sizes, ms, match):
    with pytest.raises(ValueError, match=match):
        CostModel(sizes=sizes, ms=ms)


@pytest.mark.parametrize("draft_ms", [-1.0, "2", True, float("nan")])
def test_cost_model_refuses_a_bad_draft_ms(draft_ms):
    with pytest.raises(ValueError, match=r"draft_ms must be a number >= 0 \(ms per drafted node\), "
                                         r"got " + re.escape(repr(draft_ms))):
        CostModel(sizes=(1, 2), ms=(1.0, 2.0), draft_ms=draft_ms)


@pytest.mark.parametrize("table, match", [
    ({"a": 1.0}, r"cost table keys must be integers \(new tokens\), got \['a'\]"),
    ({1: 1.0, 2.5: 2.0}, r"cost table keys must be integers \(new tokens\), got \[1, 2\.5\]"),
    ({"1": 1.0, "2.0": 2.0}, r"keys must be integers \(new tokens\), got \['1', '2\.0'\]"),
    ({True: 1.0, 2: 2.0}, r"keys must be integers \(new tokens\), got \[True, 2\]"),
    ({None: 1.0}, r"keys must be integers \(new tokens\), got \[None\]"),
    ([(1, 1.0), (2, 2.0)], r"a cost table must be a non-empty dict \{new tokens: milliseconds\}, "
                           r"got list"),
    ({}, r"a cost table must be a non-empty dict \{new tokens: milliseconds\}, got dict"),
    ("1:1.0", r"must be a non-empty dict \{new tokens: milliseconds\}, got str"),
    ({"1": 1.0, 1: 2.0}, r"distinct integers >= 1 in ascending order, got \(1, 1\)"),
    ({"1": 1.0, "2": -3.0}, r"times must be positive numbers \(ms\), got \(1\.0, -3\.0\)"),
])
def test_from_table_refusals(table, match):
    with pytest.raises(ValueError, match=match):
        CostModel.from_table(table)


def test_from_table_and_back(target):
    model = CostModel.from_table({"8": 3, "1": 1.0, "2": 1.25, 4: np.float64(2.0)})  # JSON keys
    assert model == CostModel(sizes=(1, 2, 4, 8), ms=(1.0, 1.25, 2.0, 3.0))
    assert all(type(s) is int for s in model.sizes) and all(type(m) is float for m in model.ms)
    assert model.to_table() == {"1": 1.0, "2": 1.25, "4": 2.0, "8": 3.0}
    assert CostModel.from_table(json.loads(json.dumps(model.to_table()))) == model
    assert CostModel.from_table(model) is model
    assert CostModel.from_table({np.int64(3): 2.0}).sizes == (3,)
    assert hash(model) == hash(CostModel.from_table(model.to_table()))  # a static jit field
    # Eagle takes a table or a model; refuses anything else.
    assert Eagle.create(target, num_tokens=2).sizing == "auto"
    assert Eagle.create(target, num_tokens=2).replace(sizing={"1": 1.0, "3": 2.0}).sizing == \
        CostModel(sizes=(1, 3), ms=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"sizing must be 'auto', None, a jaxspec\.speculative\."
                                         r"costs\.CostModel or a \{new tokens: ms\} dict, got 'fast'"):
        Eagle.create(target, num_tokens=2).replace(sizing="fast")


def test_at_interpolates_and_extrapolates():
    model = CostModel(sizes=(1, 2, 4, 8), ms=(1.0, 1.5, 2.5, 6.5))
    for n, want in ((1, 1.0), (2, 1.5), (3, 2.0), (4, 2.5), (5, 3.5), (6, 4.5), (8, 6.5),
                    (12, 10.5), (16, 14.5)):                  # past the end: the last two's slope
        assert model.at(n) == pytest.approx(want), n
    assert CostModel(sizes=(4,), ms=(2.0,)).at(6) == pytest.approx(3.0)   # one size: proportional
    assert CostModel(sizes=(4,), ms=(2.0,)).at(4) == 2.0
    # Below the first size: the first two's slope, never <= 0.
    assert model.at(0) == pytest.approx(0.5)
    assert CostModel(sizes=(2, 4), ms=(1.0, 10.0)).at(1) == pytest.approx(1e-3)


@pytest.mark.parametrize("max_nodes, sizes, ms", [
    (5, (1, 2, 4, 5), (1.0, 1.5, 2.5, 3.5)),
    (8, (1, 2, 4, 8), (1.0, 1.5, 2.5, 6.5)),
    (4, (1, 2, 4), (1.0, 1.5, 2.5)),
    (3, (1, 2, 3), (1.0, 1.5, 2.0)),
    (2, (1, 2), (1.0, 1.5)),
    (1, (1,), (1.0,)),
    (11, (1, 2, 4, 8, 11), (1.0, 1.5, 2.5, 6.5, 9.5)),
])
def test_restricted_ends_at_max_nodes(max_nodes, sizes, ms):
    got = CostModel(sizes=(1, 2, 4, 8), ms=(1.0, 1.5, 2.5, 6.5)).restricted(max_nodes)
    assert got.sizes == sizes and got.sizes[-1] == max_nodes
    np.testing.assert_allclose(got.ms, ms)
    assert CostModel(sizes=(2, 8), ms=(1.0, 4.0)).restricted(5).sizes == (2, 5)


# -- 2. path probabilities and the size choice -----------------------------------------------------

# Row 0: node 1, 2 under the root; 3, 4 under 1; 5 under 3 (depth 3); 6 under 2; 7 under 6
# (depth 3). Row 1: a chain 0-1-2-3 and 4 .. 7 under the root.
PARENTS = np.asarray([[-1, 0, 0, 1, 1, 3, 2, 6], [-1, 0, 1, 2, 0, 0, 0, 0]], np.int32)
VALID = np.asarray([[1, 1, 0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1]], bool)


def test_path_probabilities_by_hand():
    c = np.random.default_rng(0).uniform(0.1, 0.9, (2, 8)).astype(np.float32)
    got = np.asarray(jax.jit(path_probabilities, static_argnums=3)(
        jnp.asarray(c), jnp.asarray(PARENTS), jnp.asarray(VALID), 3))
    a, b = c[0], c[1]
    want = np.asarray([
        # node 2 invalid: it and its subtree (6, 7) are never accepted; node 4 invalid alone
        [1, a[1], 0, a[1] * a[3], 0, a[1] * a[3] * a[5], 0, 0],
        [1, b[1], b[1] * b[2], b[1] * b[2] * b[3], b[4], b[5], 0, b[7]],
    ], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _expected_tokens(c, parents, valid, active):
    """numpy: sum over active rows of the first-S cumulative acceptance probability, [N]."""
    batch, n = c.shape
    prob = np.zeros((batch, n))
    for r in range(batch):
        for i in range(n):
            p, j = 1.0, i
            while j > 0:
                p *= c[r, j] if valid[r, j] else 0.0
                j = parents[r, j]
            prob[r, i] = p
    return (np.cumsum(prob, axis=1) * active[:, None]).sum(0)


def _choose(model, c, parents=PARENTS, valid=VALID, active=(True, True), max_depth=3):
    fn = jax.jit(choose_size, static_argnums=(0, 5))
    return int(fn(model, jnp.asarray(c, jnp.float32), jnp.asarray(parents), jnp.asarray(valid),
                  jnp.asarray(active), max_depth))


def test_choose_size_extremes():
    rising = CostModel(sizes=(1, 2, 4, 8), ms=(1.0, 1.2, 1.6, 2.5))
    flat = CostModel(sizes=(1, 2, 4, 8), ms=(1.0, 1.0, 1.0, 1.0))
    chain = np.broadcast_to(np.arange(-1, 7, dtype=np.int32), (2, 8))
    everything = np.ones((2, 8), bool)
    for parents, valid in ((PARENTS, VALID), (chain, everything)):
        assert _choose(rising, np.full((2, 8), 1e-4), parents, valid) == 0      # size 1: plain
        assert _choose(flat, np.full((2, 8), 0.999), parents, valid) == 3       # the full tree
    # Confident drafts of finished rows or of invalid nodes count for nothing.
    assert _choose(rising, np.full((2, 8), 0.999), chain, everything, active=(False, False)) == 0
    root_only = np.zeros((2, 8), bool)
    root_only[:, 0] = True
    assert _choose(rising, np.full((2, 8), 0.999), chain, root_only) == 0
    # One confident active row among finished ones is enough for the chain.
    assert _choose(rising, np.where([[True], [False]], 0.999, 1e-4), chain, everything,
                   active=(True, False)) == 3


@pytest.mark.parametrize("seed", range(6))
def test_choose_size_maximises_expected_tokens_per_ms(seed):
    """Tokens per ms of the whole round: the verify's ms plus draft_ms per node the round
    drafted (the most any active row drafted), for draft_ms 0 and > 0."""
    rng = np.random.default_rng(seed)
    ms = tuple(np.cumsum(rng.uniform(0.1, 1.0, 5)).tolist())
    c = rng.uniform(0, 1, (2, 8)) ** rng.uniform(0.2, 3.0)
    active = rng.uniform(size=2) < 0.8
    expected = _expected_tokens(c, PARENTS, VALID, active)
    drafted = max([int(VALID[r, 1:].sum()) for r in range(2) if active[r]], default=0)
    for draft_ms in (0.0, float(rng.uniform(0.05, 0.5))):
        model = CostModel(sizes=(1, 2, 3, 5, 8), ms=ms, draft_ms=draft_ms)
        score = (np.asarray([expected[s - 1] for s in model.sizes])
                 / (np.asarray(model.ms) + draft_ms * drafted))
        assert _choose(model, c, active=tuple(active)) == int(np.argmax(score))


def test_drafting_cost_keeps_a_costly_chain_whole():
    """A chain of 4 drafted with confidences 0.6 under a rising curve: counting the verify alone,
    two nodes pay best (1.6 tokens / 1.2 ms); with 2 ms of drafting per node already spent,
    the whole chain does (2.31 / (2.4 + 8) against 2.18 / (2.0 + 8) for four nodes)."""
    chain = np.broadcast_to(np.arange(-1, 4, dtype=np.int32), (2, 5))
    everything = np.ones((2, 5), bool)
    curve = dict(sizes=(1, 2, 4, 5), ms=(1.0, 1.2, 2.0, 2.4))
    conf = np.full((2, 5), 0.6)
    assert _choose(CostModel(**curve), conf, chain, everything) == 1                 # 2 nodes
    assert _choose(CostModel(**curve, draft_ms=2.0), conf, chain, everything) == 3   # all 5
    assert CostModel(**curve, draft_ms=1.0).restricted(4).draft_ms == 1.0


def test_first_acceptance_and_rate_by_hand():
    """sum_x min(p, q) of node 1 (q given), p(token) of node 1 (one-hot drafts); the average
    moves only for active rows whose node 1 was drafted."""
    p = np.asarray([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]], np.float32)
    q1 = np.asarray([[0.2, 0.6, 0.1, 0.1], [0.0, 0.0, 0.0, 1.0]], np.float32)
    q = np.zeros((2, 3, 4), np.float32)
    q[:, 1] = q1
    tokens = np.asarray([[0, 1, 2], [3, 3, 0]], np.int32)
    parents = np.broadcast_to(np.arange(-1, 2, dtype=np.int32), (2, 3))
    valid = np.asarray([[1, 1, 1], [1, 0, 0]], bool)
    from jaxspec.speculative.draft import Draft
    sampled = Draft(tokens=jnp.asarray(tokens), parents=jnp.asarray(parents),
                    valid=jnp.asarray(valid), q=jnp.asarray(q))
    np.testing.assert_allclose(costs.first_acceptance(sampled, jnp.asarray(p)),
                               [0.2 + 0.3 + 0.1, 0.7], rtol=1e-6)
    onehot = sampled.replace(q=None)
    np.testing.assert_allclose(costs.first_acceptance(onehot, jnp.asarray(p)), [0.3, 0.7])
    rate = jnp.asarray([0.5, 0.5])
    got = costs.update_rate(rate, sampled, jnp.asarray(p), jnp.asarray([True, True]))
    d = costs.RATE_DECAY
    np.testing.assert_allclose(got, [d * 0.5 + (1 - d) * 0.6, 0.5], rtol=1e-6)  # row 1: no node 1
    got = costs.update_rate(rate, sampled, jnp.asarray(p), jnp.asarray([False, True]))
    np.testing.assert_allclose(got, [0.5, 0.5])


@pytest.mark.parametrize("seed", range(4))
def test_choose_size_by_rate_maximises_geometric_expectation(seed):
    rng = np.random.default_rng(seed)
    model = CostModel(sizes=(1, 2, 4, 8), ms=tuple(np.cumsum(rng.uniform(0.1, 1.0, 4)).tolist()))
    depths = (0, 1, 2, 3)               # e.g. a binary tree's prefixes
    rate = rng.uniform(0, 1, 3)
    active = np.asarray([True, rng.uniform() < 0.5, True])
    expected = [sum(r ** d for r, a in zip(rate, active) if a for d in range(k + 1)) for k in depths]
    fn = jax.jit(costs.choose_size_by_rate, static_argnums=(0, 2, 4))
    got = int(fn(model, jnp.asarray(rate, jnp.float32), depths, jnp.asarray(active), 0))
    assert got == int(np.argmax(np.asarray(expected) / np.asarray(model.ms)))
    costly = CostModel(sizes=model.sizes, ms=model.ms, draft_ms=0.3)   # 7 nodes drafted each round
    got = int(fn(costly, jnp.asarray(rate, jnp.float32), depths, jnp.asarray(active), 7))
    assert got == int(np.argmax(np.asarray(expected) / (np.asarray(model.ms) + 0.3 * 7)))
    assert costs.prefix_depths(model, js.trees.kary(2, 3)) == (0, 1, 2, 3)  # breadth first
    assert costs.prefix_depths(model, js.trees.chain(7)) == (0, 1, 3, 7)


# -- 3. calibration and its cache --------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch):
    """costs.measure replaced by a fake that counts its calls: (calls list, fake model)."""
    calls = []

    def fake(target, batch=1, sizes=(1, 2, 4, 8, 16, 32, 64), repeats=5, cache_len=256):
        calls.append((batch, tuple(sizes)))
        return CostModel(sizes=tuple(sizes), ms=tuple(1.0 + 0.25 * i for i in range(len(sizes))))

    monkeypatch.setattr(costs, "measure", fake)
    return calls


def _cost_files(cache):
    return sorted((cache / "costs").glob("*.json"))


def test_calibrate_caches_on_disk(tiny, counted, _isolated_cost_cache):
    target = tiny.make_model(0)
    first = calibrate(target, 3, sizes=(1, 2, 4, 5))
    assert counted == [(4, (1, 2, 4, 5))]                 # batch bucketed to a power of two
    files = _cost_files(_isolated_cost_cache)
    assert len(files) == 1 and CostModel.from_table(json.loads(files[0].read_text())["ms"]) == first
    assert calibrate(target, 4, sizes=(1, 2, 4, 5)) == first     # same bucket: read back
    assert calibrate(target, 3, sizes=(1, 2, 4, 5)) == first
    assert len(counted) == 1
    # Another bucket, other sizes, another target config: measured and cached apart.
    calibrate(target, 5, sizes=(1, 2, 4, 5))
    calibrate(target, 3, sizes=(1, 2, 4, 8))
    calibrate(tiny.make_model(0, vocab=48), 3, sizes=(1, 2, 4, 5))
    assert counted[1:] == [(8, (1, 2, 4, 5)), (4, (1, 2, 4, 8)), (4, (1, 2, 4, 5))]
    assert len(_cost_files(_isolated_cost_cache)) == 4
    # A VocabTrim draft (an lm_head narrower than the vocabulary) is cached apart from the same
    # config with its whole head.
    kernel = target.params["lm_head"]["kernel"]
    trimmed = target.replace(params=dict(target.params, lm_head={"kernel": kernel[:, :16]}))
    calibrate(trimmed, 3, sizes=(1, 2, 4, 5))
    assert len(counted) == 5 and len(_cost_files(_isolated_cost_cache)) == 5
    assert calibrate(target, 3, sizes=(1, 2, 4, 5)) == first and len(counted) == 5
    # `table=` wins without measuring or reading the cache.
    table = {"1": 2.0, "3": 2.5}
    assert calibrate(target, 3, sizes=(1, 2, 4, 5), table=table) == CostModel.from_table(table)
    assert len(counted) == 5


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b"{}",
                                    b'{"1": -1.0, "2": 1.0}', b'{"x": 1.0}', b'{"1": "fast"}',
                                    b'{"ms": {"1": -1.0}, "load": 0.1}', b'{"ms": {"1": 2.0}}',
                                    b'{"ms": {"1": 2.0}, "load": "busy"}'])
def test_a_damaged_cache_file_is_measured_again(tiny, counted, _isolated_cost_cache, damage):
    target = tiny.make_model(0)
    first = calibrate(target, 1, sizes=(1, 2))
    (path,) = _cost_files(_isolated_cost_cache)
    path.write_bytes(damage)
    assert calibrate(target, 1, sizes=(1, 2)) == first
    assert len(counted) == 2
    assert CostModel.from_table(json.loads(path.read_text())["ms"]) == first   # rewritten, valid
    assert calibrate(target, 1, sizes=(1, 2)) == first and len(counted) == 2


def test_a_curve_measured_on_a_busy_machine_is_measured_again_when_it_is_quieter(
        tiny, counted, _isolated_cost_cache, monkeypatch):
    """An entry records the load it was measured at; one measured above costs.BUSY is measured
    again once the load is below half of that, and kept otherwise."""
    target = tiny.make_model(0)
    load = {"now": 0.9}
    monkeypatch.setattr(costs, "machine_load", lambda: load["now"])
    calibrate(target, 1, sizes=(1, 2))
    (path,) = _cost_files(_isolated_cost_cache)
    assert json.loads(path.read_text())["load"] == 0.9
    load["now"] = 0.6                                     # still busy: the entry stands
    calibrate(target, 1, sizes=(1, 2))
    assert len(counted) == 1
    load["now"] = 0.3                                     # quieter than half: measured again
    calibrate(target, 1, sizes=(1, 2))
    assert len(counted) == 2 and json.loads(path.read_text())["load"] == 0.3
    load["now"] = 0.0                                     # measured quiet: kept whatever comes
    calibrate(target, 1, sizes=(1, 2))
    assert len(counted) == 2


def test_refresh_measures_again(tiny, counted, monkeypatch, tmp_path):
    target = tiny.make_model(0)
    calibrate(target, 2, sizes=(1, 4))
    calibrate(target, 2, sizes=(1, 4), refresh=True)
    assert counted == [(2, (1, 4)), (2, (1, 4))]
    calibrate(target, 2, sizes=(1, 4))
    assert len(counted) == 2
    # JAXSPEC_CACHE is read at call time: another directory starts empty.
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "elsewhere"))
    calibrate(target, 2, sizes=(1, 4))
    assert len(counted) == 3 and len(_cost_files(tmp_path / "elsewhere")) == 1


def test_measure_a_tiny_target(tiny):
    model = costs.measure(tiny.make_model(0), batch=2, sizes=(1, 4), repeats=2, cache_len=16)
    assert model.sizes == (1, 4)
    assert all(np.isfinite(m) and 0 < m < 60_000 for m in model.ms), model.ms


def test_measure_interleaves_the_sizes(tiny, monkeypatch):
    """A burst of load during the first three timed forwards (a fake clock: those take 10 ms,
    the rest 1 ms) must not land on one size: timed in turn, both sizes' medians are 1 ms
    (timed one size after the other, the 1-token size's median would be 10 ms)."""
    clock = {"now": 0.0, "calls": 0}

    def fake_perf_counter():
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:                        # the end of a timed interval
            clock["now"] += 0.010 if clock["calls"] // 2 <= 3 else 0.001
        return clock["now"]

    monkeypatch.setattr(costs, "_clock", fake_perf_counter)
    model = costs.measure(tiny.make_model(0), sizes=(1, 2), repeats=5, cache_len=16)
    assert clock["calls"] == 2 * 2 * 5
    assert model.ms == pytest.approx((1.0, 1.0))


def test_measured_forward_copies_no_cache(tiny):
    """The timed forward is the loop's (`forward_pending`): its optimized HLO holds no copy of
    a whole K or V cache buffer. A forward that wrote the cache (the measurement before
    MEASURE_VERSION 3, `forward` + a sum over the cache) held such copies, a per-call cost the
    loop's in-place cache never pays, which made every size look alike."""
    import re

    from jaxspec.models.cache import KVCache
    from jaxspec.models.transformer import forward

    model = tiny.make_model(0)
    c = model.config
    cache = KVCache.create(c, 4, 40).replace(lengths=jnp.full((4,), 16, jnp.int32))
    tokens = jnp.ones((4, 2), jnp.int32)
    whole = rf"f32\[{c.num_layers},4,{c.num_kv_heads},40,{c.head_dim}\]\{{[^}}]*\}} copy\("

    def copies(step):
        return len(re.findall(whole, jax.jit(step).lower(model, tokens, cache).compile().as_text()))

    def writing(model, tokens, cache):   # the old measured step
        positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None, :]
        logits, _, cache = forward(model, tokens, cache, positions)
        return logits[:, -1].sum(), cache.k.sum()

    assert copies(costs.measured_step) == 0
    assert copies(writing) >= 1          # the pattern does see a whole-cache copy


def test_measure_one_size_at_a_time_against_a_fixed_capacity(tiny):
    """capacity= keeps one buffer size for every T (the device suite measures T by T)."""
    model = costs.measure(tiny.make_model(0), sizes=(2,), repeats=1, cache_len=16, capacity=24)
    assert model.sizes == (2,) and model.ms[0] > 0
    with pytest.raises(ValueError, match="cannot hold 16 committed tokens and 4 new"):
        costs.measure(tiny.make_model(0), sizes=(4,), repeats=1, cache_len=16, capacity=19)


# -- 4. temperature 0: identical output, whatever the size chosen ------------------------------

def _sized_table(n, ms):
    """A CostModel at the sizes js.generate's "auto" measures for n nodes (1, 2, 4, .., n)."""
    sizes, s = [], 1
    while s < n:
        sizes.append(s)
        s *= 2
    return CostModel(sizes=tuple(sizes) + (n,), ms=tuple(ms(i, len(sizes) + 1)
                                                        for i in range(len(sizes) + 1)))


PLAIN = lambda i, k: 1.0 if i == 0 else 100.0        # size 1 always wins: every round plain
FULL = lambda i, k: 100.0 if i < k - 1 else 1.0      # the whole tree always wins
KINDS = {"chain": dict(num_tokens=4), "tree": dict(tree=TREE),
         "dynamic": dict(tree=js.trees.dynamic(6, 3, 2))}


def _eagle(target, kind, sizing, key=1):
    # Every level drafted (stop_below=None), so the counts below are the sizing's alone.
    drafter = Eagle.create(target, key=key, **KINDS[kind]).replace(stop_below=None)
    n = drafter.tree.num_nodes
    if isinstance(sizing, int):     # verify exactly the first `sizing` nodes every round
        base = _sized_table(n, PLAIN)
        return drafter.replace(sizing=CostModel(sizes=base.sizes, ms=tuple(
            1.0 if size == sizing else 100.0 for size in base.sizes)))
    table = {"plain": _sized_table(n, PLAIN), "full": _sized_table(n, FULL)}.get(sizing, sizing)
    return drafter.replace(sizing=table)


_UNSIZED = {}


def _unsized(target, prompts, kind):
    """The sizing=None run (whole tree every round) of the random drafter, computed once."""
    if kind not in _UNSIZED:
        _UNSIZED[kind] = js.generate(target, prompts, max_new_tokens=16,
                                     drafter=_eagle(target, kind, None))
    return _UNSIZED[kind]


@pytest.mark.parametrize("kind, sizing", [(kind, sizing) for kind in ("chain", "tree", "dynamic")
                                          for sizing in (None, "auto", "plain", "full")]
                         + [("chain", 4), ("tree", 2)])      # always that prefix of the nodes
def test_greedy_identical_under_every_sizing(kind, sizing, tiny, target, greedy_ref,
                                             _isolated_cost_cache, monkeypatch):
    measured = []
    real_measure = costs.measure
    monkeypatch.setattr(costs, "measure", lambda *a, **k: measured.append(a[1]) or real_measure(*a, **k))
    drafter = _eagle(target, kind, sizing)
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    drafted, steps = np.asarray(out.stats["drafted"]), np.asarray(out.stats["target_steps"])
    unsized = _unsized(target, tiny.prompts, kind)
    if sizing == "plain":        # every round a plain decode step: nothing drafted is verified
        assert drafted.sum() == 0 and out.stats["accepted"] == [0, 0, 0]
        assert out.stats["mean_accepted"] == 0.0
        np.testing.assert_array_equal(steps, tiny.max_new)             # one step per token
    if isinstance(sizing, int):   # the first `sizing` nodes (root included) every round
        np.testing.assert_array_equal(drafted, (sizing - 1) * (steps - 1))
        assert (np.asarray(out.stats["accepted"]) <= drafted).all()
        depth = int(drafter.tree.depths[:sizing].max())
        assert depth < drafter.tree.max_depth       # the verdict's path is padded to full depth
    if sizing in (None, "full"):   # the whole tree every round: what sizing=None does
        for key in ("drafted", "accepted", "target_steps"):
            assert out.stats[key] == unsized.stats[key], key
        assert drafted.sum() == (drafter.tree.num_nodes - 1) * (steps - 1).sum()
    if sizing == "auto":         # measured once (batch 3 -> bucket 4) and cached under JAXSPEC_CACHE
        assert measured == [4] and len(_cost_files(_isolated_cost_cache)) == 1
        compiled = COMPILATIONS["speculative"]
        again = js.generate(target, [[2, 7, 7], [30], list(range(14, 0, -1))],
                            max_new_tokens=tiny.max_new, drafter=_eagle(target, kind, "auto"))
        assert measured == [4]                            # read back from the cache
        assert COMPILATIONS["speculative"] == compiled    # same bucket, same table: no compile
        ref = js.generate(target, [[2, 7, 7], [30], list(range(14, 0, -1))],
                          max_new_tokens=tiny.max_new)
        np.testing.assert_array_equal(again.tokens, ref.tokens)
    else:
        assert measured == []


@pytest.mark.parametrize("kind", ["chain", "tree", "dynamic"])
def test_stop_below_cuts_levels_and_stays_exact(kind, tiny, target, greedy_ref):
    """Eagle's stop_below: a random drafter's doubtful levels are not drafted (fewer nodes than
    with stop_below=None), the output is still the target's greedy output."""
    full = _eagle(target, kind, None)
    cut = full.replace(stop_below=0.9)
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=cut)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    everything = _unsized(target, tiny.prompts, kind)
    assert 0 < sum(out.stats["drafted"]) < sum(everything.stats["drafted"])
    with pytest.raises(ValueError, match=r"stop_below must be in \[0, 1\) or None, got 1.5"):
        full.replace(stop_below=1.5)


def _train(target, tiny, steps=80):
    """A chain-4 Eagle trained briefly (AdamW) on the target's greedy outputs (as in
    test_eagle.py's `trained`, fewer steps): its drafts get accepted."""
    import optax

    from jaxspec.train import eagle as eagle_train

    rng = np.random.default_rng(0)
    extra = [rng.integers(1, tiny.vocab, int(n)).tolist() for n in rng.integers(2, 15, 9)]
    seqs = _greedy_sequences(target, list(tiny.prompts) + extra, tiny.max_new)
    items = eagle_train.compute_features(target, seqs, max_len=64, batch_size=8, log=lambda s: None)
    drafter = Eagle.create(target, num_tokens=4, key=2)
    head_ids = drafter.params["head_ids"]
    loss = eagle_train.make_loss(drafter.config, target.params["embed"], head_ids,
                                 head=_head(target, head_ids))
    data = eagle_train.FeatureBatches(items, length=32, batch_size=8)
    opt = optax.adamw(3e-3, weight_decay=0.0)
    params = {k: v for k, v in drafter.params.items() if k != "head_ids"}

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(lambda p: loss(dict(p, head_ids=head_ids), batch)[0])(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state, position = opt.init(params), 0
    for _ in range(steps):
        batch, position = data.batch(position)
        params, opt_state = step(params, opt_state, jax.tree_util.tree_map(jnp.asarray, batch))
    return drafter.replace(params=dict(params, head_ids=head_ids))


# Rising costs: a round verifies 1, 2, 4 or all 5 nodes depending on the draft's confidence.
MIXED = CostModel(sizes=(1, 2, 4, 5), ms=(1.0, 1.3, 1.8, 2.1))


def test_trained_drafter_sized_rounds_are_exact_and_compile_once(tiny, target, greedy_ref):
    trained = _train(target, tiny)
    before = COMPILATIONS["speculative"]
    full = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new,
                       drafter=trained.replace(sizing=None))
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new,
                      drafter=trained.replace(sizing=MIXED))
    np.testing.assert_array_equal(full.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    rounds = (np.asarray(out.stats["target_steps"]) - 1).sum()
    drafted, accepted = sum(out.stats["drafted"]), sum(out.stats["accepted"])
    print(f"trained, sized: mean accepted {out.stats['mean_accepted']:.2f}, drafted {drafted} "
          f"of {4 * rounds} (unsized: mean accepted {full.stats['mean_accepted']:.2f})")
    assert full.stats["mean_accepted"] > 0.5
    assert accepted > 0 and 0 < drafted < 4 * rounds   # drafts accepted; some rounds pruned
    compiled = COMPILATIONS["speculative"]
    assert compiled - before <= 2
    # Another prompt of the same bucket (and a random drafter: only weights differ): no compile.
    others = [[2, 7, 7], [30], list(range(14, 0, -1))]
    ref = js.generate(target, others, max_new_tokens=tiny.max_new)
    for drafter in (trained, Eagle.create(target, num_tokens=4, key=5)):
        again = js.generate(target, others, max_new_tokens=tiny.max_new,
                            drafter=drafter.replace(sizing=MIXED))
        np.testing.assert_array_equal(again.tokens, ref.tokens)
    assert COMPILATIONS["speculative"] == compiled


def test_calibration_by_hand():
    """The record: exponential averages of node 1's hit (draft token == the target's argmax at
    the root) and of its confidence, on active rows that drafted node 1; the scale their ratio."""
    from jaxspec.speculative.draft import Draft
    record = costs.initial_calibration(3)
    np.testing.assert_allclose(costs.calibrated_confidence(jnp.full((3, 2), 0.6), record), 0.6)
    draft = Draft(tokens=jnp.asarray([[0, 4], [0, 1], [0, 2]]), parents=jnp.asarray([[-1, 0]] * 3),
                  valid=jnp.asarray([[True, True], [True, True], [True, False]]),
                  confidence=jnp.asarray([[1.0, 0.9], [1.0, 0.8], [1.0, 0.7]]))
    root = jax.nn.one_hot(jnp.asarray([4, 3, 2]), 6)             # row 0 hit, row 1 missed
    active = jnp.asarray([True, True, True])
    hits, claimed = costs.update_calibration(record, draft, root, active)
    d = costs.RATE_DECAY
    np.testing.assert_allclose(hits, [d * 0.5 + (1 - d), d * 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(claimed, [d * 0.5 + (1 - d) * 0.9, d * 0.5 + (1 - d) * 0.8, 0.5],
                               rtol=1e-6)                        # row 2: node 1 not drafted
    frozen = costs.update_calibration(record, draft, root, jnp.asarray([False, False, False]))
    np.testing.assert_allclose(frozen, record)
    scaled = costs.calibrated_confidence(jnp.full((3, 2), 0.9), (hits, claimed))
    np.testing.assert_allclose(scaled[:, 1], np.clip(0.9 * np.asarray(hits) / np.asarray(claimed),
                                                     0, 1), rtol=1e-6)
    assert float(costs.calibrated_confidence(jnp.full((3, 2), 0.99), (hits, claimed))[0, 1]) == 1.0


@struct.dataclass
class _Overconfident(Eagle):
    """A random Eagle that claims every node is sure to be accepted (it almost never is)."""

    def propose(self, *args, **kwargs):
        draft, state = super().propose(*args, **kwargs)
        return draft.replace(confidence=jnp.ones_like(draft.confidence)), state


def test_an_overconfident_drafter_is_pruned_by_its_record(tiny, target, greedy_ref):
    """Taken at its word, a drafter claiming confidence 1 everywhere verifies all 5 nodes every
    round under MIXED; its record of misses (node 1 against the target's argmax) scales its
    confidences down, so later rounds are plain steps. Greedy output identical either way."""
    base = Eagle.create(target, num_tokens=4, key=1).replace(stop_below=None, sizing=MIXED)
    liar = _Overconfident(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=liar)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    rounds = (np.asarray(out.stats["target_steps"]) - 1).sum()
    drafted = sum(out.stats["drafted"])
    acceptance = sum(out.stats["accepted"]) / max(drafted, 1)
    print(f"overconfident random drafter: drafted {drafted} of {4 * rounds}, "
          f"accepted per drafted {acceptance:.2f}")
    assert acceptance < 0.3                              # it is a liar on this target
    assert drafted < 4 * rounds / 2                      # not all 5 nodes every round
    raw = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new,
                      drafter=liar.replace(calibrated=False))
    np.testing.assert_array_equal(raw.tokens, greedy_ref.tokens)
    assert sum(raw.stats["drafted"]) == 4 * rounds       # taken at its word: every node verified


def test_calibrated_refusal(target):
    with pytest.raises(ValueError, match="calibrated must be True or False, got 'yes'"):
        Eagle.create(target, num_tokens=2).replace(calibrated="yes")
    medusa = js.Medusa.create(target, num_heads=2)
    with pytest.raises(ValueError, match="calibrated must be True or False, got 1"):
        medusa.replace(calibrated=1)
    assert medusa.with_tree(num_tokens=1).replace(calibrated=False).with_tree(num_tokens=2).calibrated is False


# -- 5. temperature > 0: the output law is the target's --------------------------------------------

ROWS = 2000
SAMPLING = Sampling(temperature=0.9, top_k=5)
PROMPT = [1, 2, 3]


@jax.jit
def _per_row(target, drafter, keys):
    """ROWS independent batch-1 runs of 3 tokens (one per key): first tokens, drafted, accepted."""
    tokens = jnp.asarray([PROMPT], jnp.int32)
    lengths = jnp.asarray([len(PROMPT)], jnp.int32)

    def one(key):
        out, _ = generate_tokens(target, drafter, tokens, lengths, 3, SAMPLING, key)
        return out.tokens[0, :3], out.lengths[0], out.drafted[0], out.accepted[0]

    return jax.vmap(one)(keys)


def _law_test(target, drafter, seed=7):
    got, lengths, drafted, accepted = jax.device_get(
        _per_row(target, drafter, jax.random.split(jax.random.PRNGKey(seed), ROWS)))
    assert (lengths == 3).all()
    v = SMALL_VOCAB
    observed = np.bincount(got[:, 0] * v * v + got[:, 1] * v + got[:, 2], minlength=v ** 3)
    pvalue, cells = _chi_square_pvalue(observed, _exact_law(target, PROMPT, SAMPLING), ROWS)
    return pvalue, cells, drafted, accepted


def test_sampled_law_with_a_pruning_cost_table():
    """CHI_TREE (11 nodes, a sharpened Eagle) under sizes (1, 2, 11), priced so that a
    confidence-driven choice verifies 1, 2 or 11 nodes depending on the draft. Measured before
    the loop sized greedy rounds only: p = 7e-14 here (and 4e-18 for a chain of 3 under sizes
    (1, 2, 4) at ms (1, 1.3, 100)); the unsized rule p = 0.84 on that chain. Seeded,
    deterministic; a correct rule passes p > 1e-3 with probability 0.999."""
    target, _ = small_models(SMALL_VOCAB)
    drafter = _sharpened(Eagle.create(target, tree=CHI_TREE, key=4), seed=4)
    drafter = drafter.replace(sizing=CostModel(sizes=(1, 2, 11), ms=(1.0, 1.3, 3.0)))
    pvalue, cells, drafted, accepted = _law_test(target, drafter)
    print(f"tree: p={pvalue:.3g} over {cells} cells, drafted {drafted.mean():.2f}, "
          f"accepted {accepted.mean():.2f} per row")
    assert cells >= 20
    assert (accepted == 0).any() and (accepted >= 1).any()
    assert pvalue > 1e-3


def test_sampled_law_with_rate_sized_chains():
    """Sampled rounds sized by earlier rounds' acceptance rates: a chain of 3 under sizes
    (1, 2, 4) at ms (1, 1.45, 1.75), where a rate above ~0.47 verifies the whole chain and one
    below it takes a plain step. Round 1 (rate prior 0.5) verifies the chain; a row that accepts
    nothing there needs a second round, plain or whole depending on how acceptable its first
    draft was. Both happen (drafted 3 with nothing accepted: plain; drafted 6: whole), and the
    first three tokens keep the target's exact law (seeded chi-square, one run per row)."""
    target, _ = small_models(SMALL_VOCAB)
    drafter = _sharpened(Eagle.create(target, num_tokens=3, key=5), seed=5)
    drafter = drafter.replace(sizing=CostModel(sizes=(1, 2, 4), ms=(1.0, 1.45, 1.75)),
                              stop_below=None)
    pvalue, cells, drafted, accepted = _law_test(target, drafter, seed=11)
    print(f"chain: p={pvalue:.3g} over {cells} cells, drafted {drafted.mean():.2f}, "
          f"accepted {accepted.mean():.2f} per row")
    assert cells >= 20
    assert ((drafted == 3) & (accepted == 0)).any() and (drafted == 6).any()
    assert pvalue > 1e-3


# -- 6. PromptLookup: a round without a match is a plain step ----------------------------------

def test_prompt_lookup_greedy_identical_with_and_without_repeats(tiny, target, greedy_ref):
    pl = js.PromptLookup(ngram=3, num_tokens=8, sizing=None)  # counts: not the machine's curve
    assert pl.skips_empty_rounds
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=pl)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, greedy_ref.lengths)
    assert sum(out.stats["accepted"]) > 0 or sum(out.stats["drafted"]) > 0
    distinct = [[31], [4, 8, 15, 16, 23], [1, 30, 2, 29, 3, 28, 4, 27, 5, 26, 6]]  # no repeats
    repeats = [[6, 6, 6, 6], [1, 2, 1, 2, 1, 2, 1, 2], [9, 10, 11, 9, 10, 11, 9, 10, 11, 9]]
    for prompts in (distinct, repeats):
        ref = js.generate(target, prompts, max_new_tokens=tiny.max_new)
        got = js.generate(target, prompts, max_new_tokens=tiny.max_new, drafter=pl)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_array_equal(got.lengths, ref.lengths)


class _NoSkip(js.PromptLookup):
    skips_empty_rounds = False


def test_prompt_lookup_round_without_match_writes_only_the_root(target):
    """One round after a prompt of 8 distinct tokens (no padding: prefill writes slots 0 .. 7)
    whose first generated token is new: nothing matches, so the round scores the root alone
    (slot 8; the slots past it stay empty); without skips_empty_rounds the same round writes the
    K/V of all 9 nodes."""
    @functools.partial(jax.jit, static_argnums=0)
    def program(drafter, tokens, lengths):
        return generate_tokens(target, drafter, tokens, lengths, 2, Sampling(),
                               jax.random.PRNGKey(0), return_cache=True)

    def run(drafter, prompt):
        out, _, cache = program(drafter, jnp.asarray([prompt], jnp.int32),
                                jnp.asarray([len(prompt)], jnp.int32))
        return np.asarray(out.tokens[0]), np.asarray(cache.k[:, 0]), int(cache.lengths[0])  # [L, Hkv, S, Dh]

    pl = js.PromptLookup(ngram=3, num_tokens=8)
    for prompt in ([4, 8, 15, 16, 23, 1, 30, 2], [11, 12, 13, 14, 17, 19, 21, 3],
                   [29, 27, 25, 5, 6, 7, 9, 10]):
        tokens, k, length = run(pl, prompt)
        if tokens[0] not in prompt:
            break
    else:
        pytest.fail("every candidate prompt's first token repeats a prompt token")
    assert length == len(prompt) + 1 == 9
    assert np.abs(k[:, :, :length]).sum(-1).sum(1).all()   # the prompt and the root written
    assert not k[:, :, length:].any()                       # a plain step: nothing else
    tokens_full, k_full, _ = run(_NoSkip(ngram=3, num_tokens=8), prompt)
    np.testing.assert_array_equal(tokens_full, tokens)
    assert np.abs(k_full[:, :, length:length + 8]).sum(-1).sum(1).all()


def test_prompt_lookup_sampled_law():
    """Rows whose first token repeats a prompt token draft a continuation; the others take a
    plain step: both kinds among 2000 independent rows, and the law is the target's."""
    target, _ = small_models(SMALL_VOCAB)
    pvalue, cells, drafted, accepted = _law_test(target, js.PromptLookup(ngram=2, num_tokens=3))
    print(f"prompt lookup: p={pvalue:.3g} over {cells} cells, rows without drafts "
          f"{(drafted == 0).mean():.2f}, accepted {accepted.mean():.2f}")
    assert cells >= 20 and (drafted == 0).any() and (drafted > 0).any() and (accepted > 0).any()
    assert pvalue > 1e-3


# -- prompt lookup: sized by its past acceptance rate (greedy and sampled) --------------------

PL_PROMPTS = [[5], [3, 9, 3, 9, 3, 9], [4, 8, 4, 8, 4, 8, 4, 8, 11, 4, 8]]   # two rows match


def _lookup(sizing, num_tokens=4):
    drafter = js.PromptLookup(ngram=2, num_tokens=num_tokens)
    if sizing in ("plain", "full"):
        sizing = _sized_table(num_tokens + 1, {"plain": PLAIN, "full": FULL}[sizing])
    return drafter.replace(sizing=sizing)


def test_prompt_lookup_sizing_refusal():
    with pytest.raises(ValueError, match=r"sizing must be 'auto', None, a "
                                         r"jaxspec.speculative.costs.CostModel or a \{new tokens: "
                                         r"ms\} dict, got 'fast'"):
        js.PromptLookup(sizing="fast")


def test_prompt_lookup_rate_sizing_prunes_a_doubtful_match(target):
    """With a cost curve where only a rate above about 0.6 pays for 5 nodes, a row whose matches
    are accepted about half the time is sized down: fewer drafted tokens verified than unsized
    (8 against 16 on this seeded target), more target steps, the same output."""
    table = {1: 1.0, 2: 1.3, 4: 2.0, 5: 2.4}
    prompts = [list(range(1, 12)) * 2]     # a long repeated run: PL keeps proposing it
    ref = js.generate(target, prompts, max_new_tokens=16)
    sized = js.generate(target, prompts, max_new_tokens=16, drafter=_lookup(table))
    unsized = js.generate(target, prompts, max_new_tokens=16, drafter=_lookup(None))
    np.testing.assert_array_equal(sized.tokens, ref.tokens)
    np.testing.assert_array_equal(unsized.tokens, ref.tokens)
    assert 0.3 < unsized.stats["acceptance_rate"] < 0.8
    assert 0 < sum(sized.stats["drafted"]) < sum(unsized.stats["drafted"])
    assert sum(sized.stats["target_steps"]) > sum(unsized.stats["target_steps"])


def test_prompt_lookup_rate_sized_sampled_law():
    """Prompt lookup sized by its rows' past acceptance rates under sampling (sizes (1, 2, 4) at
    ms (1, 1.45, 1.75)): rows with and without drafts, and the first three tokens keep the
    target's exact law (seeded chi-square, one run per row)."""
    target, _ = small_models(SMALL_VOCAB)
    drafter = js.PromptLookup(ngram=2, num_tokens=3,
                              sizing=CostModel(sizes=(1, 2, 4), ms=(1.0, 1.45, 1.75)))
    pvalue, cells, drafted, accepted = _law_test(target, drafter, seed=13)
    print(f"prompt lookup, rate-sized: p={pvalue:.3g} over {cells} cells, drafted "
          f"{drafted.mean():.2f}, accepted {accepted.mean():.2f}")
    assert cells >= 20 and (drafted == 0).any() and (drafted > 0).any() and (accepted > 0).any()
    assert pvalue > 1e-3


# -- 7. TokenRecycling: sized by its past acceptance rate -------------------------------------

TR_TREE = js.trees.kary(3, 2)       # 13 nodes, breadth first: sizes 1, 2, 4, 8, 13


def _recycling(sizing):
    drafter = js.TokenRecycling(k=3, tree=TR_TREE)
    if sizing in ("plain", "full"):
        sizing = _sized_table(TR_TREE.num_nodes, {"plain": PLAIN, "full": FULL}[sizing])
    return drafter.replace(sizing=sizing)


def test_token_recycling_learns_only_from_verified_nodes(target):
    """Every round sized to a plain step (root only): the matrix must then be exactly the
    prefill's update plus one update per root, i.e. update_matrix over the whole sequence but its
    last token with the target's logits there. A commit that also read the unverified nodes'
    (zero-padded) logits would set their tokens' rows to top-k of zeros."""
    from jaxspec.models.transformer import forward_train
    from jaxspec.speculative.drafters.token_recycling import update_matrix

    drafter = _recycling("plain")
    prompt = [3, 9, 3, 9, 5, 17, 2]
    tokens = jnp.asarray([prompt], jnp.int32)
    lengths = jnp.asarray([len(prompt)], jnp.int32)
    out, state = jax.jit(lambda d, t, l: generate_tokens(target, d, t, l, 12, Sampling(),
                                                         jax.random.PRNGKey(0)))(drafter, tokens, lengths)
    assert int(out.drafted[0]) == 0 and int(out.lengths[0]) == 12
    seq = jnp.asarray([prompt + np.asarray(out.tokens[0]).tolist()], jnp.int32)   # [1, 19]
    logits, _ = forward_train(target.params, target.config, seq[:, :-1])
    want = update_matrix(jnp.zeros((target.config.vocab_size, 3), jnp.int32), seq[:, :-1], logits,
                         jnp.ones(seq[:, :-1].shape, bool))
    np.testing.assert_array_equal(np.asarray(state.matrix), np.asarray(want))


def test_token_recycling_rate_sized_sampled_law():
    """Token Recycling sized by past acceptance rates under sampling (sizes (1, 2, 4, 13) at ms
    (1, 1.45, 1.75, 3)): the first three tokens keep the target's exact law (seeded chi-square,
    one run per row), with both accepted drafts and rejections."""
    target, _ = small_models(SMALL_VOCAB)
    drafter = js.TokenRecycling(k=3, tree=TR_TREE,
                                sizing=CostModel(sizes=(1, 2, 4, 13), ms=(1.0, 1.45, 1.75, 3.0)))
    pvalue, cells, drafted, accepted = _law_test(target, drafter, seed=17)
    print(f"token recycling, rate-sized: p={pvalue:.3g} over {cells} cells, drafted "
          f"{drafted.mean():.2f}, accepted {accepted.mean():.2f}")
    assert cells >= 20 and (accepted == 0).any() and (accepted > 0).any()
    assert len(set(drafted.tolist())) > 1          # rounds of different sizes
    assert pvalue > 1e-3


def test_token_recycling_sizing_refusal():
    with pytest.raises(ValueError, match=r"sizing must be 'auto', None, a "
                                         r"jaxspec.speculative.costs.CostModel or a \{new tokens: "
                                         r"ms\} dict, got 'fast'"):
        js.TokenRecycling(sizing="fast")


# -- prompt lookup and Token Recycling: greedy output under every sizing ----------------------

RATE_SIZED = {   # drafter factory, prompts, a cost table cheap enough for small prefixes
    "prompt_lookup": (_lookup, PL_PROMPTS, {1: 1.0, 2: 1.05, 4: 1.4, 5: 1.6}),
    "token_recycling": (_recycling, PL_PROMPTS + [list(range(1, 12)) * 2],
                        {1: 1.0, 2: 1.05, 4: 1.4, 8: 1.6, 13: 2.5}),
}


@pytest.mark.parametrize("kind, sizing", [(kind, sizing) for kind in RATE_SIZED
                                          for sizing in (None, "auto", "plain", "full", "table")])
def test_rate_sized_greedy_identical_under_every_sizing(kind, sizing, target, _isolated_cost_cache):
    make, prompts, table = RATE_SIZED[kind]
    ref = js.generate(target, prompts, max_new_tokens=16)
    out = js.generate(target, prompts, max_new_tokens=16,
                      drafter=make(table if sizing == "table" else sizing))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    unsized = js.generate(target, prompts, max_new_tokens=16, drafter=make(None))
    drafted = np.asarray(out.stats["drafted"])
    assert sum(unsized.stats["drafted"]) > 0 and sum(unsized.stats["accepted"]) > 0
    if sizing == "plain":        # size 1 always wins: every round a plain step
        assert drafted.sum() == 0
        np.testing.assert_array_equal(out.stats["target_steps"], 16)
    if sizing in (None, "full"):  # the whole draft every round
        for key in ("drafted", "accepted", "target_steps"):
            assert out.stats[key] == unsized.stats[key], key
    if sizing == "table" and kind == "token_recycling":  # small prefixes: less than the template
        assert 0 < drafted.sum() < sum(unsized.stats["drafted"])


# -- DraftModel chains: sized by the draft's own probabilities -------------------------------

DM_TABLE = {1: 1.0, 2: 1.3, 4: 2.5, 5: 3.0}   # steep: confident drafts verify 2 or 4, others 1


def _draft_model(draft, adaptive, sizing):
    if adaptive:
        return js.DraftModel(draft, num_tokens="auto", max_tokens=4, sizing=sizing)
    return js.DraftModel(draft, num_tokens=4, sizing=sizing)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("sizing", [None, "auto", "plain", "full", "table"])
def test_draft_model_greedy_identical_under_every_sizing(adaptive, sizing, tiny,
                                                         _isolated_cost_cache):
    """A draft model (a noisy copy of the target: often right) under every sizing: the target's
    greedy output; the whole chain when sizing is None or the full chain always wins; no draft
    verified when size 1 always wins; a steep table prunes some rounds and not others."""
    target, draft = small_models()
    ref = js.generate(target, tiny.prompts, max_new_tokens=16)
    table = {"plain": _sized_table(5, PLAIN), "full": _sized_table(5, FULL),
             "table": DM_TABLE}.get(sizing, sizing)
    out = js.generate(target, tiny.prompts, max_new_tokens=16,
                      drafter=_draft_model(draft, adaptive, table))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    unsized = js.generate(target, tiny.prompts, max_new_tokens=16,
                          drafter=_draft_model(draft, adaptive, None))
    drafted = np.asarray(out.stats["drafted"])
    assert sum(unsized.stats["accepted"]) > 0
    if sizing == "plain":
        assert drafted.sum() == 0
        np.testing.assert_array_equal(out.stats["target_steps"], 16)
    if sizing in (None, "full"):
        for key in ("drafted", "accepted", "target_steps"):
            assert out.stats[key] == unsized.stats[key], key
    if sizing == "auto":   # target curve and draft step measured once each, cached
        assert len(_cost_files(_isolated_cost_cache)) == 2
        compiled = COMPILATIONS["speculative"]
        others = [[2, 7, 7], [30], list(range(14, 0, -1))]
        again = js.generate(target, others, max_new_tokens=16,
                            drafter=_draft_model(draft, adaptive, "auto"))
        np.testing.assert_array_equal(again.tokens, js.generate(target, others, 16).tokens)
        assert COMPILATIONS["speculative"] == compiled
    if sizing == "table" and not adaptive:
        rounds = (np.asarray(out.stats["target_steps"]) - 1).sum()
        print(f"draft model, steep table: drafted {drafted.sum()} of {4 * rounds}, accepted "
              f"{sum(out.stats['accepted'])}")
        assert sum(out.stats["accepted"]) > 0 and 0 < drafted.sum() < 4 * rounds


def test_draft_model_confidence_is_its_probability_of_each_token(tiny):
    """Node i's confidence is the draft's softmax probability of token i after tokens < i (the
    root's is 1); nodes an adaptive chain did not draft are invalid."""
    from jaxspec.models.cache import KVCache
    from jaxspec.models.transformer import forward
    from jaxspec.speculative.draft import Context

    target, draft = small_models()
    drafter = js.DraftModel(draft, num_tokens=3, sizing=None)
    prompt = jnp.asarray([[3, 9, 3, 9, 4]], jnp.int32)
    state = drafter.init(target, prompt, jnp.asarray([4], jnp.int32), 16)   # 4 committed
    history = jnp.zeros((1, 16), jnp.int32).at[:, :5].set(prompt)           # root = token 4
    ctx = Context(history=history, length=jnp.asarray([5]), cache_lengths=jnp.asarray([4]),
                  active=jnp.asarray([True]))
    proposal, _ = drafter.propose(state, ctx, Sampling(), jax.random.PRNGKey(0), target.config.vocab_size)
    tokens = np.asarray(proposal.tokens[0])
    seq = jnp.asarray([[3, 9, 3, 9, *tokens]], jnp.int32)                     # [1, 8]
    logits, _, _ = forward(draft, seq, KVCache.create(draft.config, 1, 16),
                           jnp.arange(8, dtype=jnp.int32)[None])
    probs = jax.nn.softmax(logits[0], axis=-1)                               # [8, V]
    want = [1.0] + [float(probs[4 + i, tokens[i + 1]]) for i in range(3)]
    np.testing.assert_allclose(np.asarray(proposal.confidence[0]), want, rtol=1e-5, atol=1e-6)
    assert (tokens[1:] == np.asarray(jnp.argmax(probs[4:7], axis=-1))).all()  # greedy drafts


def test_draft_model_rate_sized_sampled_law():
    """Sampled rounds of a draft-model chain sized by earlier rounds' acceptance rates: plain and
    whole rounds both happen, and the first three tokens keep the target's exact law."""
    target, draft = small_models(SMALL_VOCAB)
    drafter = js.DraftModel(draft, num_tokens=3,
                            sizing=CostModel(sizes=(1, 2, 4), ms=(1.0, 1.45, 1.75)))
    pvalue, cells, drafted, accepted = _law_test(target, drafter, seed=13)
    print(f"draft model: p={pvalue:.3g} over {cells} cells, drafted {drafted.mean():.2f}, "
          f"accepted {accepted.mean():.2f} per row")
    assert cells >= 20
    assert (drafted == 0).any() or ((drafted == 3) & (accepted == 0)).any()
    assert (drafted >= 3).any()
    assert pvalue > 1e-3


def test_draft_model_sizing_refusals():
    _, draft = small_models()
    with pytest.raises(ValueError, match=r"DraftModel sizes chains only: a tree=\.\.\. draft model "
                                         r"verifies its whole tree; pass sizing=None or 'auto'"):
        js.DraftModel(draft, tree=js.trees.kary(2, 2), sizing={1: 1.0, 7: 2.0})
    with pytest.raises(ValueError, match=r"sizing must be 'auto', None, a jaxspec"):
        js.DraftModel(draft, num_tokens=3, sizing="fast")
    assert js.DraftModel(draft, tree=js.trees.kary(2, 2)).sizing is None   # "auto": whole tree
    assert js.DraftModel(draft, num_tokens=3).sizing == "auto"
