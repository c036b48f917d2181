"""A small, exact-resume training loop: AdamW + warmup/cosine, clipping, orbax checkpoints.

The loop is generic over a loss: `loss_fn(params, batch, *extra) -> (loss, aux dict)`, where
`batch` is a host int32 array and `extra` are non-trained arrays (a frozen teacher's params in
distillation). Everything that decides the next update — params, optimizer state (which holds
the schedule's step count), step and data position — is in the checkpoint, so an interrupted
run resumed from its last checkpoint produces the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward_train
from jaxspec.train.checkpoint import Checkpointer, CheckpointError

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings of one run (static, JSON-serialisable)."""

    batch_size: int = 16
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1         # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000             # also the length of the cosine schedule
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    compute_dtype: str = "float32"    # "float32" or "bfloat16" (params stay float32)
    seed: int = 0                     # data order
    checkpoint_every: int = 200
    eval_every: int = 200
    log_every: int = 10
    max_minutes: float | None = None  # wall-clock budget of one invocation
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(f"max_steps and batch_size must be >= 1, got {self.max_steps}, "
                             f"{self.batch_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Settings that change the update sequence: a resumed run must keep them.
    SCHEDULE_KEYS = ("batch_size", "learning_rate", "min_lr_ratio", "warmup_steps", "max_steps",
                     "weight_decay", "b1", "b2", "grad_clip", "compute_dtype", "seed")

    def schedule_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.SCHEDULE_KEYS}


@struct.dataclass
class TrainState:
    step: jax.Array      # [] int32
    params: Any
    opt_state: Any


class BatchSource(Protocol):
    def batch(self, position: int) -> tuple[np.ndarray, int]: ...


