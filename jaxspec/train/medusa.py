"""Training Medusa heads on a target's cached hidden states (Medusa-1: the target stays frozen).

Data: as for Eagle (jaxspec/train/eagle.py): sequences (prompt + the target's own answer,
`selfdistill.py`), the target's final hidden states at every position (`compute_features`), and
VocabTrim head ids (`head_token_ids`). Windows of L positions carry K + 1 more tokens, so every
head has its label: a batch is {"tokens": [B, L+K+1] int32, "features": [B, L+K+1, D] float32,
"valid": [B, L+K+1] bool} (and "answer" [B, L+K+1] bool with `starts`: labels before it are
not counted).

Loss: for positions t < L, head k (k = 1..K) on f_t is classified as x_{t+k+1} over the V' head
tokens (cross-entropy; labels outside V' and padding are ignored), weighted by decay**(k-1)
(Medusa-1's per-head decay, 0.8 in the paper), the sum divided by the sum of weights. Metrics:
loss, ce{k} and top1_{k} per head.

`train(drafter, data, cfg)` runs it through `jaxspec.train.trainer.train` (AdamW, cosine
schedule, orbax checkpoints with exact resume) and returns the trained Medusa.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from jaxspec.speculative.drafters.medusa import Medusa, MedusaConfig, head_logits

# Re-exported: the feature pipeline is Eagle's (same features, same VocabTrim ids).
from jaxspec.train.eagle import compute_features, head_token_ids  # noqa: F401


@dataclasses.dataclass
class MedusaBatches:
    """Fixed-shape batches over (tokens [T], features [T, D]) pairs, a pure function of the
    position: each sequence is cut into windows of `length + num_heads + 1` tokens (one start
    every `length`), and position p is the p-th window of an endless stream of epochs, each a
    seeded permutation (so resume is exact). `starts` (one per item, e.g. prompt lengths) adds
    an "answer" mask [B, win] to each batch, False before the item's start: a loss or metric then
    counts only labels inside the answer (a held-out score that counted a fixed system prompt's
    tokens would flatter the heads). Features before the start still predict answer tokens."""

    items: list
    num_heads: int
    length: int = 128
    batch_size: int = 8
    seed: int = 0
    starts: list | None = None

    def __post_init__(self):
        if self.num_heads < 1 or self.length < 1:
            raise ValueError(f"num_heads and length must be >= 1, got {self.num_heads}, "
                             f"{self.length}")
        self.win = self.length + self.num_heads + 1
        self.windows = []
        for i, (tokens, _) in enumerate(self.items):
            # A window needs at least one position with head 1's label (2 tokens).
            for s in range(0, max(len(tokens) - 2, 0) + 1, self.length):
                if len(tokens) - s >= 3:
                    self.windows.append((i, s))
        if not self.windows:
            raise ValueError("no training windows: the sequences are too short (need >= 3 tokens)")
        if self.starts is not None and len(self.starts) != len(self.items):
            raise ValueError(f"starts needs one entry per item: {len(self.starts)} for "
                             f"{len(self.items)} items")

    def _window(self, w):
        i, s = self.windows[w]
        tokens, feats = self.items[i]
        t, f = tokens[s:s + self.win], feats[s:s + self.win]
        n = len(t)
        out_t = np.zeros(self.win, np.int32)
        out_f = np.zeros((self.win, feats.shape[1]), np.float32)
        out_t[:n], out_f[:n] = t, f
        valid = np.zeros(self.win, bool)
        valid[:n] = True
        answer = valid.copy()
        if self.starts is not None:
            answer[:max(0, self.starts[i] - s)] = False
        return out_t, out_f, valid, answer

    def batch(self, position: int):
        n = len(self.windows)
        rows = []
        for k in range(position, position + self.batch_size):
            epoch, offset = divmod(k, n)
            perm = np.random.default_rng((self.seed, epoch)).permutation(n)
            rows.append(self._window(int(perm[offset])))
        tokens, feats, valid, answer = (np.stack(x) for x in zip(*rows))
        batch = {"tokens": tokens, "features": feats, "valid": valid}
        if self.starts is not None:
            batch["answer"] = answer
        return batch, position + self.batch_size


def make_loss(config: MedusaConfig, head_ids, decay: float = 0.8, lm_head=None):
    """loss(params, batch) -> (loss, metrics) for `trainer.train`.

    params: the trainable heads {"heads": {kernel [K, D, D], bias [K, D]}, "lm_head" [K, V', D]}
    (a "head_ids" entry is ignored: ids are data, pass them here). lm_head: a frozen [K, V', D]
    (or [V', D], shared) used when params has no "lm_head" (train the blocks only)."""
    k_heads = config.num_heads
    head_ids = jnp.asarray(head_ids, jnp.int32)
    to_head = jnp.full((config.vocab_size,), -1, jnp.int32).at[head_ids].set(
        jnp.arange(head_ids.shape[0], dtype=jnp.int32))
    weights = [decay ** k for k in range(k_heads)]
    total_weight = sum(weights)
    if lm_head is not None:
        lm_head = jnp.asarray(lm_head)
        if lm_head.ndim == 2:
            lm_head = jnp.broadcast_to(lm_head, (k_heads, *lm_head.shape))

    def loss_fn(params, batch):
        tokens, feats, valid = batch["tokens"], batch["features"], batch["valid"]  # [B, L+K+1]
        t = tokens.shape[1] - k_heads - 1
        p = {"heads": params["heads"], "lm_head": params.get("lm_head", lm_head)}
        f = feats[:, :t].astype(jnp.float32)                                          # [B, L, D]
        metrics, total = {}, 0.0
        for k in range(1, k_heads + 1):
            logits = head_logits(p, f, heads=(k - 1,))[..., 0, :]                   # [B, L, V']
            label = to_head[tokens[:, k + 1:t + k + 1]]                               # [B, L]
            mask = valid[:, :t] & valid[:, k + 1:t + k + 1] & (label >= 0)
            if "answer" in batch:   # MedusaBatches(starts=): answer labels only
                mask = mask & batch["answer"][:, k + 1:t + k + 1]
            mask = mask.astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0))
            count = jnp.maximum(mask.sum(), 1.0)
            ce_k = (ce * mask).sum() / count
            top1 = ((jnp.argmax(logits, -1) == label) * mask).sum() / count
            total = total + weights[k - 1] * ce_k
            metrics.update({f"ce{k}": ce_k, f"top1_{k}": top1})
        total = total / total_weight
        metrics["loss"] = total
        return total, metrics

    return loss_fn


def trainable(params: dict) -> dict:
    """The trained part of a Medusa's params (everything but the integer head ids)."""
    return {k: v for k, v in params.items() if k != "head_ids"}


def train(drafter: Medusa, data, cfg, *, decay: float = 0.8, **train_kwargs):
    """Train `drafter`'s heads with `jaxspec.train.trainer.train` on dict batches (MedusaBatches).

    Returns (the trained Medusa, the trainer's RunResult). train_kwargs go to trainer.train
    (eval_batches, checkpoint_dir, resume, quiet, ...)."""
    from jaxspec.train.trainer import train as run

    head_ids = drafter.params["head_ids"]
    loss = make_loss(drafter.config, head_ids, decay)
    # The MedusaConfig stands for the model config (checkpoints record it as a dict and a
    # resumed run must have the same one).
    result = run(trainable(drafter.params), drafter.config, data, cfg, loss_fn=loss, **train_kwargs)
    trained = drafter.replace(params=dict(result.params, head_ids=head_ids))
    return trained, result
