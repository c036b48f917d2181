"""Training of target and draft models: data pipeline, train loop, distillation, export."""

from jaxspec.train.checkpoint import CheckpointError, Checkpointer
from jaxspec.train.data import Batcher, pack, train_tokenizer
from jaxspec.train.distill import generate_pool, greedy_agreement, kl_loss, make_kl_loss, sample_continuations
from jaxspec.train.export import export
from jaxspec.train.trainer import RunResult, TrainConfig, TrainState, lm_loss, train

__all__ = ["Batcher", "CheckpointError", "Checkpointer", "RunResult", "TrainConfig", "TrainState",
           "export", "generate_pool", "greedy_agreement", "kl_loss", "lm_loss", "make_kl_loss",
           "pack", "sample_continuations", "train", "train_tokenizer"]
