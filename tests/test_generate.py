"""Autoregressive generation: greedy parity with transformers, stopping, lengths, batching,
compilation count, bad inputs, and the pure token function inside a user's jit.

Most tests reuse one compiled program: batch 3, prompts bucketed to 16, 32 new tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxspec as js
from jaxspec import api, decoding
from jaxspec.models import SUPPORTED_FAMILIES as FAMILIES

VOCAB = 128  # the vocabulary of every conftest checkpoint

NEW = 32
_rng = np.random.default_rng(1234)
PROMPTS = [_rng.integers(0, VOCAB, n).tolist() for n in (9, 4, 13)]
OTHER = _rng.integers(0, VOCAB, 7).tolist()


def _hf_greedy(hf, prompt, new=NEW):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=1,
                          max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama_greedy(checkpoints):
    """js.generate greedy output for PROMPTS on llama (the program most tests reuse)."""
    return js.generate(checkpoints["llama"].model, PROMPTS, max_new_tokens=NEW)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(checkpoints, family, llama_greedy):
    ckpt = checkpoints[family]
    out = llama_greedy if family == "llama" else js.generate(ckpt.model, PROMPTS, max_new_tokens=NEW)
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.lengths, [NEW] * 3)
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b].tolist() == _hf_greedy(ckpt.hf, prompt), f"{family} row {b}"
    assert out.texts is None  # no tokenizer


def test_output_and_stats(llama_greedy):
    stats = llama_greedy.stats
    assert stats["target_steps"] == [NEW] * 3     # one prefill + NEW - 1 decode steps
    assert stats["generated_tokens"] == 3 * NEW and stats["tokens_per_s"] > 0
    assert stats["compile_seconds"] >= 0 and stats["drafted"] == [0, 0, 0]


def test_row_output_does_not_depend_on_batch(checkpoints, llama_greedy):
    model = checkpoints["llama"].model
    out = js.generate(model, [PROMPTS[2], OTHER, PROMPTS[0]], max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens[0], llama_greedy.tokens[2])
    np.testing.assert_array_equal(out.tokens[2], llama_greedy.tokens[0])


def test_max_new_tokens_is_exact(checkpoints, llama_greedy):
    out = js.generate(checkpoints["llama"].model, PROMPTS, max_new_tokens=20)  # same bucket
    assert out.tokens.shape == (3, 20)
    np.testing.assert_array_equal(out.lengths, [20, 20, 20])
    np.testing.assert_array_equal(out.tokens, llama_greedy.tokens[:, :20])


def test_stop_token_ends_row(checkpoints, llama_greedy):
    full = llama_greedy.tokens
    row0 = full[0].tolist()
    # A token whose first appearance in row 0 is past the start: row 0 must stop there.
    stop = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i])
    out = js.generate(checkpoints["llama"].model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
    for b in range(3):
        hits = np.flatnonzero(full[b] == stop)
        n = int(hits[0]) + 1 if hits.size else NEW
        assert out.lengths[b] == n, f"row {b}"
        np.testing.assert_array_equal(out.tokens[b, :n], full[b, :n])
        assert (out.tokens[b, n:] == api.pad_token_id(checkpoints["llama"].model)).all()
    assert out.lengths[0] == row0.index(stop) + 1 < NEW
    assert out.tokens[0, out.lengths[0] - 1] == stop


def test_config_eos_and_tokenizer_eos_are_stop_tokens(checkpoints, word_tokenizer):
    model = checkpoints["llama"].model
    config = js.ModelConfig(**{**model.config.__dict__, "eos_token_ids": (7, 9)})
    with_eos = model.replace(config=config)
    assert api.stop_token_array(with_eos, [3]).tolist() == [3, 7, 9]
    assert api.stop_token_array(model, None).tolist() == []
    assert api.pad_token_id(with_eos) == 7
    tok = word_tokenizer.__class__(tokenizer_object=word_tokenizer.backend_tokenizer,
                                   eos_token="w11")
    assert api.stop_token_array(model.replace(tokenizer=tok), None).tolist() == [11]


def test_sampling_with_top_k_one_is_greedy(checkpoints, llama_greedy):
    sampling = js.Sampling(temperature=0.7, top_k=1)
    out = js.generate(checkpoints["llama"].model, PROMPTS, max_new_tokens=NEW, sampling=sampling,
                      seed=3)
    np.testing.assert_array_equal(out.tokens, llama_greedy.tokens)


def test_string_prompts_with_tokenizer(checkpoints, word_tokenizer, llama_greedy):
    model = checkpoints["llama"].model.replace(tokenizer=word_tokenizer)
    texts = [" ".join(f"w{t}" for t in p) for p in PROMPTS]
    compilations = decoding.COMPILATIONS["autoregressive"]
    out = js.generate(model, texts, max_new_tokens=NEW)
    assert decoding.COMPILATIONS["autoregressive"] == compilations  # the tokenizer is not a cache key
    np.testing.assert_array_equal(out.tokens, llama_greedy.tokens)
    assert out.texts == [" ".join(f"w{t}" for t in row) for row in llama_greedy.tokens.tolist()]


def test_one_compilation_per_bucket(checkpoints, monkeypatch):
    """Two prompt sets of different lengths in the same bucket compile once; max_new_tokens=1."""
    monkeypatch.setattr(decoding, "PROGRAMS", decoding._ProgramCache())
    model = checkpoints["llama"].model
    before = decoding.COMPILATIONS["autoregressive"]
    a = js.generate(model, [p[:5] for p in PROMPTS], max_new_tokens=1)
    b = js.generate(model, [OTHER + OTHER[:5], PROMPTS[1], [1]], max_new_tokens=1)
    assert decoding.COMPILATIONS["autoregressive"] == before + 1
    assert a.stats["compile_seconds"] > 0 and b.stats["compile_seconds"] == 0
    for out in (a, b):
        assert out.tokens.shape == (3, 1)
        np.testing.assert_array_equal(out.lengths, [1, 1, 1])
    np.testing.assert_array_equal(b.tokens[1], _hf_greedy(checkpoints["llama"].hf, PROMPTS[1], new=1))


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([], {}, r"prompts must be a non-empty list of strings, of conversations .* or of token-id lists"),
    ("w1 w2", {}, r"prompts must be a non-empty list"),
    ([[1, 2], []], {}, r"prompt 1 is empty: every prompt needs at least one token"),
    ([[1, 2]], dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    ([[1, 2]], dict(max_new_tokens=2.5), r"max_new_tokens must be an integer >= 1, got 2\.5"),
    ([[1] * 100], dict(max_new_tokens=29),
     r"prompt 0 has 100 tokens; with max_new_tokens=29 it needs 129 positions, but the model "
     r"supports at most 128 \(max_position_embeddings\)"),
    (["w1 w2"], {}, r"string prompts need a tokenizer, and this model has none"),
    ([[1, 2], [3, VOCAB]], {}, rf"prompt 1 has token id {VOCAB} outside the vocabulary \[0, {VOCAB}\)"),
    ([[-1]], {}, rf"prompt 0 has token id -1 outside the vocabulary \[0, {VOCAB}\)"),
    ([[1]], dict(stop_tokens=[VOCAB + 5]), rf"stop token {VOCAB + 5} is outside the vocabulary"),
    ([[1]], dict(sampling=dict(temperature=0.5)), r"sampling must be a js\.Sampling, got dict"),
])
def test_bad_inputs_raise_before_compute(checkpoints, prompts, kwargs, message):
    before = dict(decoding.COMPILATIONS)
    with pytest.raises(ValueError, match=message):
        js.generate(checkpoints["llama"].model, prompts, **kwargs)
    assert dict(decoding.COMPILATIONS) == before


@pytest.mark.parametrize("seed,given", [(1.5, r"1\.5 of type float"), ("0", r"'0' of type str"),
                                        (True, r"True of type bool"), (None, r"None of type NoneType"),
                                        (np.float32(2), r"np\.float32\(2\.0\) of type float32")])
def test_seed_must_be_an_integer(checkpoints, seed, given):
    before = dict(decoding.COMPILATIONS)
    with pytest.raises(ValueError, match=r"seed must be an integer \(e\.g\. seed=0\), got " + given):
        js.generate(checkpoints["llama"].model, PROMPTS, max_new_tokens=NEW, seed=seed)
    assert dict(decoding.COMPILATIONS) == before


def test_numpy_and_jax_integer_seeds_are_accepted(checkpoints):
    model = checkpoints["llama"].model
    sampling = js.Sampling(temperature=0.7, top_k=40)  # same program as the top_k=1 test above
    run = functools.partial(js.generate, model, PROMPTS, max_new_tokens=NEW, sampling=sampling)
    expected = run(seed=3).tokens
    for seed in (np.int64(3), np.uint32(3), jnp.int32(3)):
        np.testing.assert_array_equal(run(seed=seed).tokens, expected)
    assert not np.array_equal(run(seed=4).tokens, expected)


def test_prompt_filling_the_context_is_accepted(checkpoints):
    # 100 + 28 == max_position_embeddings: the last allowed size (checked, not run).
    api.check_lengths(checkpoints["llama"].model, [[1] * 100], 28)


def test_autoregressive_tokens_inside_user_jit(checkpoints, llama_greedy):
    model = checkpoints["llama"].model

    @functools.partial(jax.jit, static_argnums=3)
    def user_fn(model, tokens, lengths, max_new_tokens, key):
        out = js.autoregressive_tokens(model, tokens, lengths, max_new_tokens, js.Sampling(), key)
        return out.tokens, out.lengths

    tokens = np.zeros((3, 16), np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    out_tokens, out_lengths = user_fn(model, jnp.asarray(tokens), lengths, NEW, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out_tokens), llama_greedy.tokens)
    np.testing.assert_array_equal(np.asarray(out_lengths), [NEW] * 3)