def _tree_norm(tree):
    """Global L2 norm (optax.tree.norm where present; optax.global_norm is deprecated)."""
    tree_mod = getattr(optax, "tree", None)
    return tree_mod.norm(tree) if tree_mod is not None and hasattr(tree_mod, "norm") else optax.global_norm(tree)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(cfg.max_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.max_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on norm scales or biases."""
    def mask(path, _):
        name = jax.tree_util.keystr(path)
        return "kernel" in name or "embed" in name
    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                    weight_decay=cfg.weight_decay, mask=_decay_mask))


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def log(console, msg: str) -> None:
    """Plain text (no rich markup, one line) so logs read the same on a terminal and in a file."""
    console.print(msg, markup=False, highlight=False, soft_wrap=True)


def cast_params(params, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  params)


# -- losses -----------------------------------------------------------------------------------

def lm_loss(params, tokens, config: ModelConfig, compute_dtype: str = "float32"):
    """Next-token cross-entropy. tokens: [B, T+1] -> (mean loss, {"loss"})."""
    p = cast_params(params, _COMPUTE_DTYPES[compute_dtype])
    logits, _ = forward_train(p, config, tokens[:, :-1])                       # [B, T, V] f32
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])  # [B, T]
    loss = jnp.mean(ce)
    return loss, {"loss": loss}


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
    """A jitted `(state, batch, *extra) -> (state, metrics)`; the state is donated."""

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: TrainState, batch, *extra):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, *extra)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **aux, "grad_norm": _tree_norm(grads)}  # aux may refine "loss"
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_fn(loss_fn: Callable):
    """Mean of each metric over a list of batches, jitted per batch."""
    step = jax.jit(lambda params, batch, *extra: loss_fn(params, batch, *extra)[1])

    def evaluate(params, batches, *extra) -> dict[str, float]:
        sums: dict[str, float] = {}
        for b in batches:
            for k, v in step(params, jax.tree_util.tree_map(jnp.asarray, b), *extra).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out = {k: v / max(len(batches), 1) for k, v in sums.items()}
        if "loss" in out:
            out["ppl"] = math.exp(min(out["loss"], 50.0))
        return out

    return evaluate


# -- the loop ---------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    params: Any
    step: int
    data_position: int
    finished: bool            # reached max_steps (False: stopped by the time budget)
    history: list             # [(step, metrics)] logged training metrics
    evals: list               # [(step, eval metrics)]
    tokens_seen: int
    seconds: float            # wall time of this invocation (compile included)


def stored_train_config(checkpoint_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig recorded in the latest checkpoint of a directory (None if none)."""
    if not Path(checkpoint_dir).exists():
        return None
    ckpt = Checkpointer(checkpoint_dir)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        return TrainConfig(**ckpt.restore_meta(step)["train_config"])
    finally:
        ckpt.close()


def train(params, model_config: ModelConfig, data: BatchSource, cfg: TrainConfig, *,
          loss_fn: Callable | None = None, extra: tuple = (), eval_batches: list | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = True, name: str = "train",
          on_step: Callable[[int, dict], None] | None = None, quiet: bool = False,
          console=None) -> RunResult:
    """Train `params` (the initial params; ignored when resuming) and return the result.

    loss_fn(params, batch [B, T+1] int32, *extra) -> (loss, aux); defaults to `lm_loss`.
    Checkpoints every `cfg.checkpoint_every` steps, at the time budget and at the end; with
    `resume`, continues from the latest checkpoint in `checkpoint_dir`, which must have been
    written for the same model config and the same schedule settings.
    `on_step(step, metrics)` is called after every step (tests use it to interrupt a run).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True, quiet=quiet)
    start = time.time()
    if loss_fn is None:
        loss_fn = functools.partial(lm_loss, config=model_config, compute_dtype=cfg.compute_dtype)
    optimizer = make_optimizer(cfg)
    train_step = make_train_step(loss_fn, optimizer)
    evaluate = make_eval_fn(loss_fn)
    config_meta = dataclasses.asdict(model_config)

    state = init_state(params, optimizer)
    position = 0
    ckpt = Checkpointer(checkpoint_dir, max_to_keep=cfg.keep_checkpoints) if checkpoint_dir else None
    if ckpt is not None and resume and (latest := ckpt.latest_step()) is not None:
        state, meta = ckpt.restore(latest, state, expect={
            "model_config": config_meta, "schedule": cfg.schedule_dict()})
        position = int(meta["data_position"])
        log(console, f"[{name}] resumed from step {latest} in {ckpt.directory} "
                      f"(data position {position})")
    state = jax.tree_util.tree_map(jnp.asarray, state)

    def save():
        if ckpt is None:
            return
        step = int(state.step)
        ckpt.save(step, state, {"data_position": position, "model_config": config_meta,
                                "schedule": cfg.schedule_dict(), "train_config": cfg.to_dict(),
                                "step": step})

    history, evals = [], []
    step0 = int(state.step)
    tokens_per_step = None
    finished = step0 >= cfg.max_steps
    last_saved = step0
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes is not None else None
    progress = Progress(TextColumn(f"\\[{name}]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        console=console, disable=quiet, transient=False)
    try:
        with progress:
            task = progress.add_task(name, total=cfg.max_steps, completed=step0, info="")
            t_log, last_log_step = time.time(), step0
            while int(state.step) < cfg.max_steps:
                if deadline is not None and time.time() > deadline:
                    log(console, f"[{name}] time budget of {cfg.max_minutes} min reached at "
                                  f"step {int(state.step)}")
                    break
                batch, position = data.batch(position)   # an array [B, T+1] or a pytree of them
                first = jax.tree_util.tree_leaves(batch)[0]
                tokens_per_step = int(first.shape[0]) * (int(first.shape[1]) - 1)
                state, metrics = train_step(state, jax.tree_util.tree_map(jnp.asarray, batch), *extra)
                step = int(state.step)
                if on_step is not None:
                    on_step(step, metrics)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    m = {k: float(v) for k, v in metrics.items()}
                    now = time.time()
                    tps = (step - last_log_step) * tokens_per_step / max(now - t_log, 1e-9)
                    t_log, last_log_step = now, step
                    m["tokens_per_s"] = tps
                    history.append((step, m))
                    info = " ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "grad_norm")
                    progress.update(task, completed=step, info=info)
                    if not console.is_terminal:
                        log(console, f"[{name}] step {step}/{cfg.max_steps} {info} "
                                      f"elapsed {now - start:.0f}s")
                else:
                    progress.update(task, completed=step)
                if eval_batches and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    ev = evaluate(state.params, eval_batches, *extra)
                    evals.append((step, ev))
                    log(console, f"[{name}] step {step} held-out " +
                                  " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                if step % cfg.checkpoint_every == 0:
                    save()
                    last_saved = step
            finished = int(state.step) >= cfg.max_steps
        if int(state.step) != last_saved:
            save()
    finally:
        if ckpt is not None:
            ckpt.close()
    return RunResult(params=state.params, step=int(state.step), data_position=position,
                     finished=finished, history=history, evals=evals,
                     tokens_seen=int(state.step) * (tokens_per_step or 0),
                     seconds=time.time() - start)


def measure_step_seconds(params, model_config: ModelConfig, data: BatchSource, cfg: TrainConfig,
                         *, loss_fn: Callable | None = None, extra: tuple = (), steps: int = 3) -> float:
    """Seconds per train step after compilation, on a throwaway copy of the state."""
    if loss_fn is None:
        loss_fn = functools.partial(lm_loss, config=model_config, compute_dtype=cfg.compute_dtype)
    optimizer = make_optimizer(cfg)
    train_step = make_train_step(loss_fn, optimizer)
    state = init_state(jax.tree_util.tree_map(jnp.array, params), optimizer)
    batch, _ = data.batch(0)
    batch = jnp.asarray(batch)
    state, m = train_step(state, batch, *extra)
    jax.block_until_ready(m)
    t = time.time()
    for _ in range(steps):
        state, m = train_step(state, batch, *extra)
    jax.block_until_ready(m)
    return (time.time() - t) / steps


__all__ = ["CheckpointError", "RunResult", "TrainConfig", "TrainState", "init_state", "lm_loss",
           "make_eval_fn", "make_optimizer", "make_train_step", "measure_step_seconds",
           "stored_train_config", "train"]
