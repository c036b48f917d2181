"""The processed sampling distribution against transformers' logits warpers, and validation."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import jax
import jax.numpy as jnp

from jaxspec.sampling import Sampling, probabilities, sample, sample_from_probs

_probabilities = jax.jit(probabilities)


def _hf_probabilities(logits, temperature, top_k, top_p, min_p):
    """What transformers' generate samples from, warpers in its order."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    scores = warpers(None, torch.tensor(logits))
    return torch.softmax(scores, dim=-1).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 1.0, 0.0),
    (1.0, 5, 1.0, 0.0),
    (1.3, 1, 1.0, 0.0),
    (0.8, 0, 0.9, 0.0),
    (1.0, 0, 0.3, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.5, 0, 1.0, 0.3),
    (0.9, 10, 0.8, 0.0),
    (1.2, 20, 0.95, 0.05),
    (0.6, 7, 0.5, 0.2),
])
def test_probabilities_match_transformers_warpers(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 64)) * rng.uniform(0.5, 4.0, (6, 1))).astype(np.float32)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = np.asarray(_probabilities(jnp.asarray(logits), sampling))
    ref = _hf_probabilities(logits, temperature, top_k, top_p, min_p)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ours == 0, ref == 0)  # the same support, exactly
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)


def test_values_are_traced_flags_are_static():
    """Changing temperature / top_k / top_p / min_p values reuses the compiled program."""
    traces = []

    @jax.jit
    def f(logits, sampling):
        traces.append(1)
        return probabilities(logits, sampling)

    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32)), jnp.float32)
    a = f(logits, Sampling(temperature=0.9, top_k=3, top_p=0.7, min_p=0.01))
    b = f(logits, Sampling(temperature=1.1, top_k=4, top_p=0.8, min_p=0.02))
    assert len(traces) == 1 and not np.allclose(a, b)
    f(logits, Sampling(temperature=1.1))  # filtered=False: a different program
    assert len(traces) == 2


def test_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((3, 50)), jnp.float32)
    probs = probabilities(logits, Sampling(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(probs).argmax(-1), np.asarray(logits).argmax(-1))
    np.testing.assert_array_equal(np.asarray(probs).max(-1), 1.0)
    np.testing.assert_array_equal(np.asarray(sample(jax.random.PRNGKey(0), logits, Sampling())),
                                  np.asarray(logits).argmax(-1))


def test_sample_never_draws_filtered_tokens():
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((64,)), jnp.float32)
    sampling = Sampling(temperature=1.0, top_k=3)
    draws = jax.jit(jax.vmap(lambda k: sample(k, logits, sampling)))(
        jax.random.split(jax.random.PRNGKey(0), 500))
    allowed = set(np.argsort(-np.asarray(logits))[:3].tolist())
    assert set(np.asarray(draws).tolist()) <= allowed
    probs = jnp.zeros((8,)).at[jnp.array([2, 5])].set(jnp.array([0.25, 0.75]))
    draws = jax.jit(jax.vmap(lambda k: sample_from_probs(k, probs)))(
        jax.random.split(jax.random.PRNGKey(1), 200))
    assert set(np.asarray(draws).tolist()) == {2, 5}


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\), got -0\.5"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\] \(1 disables it\), got 0\.0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\] \(1 disables it\), got 1\.5"),
    (dict(temperature=1.0, top_p=-0.1), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-1), r"top_k must be an integer >= 0 \(0 disables it\), got -1"),
    (dict(temperature=1.0, top_k=2.5), r"top_k must be an integer >= 0"),
    (dict(temperature=1.0, min_p=1.5), r"min_p must be in \[0, 1\] \(0 disables it\), got 1\.5"),
])
def test_invalid_sampling_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_top_token_is_argmax_with_first_index_ties():
    from jaxspec.sampling import top_token

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 5, 300)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(top_token(logits)),
                                  np.asarray(jnp.argmax(logits, axis=-1)))
    tied = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [-jnp.inf, -jnp.inf, -1.0, -1.0],
                        [3.0, 3.0, 3.0, 3.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(top_token(tied)), [1, 2, 0])
    assert top_token(tied).dtype == jnp.int32
    assert int(top_token(jnp.full((7,), jnp.nan))) == 0   # never an index outside the vocabulary
