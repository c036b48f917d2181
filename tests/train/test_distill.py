"""Distillation: the KL to the target goes down; cached sampling agrees with forward_train."""

from __future__ import annotations

import dataclasses

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward_train, init_params
from jaxspec.train import data, distill, trainer

TARGET = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=64,
                     tie_word_embeddings=True)
DRAFT = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=16, intermediate_size=32, max_position_embeddings=64,
                    tie_word_embeddings=True)



def toy_sequences(n_tokens: int, seed: int) -> np.ndarray:
    """A learnable stream: a few repeated 'words' in random order, packed [N, 17]."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(1, 64, rng.integers(3, 7)) for _ in range(8)]
    stream = np.concatenate([words[i] for i in rng.integers(0, 8, n_tokens // 4)])[:n_tokens]
    return data.pack(stream.astype(np.int32), 16)


def test_sampling_greedy_matches_forward_train():
    params = init_params(TARGET, jax.random.PRNGKey(3), std=0.1)
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)), jnp.int32)
    out = distill.sample_continuations(params, TARGET, prompts, jax.random.PRNGKey(0), new_tokens=6,
                                       temperature=0.0)
    assert out.shape == (2, 11)
    seq = prompts
    for _ in range(6):
        logits, _ = forward_train(params, TARGET, seq)
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)], 1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))
    sampled = distill.sample_continuations(params, TARGET, prompts, jax.random.PRNGKey(0), new_tokens=6)
    assert sampled.shape == (2, 11) and np.all((np.asarray(sampled) >= 0) & (np.asarray(sampled) < 64))


def test_distillation_lowers_kl():
    corpus = toy_sequences(3000, seed=1)                                        # [N, 17]
    # A teacher with structure to learn: briefly trained on the toy corpus.
    teacher = trainer.train(init_params(TARGET, jax.random.PRNGKey(3)), TARGET, data.Batcher(corpus, 8),
                            trainer.TrainConfig(batch_size=8, learning_rate=1e-2, warmup_steps=2,
                                                max_steps=20, log_every=1000), quiet=True)
    t_params = teacher.params
    pool = distill.generate_pool(t_params, TARGET, corpus.reshape(-1), num_sequences=8, seq_len=16,
                                 prompt_len=4, batch_size=8)
    assert pool.shape == (8, 17)
    mixed = distill.MixedBatcher((data.Batcher(corpus, 4, seed=1), data.Batcher(pool, 4, seed=2)))
    b, pos = mixed.batch(0)
    assert b.shape == (8, 17) and pos == 1
    kl = distill.make_kl_loss(DRAFT, TARGET)
    evals = data.eval_batches(corpus[-8:], 8)
    d0 = init_params(DRAFT, jax.random.PRNGKey(4))
    before = trainer.make_eval_fn(kl)(d0, evals, t_params)
    cfg = trainer.TrainConfig(batch_size=8, learning_rate=1e-2, warmup_steps=2, max_steps=30,
                              weight_decay=0.0, eval_every=30, log_every=1000)
    res = trainer.train(d0, DRAFT, mixed, cfg, loss_fn=kl, extra=(t_params,), eval_batches=evals,
                        quiet=True)
    after = res.evals[-1][1]
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["agree"] > before["agree"]
    agree = distill.greedy_agreement(res.params, DRAFT, t_params, TARGET, evals)
    assert abs(agree - after["agree"]) < 1e-6
    with pytest.raises(ValueError, match="draft vocab 32 != target vocab 64"):
        distill.make_kl_loss(dataclasses.replace(DRAFT, vocab_size=32), TARGET)(
            init_params(dataclasses.replace(DRAFT, vocab_size=32), jax.random.PRNGKey(0)),
            jnp.zeros((1, 5), jnp.int32), t_params)
