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


def _feature_batch(params, config, tokens):
    """What FeatureBatches yields for `tokens` [B, T]: the target's final normed hidden states
    and greedy next tokens, every position valid."""
    logits, hidden = forward_train(params, config, jnp.asarray(tokens))
    return {"tokens": jnp.asarray(tokens), "features": hidden,
            "valid": jnp.ones(tokens.shape, bool),
            "labels": jnp.argmax(logits, -1).astype(jnp.int32)}


def test_feature_kl_loss_by_hand():
    params = init_params(TARGET, jax.random.PRNGKey(3), std=0.3)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
    batch = _feature_batch(params, TARGET, tokens)
    batch["valid"] = batch["valid"].at[0, :3].set(False)
    head_ids = np.sort(np.random.default_rng(1).choice(64, 24, replace=False)).astype(np.int32)
    config, own, shared, head = distill.draft_from_target(params, TARGET, (1,), head_ids)
    loss, m = distill.feature_kl_loss(own, batch, config=config, shared=shared, head=head,
                                      head_ids=jnp.asarray(head_ids), ce_weight=0.5)
    # By hand: the draft's logits over the head, the target's restricted and renormalised.
    full = dict(own, embed=shared["embed"], lm_head={"kernel": head.T})
    d = np.asarray(forward_train(full, config, jnp.asarray(tokens))[0], np.float64)  # [B, T, V']
    t = np.asarray(batch["features"], np.float64) @ np.asarray(head, np.float64).T
    logsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)
    dl, tl = logsm(d), logsm(t)
    valid = np.asarray(batch["valid"])
    kl = (np.exp(tl) * (tl - dl)).sum(-1)[valid].mean()
    labels = np.asarray(batch["labels"])
    where = {int(x): i for i, x in enumerate(head_ids)}
    ces, hits = [], 0
    for b, p in zip(*np.nonzero(valid)):
        if labels[b, p] in where:
            ces.append(-dl[b, p, where[labels[b, p]]])
            hits += int(np.argmax(d[b, p]) == where[labels[b, p]])
    assert 0 < len(ces) < valid.sum()        # some labels lie outside the head
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(m["ce"]), np.mean(ces), rtol=1e-4)
    np.testing.assert_allclose(float(m["top1"]), hits / valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(loss), kl + 0.5 * np.mean(ces), rtol=1e-4)


def test_feature_distillation_lowers_kl():
    corpus = toy_sequences(3000, seed=1)                                        # [N, 17]
    teacher = trainer.train(init_params(TARGET, jax.random.PRNGKey(3)), TARGET,
                            data.Batcher(corpus, 8),
                            trainer.TrainConfig(batch_size=8, learning_rate=1e-2, warmup_steps=2,
                                                max_steps=20, log_every=1000), quiet=True).params
    head_ids = np.arange(64, dtype=np.int32)
    config, own, shared, head = distill.draft_from_target(teacher, TARGET, (1,), head_ids)
    np.testing.assert_array_equal(np.asarray(own["layers"]["q"]["kernel"][0]),
                                  np.asarray(teacher["layers"]["q"]["kernel"][1]))
    batches = [_feature_batch(teacher, TARGET, corpus[i:i + 8, :16]) for i in range(0, 160, 8)]

    class Source:
        def batch(self, position):
            return batches[position % len(batches)], position + 1

    loss_fn = lambda p, b: distill.feature_kl_loss(p, b, config=config, shared=shared, head=head,
                                                   head_ids=jnp.asarray(head_ids))
    cfg = trainer.TrainConfig(batch_size=8, learning_rate=3e-3, warmup_steps=2, max_steps=40,
                              weight_decay=0.0, log_every=1000)
    held = batches[:2]
    before = np.mean([float(loss_fn(own, b)[1]["kl"]) for b in held])
    result = trainer.train(own, config, Source(), cfg, loss_fn=loss_fn, quiet=True)
    after = np.mean([float(loss_fn(result.params, b)[1]["kl"]) for b in held])
    assert after < 0.5 * before, (before, after)


def test_draft_from_target_refuses_missing_layers():
    params = init_params(TARGET, jax.random.PRNGKey(3))
    with pytest.raises(ValueError, match="a draft needs at least one layer"):
        distill.draft_from_target(params, TARGET, (), np.arange(8))
    with pytest.raises(ValueError, match=r"target layers \[2, -1\] do not exist \(the target has 2\)"):
        distill.draft_from_target(params, TARGET, (0, 2, -1), np.arange(8))
