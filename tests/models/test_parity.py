"""Logit parity with Hugging Face transformers (PyTorch) for every supported family.

Prefill: a batch of ragged right-padded prompts through `forward`; only valid positions are
compared. Decode: tokens fed one at a time through `forward` + `commit`, each row at its own
cache length, compared with the Hugging Face logits of the whole unpadded sequence.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxspec as js
from jaxspec.models import commit
from jaxspec.models.transformer import unstack_layers

VOCAB = 128  # the vocabulary of every conftest checkpoint

ATOL = 1e-4
PROMPT_LENGTHS = (11, 6, 2)
PADDED = 12
DECODE_STEPS = 6
CACHE_LEN = 24

_forward = jax.jit(js.forward)


def _data(seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENGTHS]
    continuations = rng.integers(0, VOCAB, (len(prompts), DECODE_STEPS))
    return prompts, continuations


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    model = checkpoint.model
    prompts, cont = _data(seed=len(checkpoint.family))
    batch = len(prompts)
    tokens = np.zeros((batch, PADDED), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    lengths = jnp.asarray(PROMPT_LENGTHS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(PADDED, dtype=jnp.int32), (batch, PADDED))
    cache = js.KVCache.create(model.config, batch, CACHE_LEN)

    logits, hidden, cache = _forward(model, jnp.asarray(tokens), cache, positions)
    assert logits.shape == (batch, PADDED, VOCAB) and logits.dtype == jnp.float32
    assert hidden.shape == (batch, PADDED, model.config.hidden_size)
    references = [checkpoint.hf_logits(p + cont[b].tolist()) for b, p in enumerate(prompts)]
    for b, n in enumerate(PROMPT_LENGTHS):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), references[b][:n], atol=ATOL, rtol=0,
                                   err_msg=f"{checkpoint.family} prefill row {b}")

    cache = commit(cache, lengths)
    for step in range(DECODE_STEPS):
        token = jnp.asarray(cont[:, step:step + 1], jnp.int32)          # [B, 1]
        logits, _, cache = _forward(model, token, cache, cache.lengths[:, None])
        cache = commit(cache, jnp.ones((batch,), jnp.int32))
        for b, n in enumerate(PROMPT_LENGTHS):
            np.testing.assert_allclose(np.asarray(logits[b, 0]), references[b][n + step],
                                       atol=ATOL, rtol=0,
                                       err_msg=f"{checkpoint.family} decode step {step} row {b}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(PROMPT_LENGTHS) + DECODE_STEPS)


def test_forward_train_matches_transformers(checkpoints):
    """The cache-free training forward agrees too (llama: GQA + rope scaling; gpt2)."""
    for family in ("llama", "gpt2"):
        ckpt = checkpoints[family]
        ids = np.random.default_rng(7).integers(0, VOCAB, (1, 10))
        logits, _ = jax.jit(js.models.forward_train, static_argnums=1)(
            ckpt.model.params, ckpt.model.config, jnp.asarray(ids, jnp.int32))
        np.testing.assert_allclose(np.asarray(logits[0]), ckpt.hf_logits(ids[0].tolist()),
                                   atol=ATOL, rtol=0, err_msg=family)


def test_unstacked_layers_give_the_same_logits(checkpoints):
    """`unstack_layers` (the CPU decode loop's layout) runs the same network as the scan."""
    model = checkpoints["qwen3"].model
    unstacked = model.replace(params=unstack_layers(model.params))
    assert isinstance(unstacked.params["layers"], tuple) and len(unstacked.params["layers"]) == 2
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 5)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    outs = []
    for m in (model, unstacked):
        cache = js.KVCache.create(m.config, 2, 8)
        logits, _, cache = _forward(m, tokens, cache, positions)
        outs.append((logits, cache.k, cache.v))
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
