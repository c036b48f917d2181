"""The speculative loop end to end: exactness, stopping, lengths, batches, compilation, stats.

Invariant 1 (lossless) is checked two ways here: at temperature 0 the output is token for token
the target's own greedy output; at temperature 0.8 with top-k and top-p, a seeded chi-square
test compares the law of the first three generated tokens with the exact autoregressive law,
enumerated from the target's processed probabilities.

Runtime is dominated by compilation, so the greedy tests share programs: batch 3, prompt bucket
16, max_new_tokens bucket 16, and drafters whose models share one config (a draft's params are
pytree leaves, so DraftModel(target, 4) and DraftModel(unrelated_draft, 4) are one program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import jaxspec as js
from jaxspec.generate import COMPILATIONS
from jaxspec.models import forward_train
from jaxspec.sampling import probabilities
from jaxspec.speculative import generate_tokens

K = 4  # draft length of the fixed-length DraftModel runs: rounds emit up to K + 1 tokens

DRAFTERS = {
    "draft=target": lambda t, u: js.DraftModel(t, num_tokens=K),
    "unrelated": lambda t, u: js.DraftModel(u, num_tokens=K),
    "auto,draft=target": lambda t, u: js.DraftModel(t, num_tokens="auto"),
    "auto,unrelated": lambda t, u: js.DraftModel(u, num_tokens="auto"),
    "prompt_lookup": lambda t, u: js.PromptLookup(ngram=2, num_tokens=K),
}


def _drafter(name, target, unrelated_draft):
    return DRAFTERS[name](target, unrelated_draft)


def _max_draft(drafter) -> int:
    return drafter.tree.max_depth


def _check_stats(out, drafter):
    """Per-row stats agree with each other and with the lengths (no stop tokens in play)."""
    k = _max_draft(drafter)
    s = out.stats
    accepted = np.asarray(s["accepted"])
    drafted = np.asarray(s["drafted"])
    steps = np.asarray(s["target_steps"])
    by_position = np.asarray(s["accepted_by_position"])
    rounds = steps - 1                                  # the prefill is one target step
    assert by_position.shape == (len(out.lengths), k)
    np.testing.assert_array_equal(by_position.sum(axis=1), accepted)
    assert np.all(np.diff(by_position, axis=1) <= 0), "position j+1 accepted more often than j"
    assert np.all(by_position[:, 0] <= rounds)
    assert np.all((0 <= accepted) & (accepted <= drafted) & (drafted <= k * rounds))
    # Each round emits its accepted tokens + 1 (only the last round can be cut by the limit).
    assert np.all(out.lengths <= 1 + accepted + rounds)
    assert np.all(out.lengths >= 1 + accepted + rounds - k)
    assert s["mean_accepted"] == pytest.approx(accepted.sum() / rounds.sum())
    assert s["acceptance_rate"] == pytest.approx(accepted.sum() / max(drafted.sum(), 1))


# -- temperature 0: token-for-token the target's greedy output ---------------------------------

@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_output_is_the_targets(name, tiny, target, unrelated_draft, greedy_ref):
    drafter = _drafter(name, target, unrelated_draft)
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    np.testing.assert_array_equal(out.lengths, [tiny.max_new] * len(tiny.prompts))
    _check_stats(out, drafter)
    s = out.stats
    if name == "draft=target":
        # Everything accepted: every round emits K + 1 tokens, 15 tokens after the first = 3 rounds.
        assert s["acceptance_rate"] == 1.0 and s["mean_accepted"] == K
        rounds = -(-(tiny.max_new - 1) // (K + 1))
        assert s["target_steps"] == [1 + rounds] * 3
        assert s["drafted"] == s["accepted"] == [K * rounds] * 3
        assert s["accepted_by_position"] == [[rounds] * K] * 3
    elif name == "auto,draft=target":
        assert s["acceptance_rate"] == 1.0 and s["mean_accepted"] > 1.0
    elif name.startswith("auto") or name == "unrelated":
        assert s["acceptance_rate"] < 0.1, "an unrelated random draft should almost never agree"
        if name == "unrelated":
            assert s["target_steps"] == [tiny.max_new] * 3       # one token per target step
    else:  # prompt lookup: the outputs settle into cycles, so the lookup does find matches
        assert s["mean_accepted"] > 0.5


def test_greedy_inside_users_own_jit(tiny, target, unrelated_draft, greedy_ref):
    """generate_tokens is pure: a user can jit it, with the models as ordinary arguments."""

    @jax.jit
    def run(target, draft, prompt_tokens, prompt_lengths, key):
        out, _ = generate_tokens(target, js.DraftModel(draft, num_tokens=K), prompt_tokens,
                                 prompt_lengths, tiny.max_new, js.Sampling(temperature=0.0), key)
        return out

    tokens = np.zeros((len(tiny.prompts), 16), np.int32)
    for i, p in enumerate(tiny.prompts):
        tokens[i, :len(p)] = p
    lengths = np.asarray([len(p) for p in tiny.prompts], np.int32)
    for draft, rate in ((target, 1.0), (unrelated_draft, 0.0)):
        out = run(target, draft, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out.tokens), greedy_ref.tokens)
        np.testing.assert_array_equal(np.asarray(out.lengths), [tiny.max_new] * 3)
        accepted, drafted = np.asarray(out.accepted), np.asarray(out.drafted)
        assert accepted.sum() == pytest.approx(rate * drafted.sum(), abs=0.1 * drafted.sum())


def test_stop_token_inside_an_accepted_run(tiny, target, unrelated_draft, greedy_ref):
    """A stop token that the target emits mid-run ends the row right there.

    Every token of the greedy reference is tried as the stop token. With draft = target each
    round accepts all K drafts, so output index j (j >= 1) is draft position (j - 1) % (K + 1)
    + 1 of its round: unless j % (K + 1) == 0 the stop token sits inside an accepted run, and the
    tokens accepted after it in the same round must be dropped.
    """
    ref = greedy_ref.tokens
    inside = 0
    for stop in sorted(set(ref.ravel().tolist())):
        first = [int(np.flatnonzero(row == stop)[0]) if stop in row else None for row in ref]
        expect_len = np.asarray([tiny.max_new if j is None else j + 1 for j in first])
        inside += sum(j is not None and j % (K + 1) != 0 for j in first)
        for draft in (target, unrelated_draft):
            out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new, stop_tokens=[stop],
                              drafter=js.DraftModel(draft, num_tokens=K))
            np.testing.assert_array_equal(out.lengths, expect_len)
            for r, n in enumerate(expect_len):
                np.testing.assert_array_equal(out.tokens[r, :n], ref[r, :n])
                assert np.all(out.tokens[r, n:] == 0), "pad (id 0) after the stop token"
            if draft is target:
                # The row stopped: no target step after the round that emitted the stop token.
                rounds = -(-(expect_len - 1) // (K + 1))
                np.testing.assert_array_equal(out.stats["target_steps"], 1 + rounds)
    assert inside >= 2, "the reference should contain stop tokens inside accepted runs"


def test_rows_do_not_depend_on_the_batch(tiny, target, unrelated_draft, greedy_ref):
    """Same row, other companions (and another row index): the same output."""
    others = [[2, 4], [7] * 13]
    for name in ("auto,draft=target", "prompt_lookup"):  # per-row draft lengths / acceptance
        drafter = _drafter(name, target, unrelated_draft)
        for batch, where in (([others[0], tiny.prompts[2], tiny.prompts[0]], {1: 2, 2: 0}),
                             ([tiny.prompts[1], others[1], others[0]], {0: 1})):
            out = js.generate(target, batch, max_new_tokens=tiny.max_new, drafter=drafter)
            for row, ref_row in where.items():
                np.testing.assert_array_equal(out.tokens[row], greedy_ref.tokens[ref_row])


@pytest.mark.parametrize("max_new_tokens", [1, 3, 7, 13])
def test_lengths_are_exactly_max_new_tokens(max_new_tokens, tiny, target, unrelated_draft, greedy_ref):
    """Not a multiple of the round length: the last round is cut to the limit."""
    for name in ("draft=target", "prompt_lookup"):
        drafter = _drafter(name, target, unrelated_draft)
        out = js.generate(target, tiny.prompts, max_new_tokens=max_new_tokens, drafter=drafter)
        assert out.tokens.shape == (3, max_new_tokens)
        np.testing.assert_array_equal(out.lengths, [max_new_tokens] * 3)
        np.testing.assert_array_equal(out.tokens, greedy_ref.tokens[:, :max_new_tokens])
        if name == "draft=target":
            rounds = -(-(max_new_tokens - 1) // (K + 1))
            assert out.stats["target_steps"] == [1 + rounds] * 3


def test_one_compilation_per_prompt_bucket(tiny, target, greedy_ref):
    """Prompts of 6 and 13 tokens share the bucket of 16: the second call compiles nothing.

    Batch 1 is used by no other test, so the first call here always compiles exactly once.
    """
    drafter = js.DraftModel(target, num_tokens=K)
    before = COMPILATIONS["speculative"]
    first = js.generate(target, [tiny.prompts[1]], max_new_tokens=tiny.max_new, drafter=drafter)
    assert COMPILATIONS["speculative"] == before + 1
    second = js.generate(target, [tiny.prompts[2]], max_new_tokens=tiny.max_new - 3, drafter=drafter)
    assert COMPILATIONS["speculative"] == before + 1
    np.testing.assert_array_equal(first.tokens[0], greedy_ref.tokens[1])
    np.testing.assert_array_equal(second.tokens[0], greedy_ref.tokens[2, :tiny.max_new - 3])


# -- temperature > 0: the law of the output is the target's ------------------------------------

SAMPLING = js.Sampling(temperature=0.8, top_k=8, top_p=0.9)
ROWS = 4000
P_VALUE_CUT = 1e-3


def _exact_law(model, prompt, sampling):
    """P(first three generated tokens = (a, b, c)) [V, V, V], enumerated autoregressively."""
    vocab = model.config.vocab_size
    a = np.arange(vocab)
    seqs = np.concatenate([np.tile(prompt, (vocab * vocab, 1)), np.repeat(a, vocab)[:, None],
                           np.tile(a, vocab)[:, None]], axis=1)           # [V*V, Tp + 2]
    logits, _ = jax.jit(forward_train, static_argnums=1)(model.params, model.config,
                                                         jnp.asarray(seqs))
    p = np.asarray(probabilities(logits, sampling), np.float64)           # [V*V, Tp + 2, V]
    t = len(prompt)
    p1 = p[0, t - 1]                                                       # [V]
    p2 = p[::vocab, t]                                                     # [V(a), V]
    p3 = p[:, t + 1].reshape(vocab, vocab, vocab)                          # [a, b, V]
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square(counts, law, rows):
    """Pearson chi-square of counts [V,V,V] against law [V,V,V]; cells with expected < 5 merged.

    Returns (statistic, degrees of freedom, p-value). The merged cell also holds every
    zero-probability cell, so an impossible sequence shows up as excess there.
    """
    expected, observed = law.ravel() * rows, counts.ravel()
    big = expected >= 5
    groups_e = np.append(expected[big], expected[~big].sum())
    groups_o = np.append(observed[big], observed[~big].sum())
    stat = float(np.sum((groups_o - groups_e) ** 2 / groups_e))
    dof = len(groups_e) - 1
    return stat, dof, float(scipy_stats.chi2.sf(stat, dof))


@pytest.mark.parametrize("method", ["draft_model", "prompt_lookup"])
def test_sampled_law_is_the_targets(method, tiny, target, related_draft, greedy_ref):
    """Seeded chi-square test: speculative sampling draws the first 3 tokens from the target's law.

    One generate call over ROWS identical prompts (every row has its own random stream). The
    prompt repeats the target's own greedy cycle, so prompt lookup proposes likely tokens, and
    the draft model (the target with a perturbed head) is accepted part of the time: both
    acceptance and rejection (residual) paths are exercised in the first round.

    Thresholds: the law has a few hundred possible 3-token sequences; cells expected below 5
    are merged into one (the usual validity rule for Pearson's statistic), which leaves ~100
    cells, i.e. ~100 degrees of freedom. The seed is fixed, so the test is deterministic; a
    correct sampler passes at a cut of p = 1e-3 with probability 0.999 over seeds. As a power
    check the same sample must be rejected (p < 1e-3) against a plausible wrong law: the
    target's distribution at the same temperature without top-k / top-p.
    """
    prompt = greedy_ref.tokens[0, :7].tolist()     # the greedy cycle, e.g. 13 29 25 13 29 25 13
    if method == "draft_model":
        drafter = js.DraftModel(related_draft, num_tokens=3)
    else:
        drafter = js.PromptLookup(ngram=2, num_tokens=3)
    out = js.generate(target, [prompt] * ROWS, max_new_tokens=3, sampling=SAMPLING,
                      drafter=drafter, seed=1)
    assert np.all(out.lengths == 3)
    s = out.stats
    assert 0.1 < s["acceptance_rate"] < 0.9, s["acceptance_rate"]   # both paths taken
    counts = np.zeros((tiny.vocab,) * 3)
    np.add.at(counts, tuple(out.tokens.T), 1)

    law = _exact_law(target, prompt, SAMPLING)
    assert law.sum() == pytest.approx(1.0, abs=1e-4)
    stat, dof, p_value = _chi_square(counts, law, ROWS)
    assert dof >= 20, "too few cells for a meaningful test"
    assert p_value > P_VALUE_CUT, f"chi2={stat:.1f}, dof={dof}, p={p_value:.2e}"

    unfiltered = _exact_law(target, prompt, js.Sampling(temperature=0.8))
    _, _, p_wrong = _chi_square(counts, unfiltered, ROWS)
    assert p_wrong < P_VALUE_CUT, "the test cannot tell the filtered law from the unfiltered one"
