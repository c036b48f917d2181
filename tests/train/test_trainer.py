"""Training loop: learning, exact resume, bf16 compute, and refusal of bad checkpoints."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import init_params
from jaxspec.train import data, trainer
from jaxspec.train.checkpoint import CheckpointError

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=64,
                  tie_word_embeddings=True)
SEQ = 16


def toy_sequences(n_tokens: int = 4000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a few repeated 'words' in random order, packed [N, SEQ+1]."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(1, 64, rng.integers(3, 7)) for _ in range(8)]
    stream = np.concatenate([words[i] for i in rng.integers(0, 8, n_tokens // 4)])[:n_tokens]
    return data.pack(stream.astype(np.int32), SEQ)


def tcfg(**kw) -> trainer.TrainConfig:
    base = dict(batch_size=4, learning_rate=1e-2, warmup_steps=2, max_steps=8, checkpoint_every=2,
                eval_every=1000, log_every=1000)
    base.update(kw)
    return trainer.TrainConfig(**base)


@pytest.fixture(scope="module")
def seqs():
    return toy_sequences()


def params0():
    return init_params(CFG, jax.random.PRNGKey(0))


def _equal_trees(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_training_lowers_loss(seqs):
    evals = data.eval_batches(seqs[-8:], 4)
    res = trainer.train(params0(), CFG, data.Batcher(seqs[:-8], 4), tcfg(max_steps=30, eval_every=30),
                        eval_batches=evals, quiet=True)
    before = trainer.make_eval_fn(lambda p, b: trainer.lm_loss(p, b, CFG))(params0(), evals)
    assert res.finished and res.step == 30
    assert res.evals[-1][1]["loss"] < before["loss"] - 1.0, (before, res.evals)
    assert res.evals[-1][1]["ppl"] < before["ppl"]


def test_bfloat16_compute_runs(seqs):
    res = trainer.train(params0(), CFG, data.Batcher(seqs, 4), tcfg(max_steps=2, compute_dtype="bfloat16",
                                                                   log_every=1), quiet=True)
    assert np.isfinite(res.history[-1][1]["loss"])
    assert jax.tree_util.tree_leaves(res.params)[0].dtype == np.float32  # master weights stay f32
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        trainer.TrainConfig(compute_dtype="float8")


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(seqs, tmp_path):
    full = trainer.train(params0(), CFG, data.Batcher(seqs, 4), tcfg(), checkpoint_dir=tmp_path / "a",
                         quiet=True)

    def kill_at_5(step, metrics):
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        trainer.train(params0(), CFG, data.Batcher(seqs, 4), tcfg(), checkpoint_dir=tmp_path / "b",
                      on_step=kill_at_5, quiet=True)
    # Resume from the step-4 checkpoint; the initial params passed here must be ignored.
    other_init = init_params(CFG, jax.random.PRNGKey(99))
    resumed = trainer.train(other_init, CFG, data.Batcher(seqs, 4), tcfg(),
                            checkpoint_dir=tmp_path / "b", quiet=True)
    assert resumed.step == full.step == 8
    assert resumed.data_position == full.data_position == 32
    assert _equal_trees(resumed.params, full.params)
    assert trainer.stored_train_config(tmp_path / "b") == tcfg()


def _trained_dir(seqs, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    trainer.train(params0(), CFG, data.Batcher(seqs, 4), tcfg(max_steps=2), checkpoint_dir=d, quiet=True)
    return d


def _resume(seqs, d, config=CFG, cfg=None):
    return trainer.train(init_params(config, jax.random.PRNGKey(0)), config, data.Batcher(seqs, 4),
                         cfg or tcfg(max_steps=4), checkpoint_dir=d, quiet=True)


def test_truncated_checkpoint_is_refused(seqs, tmp_path):
    d = _trained_dir(seqs, tmp_path)
    victim = max((p for p in (d / "2").rglob("*") if p.is_file() and "manifest" not in p.name),
                 key=lambda p: p.stat().st_size)
    victim.unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 .* is truncated: file .* is missing"):
        _resume(seqs, d)


def test_corrupted_checkpoint_is_refused(seqs, tmp_path):
    d = _trained_dir(seqs, tmp_path)
    victim = max((p for p in (d / "2").rglob("*") if p.is_file() and "manifest" not in p.name),
                 key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"is corrupt: file .* does not match its recorded SHA-256"):
        _resume(seqs, d)
    victim.write_bytes(bytes(raw[:-7]))
    with pytest.raises(CheckpointError, match=r"is corrupt: file .* has \d+ bytes, expected \d+"):
        _resume(seqs, d)


def test_interrupted_save_is_refused(seqs, tmp_path):
    d = _trained_dir(seqs, tmp_path)
    (d / "2" / "jaxspec_manifest.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete: its manifest"):
        _resume(seqs, d)


def test_checkpoint_of_another_config_is_refused(seqs, tmp_path):
    d = _trained_dir(seqs, tmp_path)
    wider = dataclasses.replace(CFG, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"different model_config \(intermediate_size: "
                                              r"checkpoint has 64, this run has 96\)"):
        _resume(seqs, d, config=wider)
    with pytest.raises(CheckpointError, match=r"different schedule \(learning_rate"):
        _resume(seqs, d, cfg=tcfg(max_steps=4, learning_rate=3e-3))
