"""Beam search: the same hypotheses and scores as transformers' generate(num_beams=k,
do_sample=False), inside a user's jit, and every bad argument refused with its message.

One ragged batch (prompts of 9, 4 and 1 tokens) per run; transformers runs each prompt alone,
so the comparison also shows that a prompt's hypotheses do not depend on its batch. length_penalty
and early_stopping are dynamic values of the program: per family and beam count the variants
share one compiled program (two: with and without stop tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec import decoding
from jaxspec.search import beam_search_tokens

MAX_NEW = 10  # below its bucket (16): the dynamic length limit is exercised

VARIANTS = [  # (length_penalty, early_stopping)
    (1.0, False),
    (2.0, True),
    (-0.5, "never"),
    (1.0, "never"),    # differs from (1.0, False) here: the "never" bound is exercised
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_matches_transformers(checkpoints, prompts, hf_beam_search, stop_tokens_for,
                              assert_same_hypotheses, family, num_beams):
    ckpt = checkpoints[family]
    # No stop token: every hypothesis runs to the length limit.
    plain = [hf_beam_search(ckpt, p, num_beams, MAX_NEW) for p in prompts]
    out = js.beam_search(ckpt.model, prompts, num_beams=num_beams, max_new_tokens=MAX_NEW,
                         num_return_sequences=num_beams)
    assert out.tokens.shape == (len(prompts) * num_beams, MAX_NEW)
    assert_same_hypotheses(out, plain, num_beams, f"{family} k={num_beams} plain")

    stops = stop_tokens_for([[h for h, _ in ref] for ref in plain])
    finished_early = stopped_early = False
    compiled = None
    for length_penalty, early_stopping in VARIANTS:
        label = f"{family} k={num_beams} lp={length_penalty} early_stopping={early_stopping}"
        refs = [hf_beam_search(ckpt, p, num_beams, MAX_NEW, stops, length_penalty=length_penalty,
                               early_stopping=early_stopping) for p in prompts]
        out = js.beam_search(ckpt.model, prompts, num_beams=num_beams, max_new_tokens=MAX_NEW,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             num_return_sequences=num_beams, stop_tokens=stops)
        assert_same_hypotheses(out, refs, num_beams, label)
        if compiled is None:  # after the first run with stop tokens
            compiled = decoding.COMPILATIONS["beam_search"]
        finished_early |= bool(np.any(out.lengths < MAX_NEW))
        stopped_early |= min(out.stats["target_steps"]) < MAX_NEW
    # The stop tokens did end hypotheses early, and searches before the length limit.
    assert finished_early and stopped_early

    # num_return_sequences=1 (the default): the best hypothesis only.
    best = [hf_beam_search(ckpt, p, num_beams, MAX_NEW, stops, num_return_sequences=1) for p in prompts]
    out = js.beam_search(ckpt.model, prompts, num_beams=num_beams, max_new_tokens=MAX_NEW,
                         stop_tokens=stops)
    assert_same_hypotheses(out, best, 1, f"{family} k={num_beams} best only")
    # length_penalty, early_stopping and num_return_sequences are not part of the program.
    assert decoding.COMPILATIONS["beam_search"] == compiled


def test_inside_a_users_jit(checkpoints, prompts, stop_tokens_for, hf_beam_search):
    """The token-level function composes with the caller's own jit and post-processing."""
    ckpt = checkpoints["llama"]
    stops = stop_tokens_for([[h for h, _ in hf_beam_search(ckpt, p, 2, MAX_NEW)] for p in prompts])
    tokens = np.zeros((len(prompts), 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)

    @jax.jit
    def best_two(model, tokens, lengths, length_penalty):
        out = beam_search_tokens(model, tokens, lengths, 16, 2, length_penalty=length_penalty,
                                 early_stopping="never", num_return_sequences=2,
                                 stop_tokens=jnp.asarray(stops), limit=MAX_NEW)
        return out.tokens[..., :MAX_NEW], out.lengths, jnp.exp(out.scores)

    got_tokens, got_lengths, got_probs = best_two(ckpt.model, tokens, lengths, 0.7)
    want = js.beam_search(ckpt.model, prompts, num_beams=2, max_new_tokens=MAX_NEW,
                          length_penalty=0.7, early_stopping="never", num_return_sequences=2,
                          stop_tokens=stops)
    np.testing.assert_array_equal(np.asarray(got_tokens).reshape(-1, MAX_NEW), want.tokens)
    np.testing.assert_array_equal(np.asarray(got_lengths).reshape(-1), want.lengths)
    np.testing.assert_allclose(np.log(np.asarray(got_probs)).reshape(-1), want.sequence_scores,
                               atol=1e-5, rtol=0)


def test_texts_and_output_layout(checkpoints, word_tokenizer):
    """String prompts in, texts out: rows grouped by prompt, best first, stats as js.generate."""
    model = checkpoints["llama"].model.replace(tokenizer=word_tokenizer)
    prompts = ["w5 w9 w3 w7", "w1", "w100 w2"]
    out = js.beam_search(model, prompts, num_beams=4, max_new_tokens=6, num_return_sequences=3)
    assert isinstance(out, js.BeamSearchOutput) and isinstance(out, js.GenerateOutput)
    assert out.tokens.shape == (9, 6) and out.lengths.shape == (9,)
    assert out.sequence_scores.shape == (9,)
    for i in range(3):
        scores = out.sequence_scores[3 * i:3 * i + 3]
        assert np.all(np.diff(scores) <= 0), "best first within each prompt"
        rows = {tuple(out.tokens[r]) for r in range(3 * i, 3 * i + 3)}
        assert len(rows) == 3, "distinct hypotheses"
    assert out.texts == [word_tokenizer.decode(out.tokens[r, :out.lengths[r]].tolist())
                         for r in range(9)]
    for key in ("target_steps", "generated_tokens", "seconds", "tokens_per_s", "compile_seconds"):
        assert key in out.stats
    assert out.stats["num_beams"] == 4


BAD = [
    (dict(num_beams=0), r"num_beams must be an integer >= 1, got 0"),
    (dict(num_beams=2.0), r"num_beams must be an integer >= 1, got 2.0"),
    (dict(num_beams=2, num_return_sequences=3),
     r"num_return_sequences must be an integer between 1 and num_beams \(2\), got 3"),
    (dict(num_beams=4, num_beam_groups=3),
     r"num_beam_groups must be an integer >= 1 that divides num_beams \(4\).*got 3"),
    (dict(num_beams=4, diversity_penalty=0.5),
     r"diversity_penalty=0.5 has no effect with num_beam_groups=1: set num_beam_groups > 1"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0),
     r"diversity_penalty must be a finite number >= 0, got -1.0"),
    (dict(num_beams=2, early_stopping="sometimes"),
     r"early_stopping must be True, False or \"never\", got 'sometimes'"),
    (dict(num_beams=2, length_penalty=float("nan")), r"length_penalty must be a finite number"),
    (dict(num_beams=2, max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(num_beams=2, max_new_tokens=200), r"prompt 0 has 3 tokens; .* at most 128"),
    (dict(num_beams=2, stop_tokens=[500]), r"stop token 500 is outside the vocabulary \[0, 128\)"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_refused_before_any_compute(checkpoints, kwargs, message):
    compiled = decoding.COMPILATIONS["beam_search"]
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        js.beam_search(checkpoints["llama"].model, [[1, 2, 3]], **kwargs)
    assert decoding.COMPILATIONS["beam_search"] == compiled


def test_bad_prompts_are_refused(checkpoints):
    model = checkpoints["llama"].model
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        js.beam_search(model, [], num_beams=2)
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        js.beam_search(model, ["hello"], num_beams=2)


def test_token_level_function_checks_its_static_arguments(checkpoints):
    model = checkpoints["llama"].model
    tokens, lengths = jnp.ones((1, 4), jnp.int32), jnp.asarray([4], jnp.int32)
    with pytest.raises(ValueError, match=r"num_beam_groups must .* divides num_beams \(6\)"):
        beam_search_tokens(model, tokens, lengths, 8, 6, num_beam_groups=4)
    with pytest.raises(ValueError, match=r"num_return_sequences must .* num_beams \(2\), got 4"):
        beam_search_tokens(model, tokens, lengths, 8, 2, num_return_sequences=4)
