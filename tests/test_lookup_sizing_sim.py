"""benchmarks/lookup_sizing_sim.py: the replay's arithmetic on hand-made traces, and its copy of
the shipped rate rule agreeing with `costs.choose_size_by_rate` (the replay re-implements the
rule in Python; this keeps the two from drifting apart)."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lookup_sizing_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("lookup_sizing_sim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COSTS = [1.0, 1.2, 1.4, 1.8, 2.0]   # ms at the verify sizes 1, 2, 4, 8, 9


def test_replay_prices_rounds_and_counts_committed_tokens(sim):
    # 10 output tokens; the prefill gives the first. After it, an 8-token match all accepted.
    row = dict(output=list(range(10)))
    table = [(8, 8, 3, 0)] + [(0, 0, 0, -1)] * 8
    spec, ar = sim.replay(sim.FixedPolicy(), [row], [table], COSTS)
    assert (spec, ar) == (2.0, 9.0)          # one 9-node round commits 9 tokens; 9 plain steps
    # No match anywhere: every round is a plain step, as autoregressive.
    spec, ar = sim.replay(sim.RatePolicy(), [row], [[(0, 0, 0, -1)] * 9], COSTS)
    assert spec == ar == 9.0
    # A match whose first token is wrong: the oracle verifies the root alone (size 1), the
    # whole match pays for 9 nodes and still commits one token.
    table = [(8, 0, 1, 0)] * 9
    counts = {}
    assert sim.replay(sim.OraclePolicy(), [row], [table], COSTS, counts) == (9.0, 9.0)
    assert counts == {"rounds": 9, "accepted": 0}
    assert sim.replay(sim.FixedPolicy(), [row], [table], COSTS) == (18.0, 9.0)


def test_replayed_rate_rule_matches_the_shipped_one(sim):
    from jaxspec.speculative import costs
    from jaxspec.speculative.trees import chain

    model = costs.CostModel(sizes=sim.SIZES, ms=tuple(COSTS))
    depths = costs.prefix_depths(model, chain(8))
    for rates in ([0.05], [0.5], [0.8], [0.95], [0.3, 0.9], [0.6, 0.1]):
        policy = sim.RatePolicy()
        recs = [dict(rate=r, full=False) for r in rates]
        entries = [(8, 0, 3, 0)] * len(rates)
        mine = sim.choose(policy, recs, [8] * len(rates), COSTS, entries=entries)
        shipped = int(costs.choose_size_by_rate(model, jnp.asarray(rates, jnp.float32), depths,
                                                jnp.ones((len(rates),), bool), drafted=8))
        assert mine == shipped, rates
    # A row without a match counts 1 at every size (the loop sets its rate to 0).
    recs = [dict(rate=0.9, full=False), dict(rate=0.9, full=False)]
    mine = sim.choose(sim.RatePolicy(), recs, [8, 0], COSTS, entries=[(8, 0, 3, 0), (0, 0, 0, -1)])
    shipped = int(costs.choose_size_by_rate(model, jnp.asarray([0.9, 0.0]), depths,
                                            jnp.ones((2,), bool), drafted=8))
    assert mine == shipped
