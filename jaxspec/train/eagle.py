"""Training an Eagle drafter on a target's cached hidden states (self-distillation).

Data: sequences (chat prompt + the target's own greedy answer, `selfdistill.py`) and the target's
final hidden states at every position, computed once (`compute_features`) and kept in memory as
bfloat16. VocabTrim: the drafter's head keeps the V' most frequent tokens of the answers
(`head_token_ids`).

Loss per position p (EAGLE-1's, with one step of EAGLE-3's "training-time test"):
  step 1: input fc([f_p ; e(x_{p+1})]) -> h_p, regressed on f_{p+1} (smooth L1) and classified
          as the target's greedy token after x_{p+1} (= x_{p+2} on the target's own greedy text;
          `labels` from `compute_features(..., labels=True)` on any other text) over the V' head
          tokens (cross-entropy, weight `ce_weight`; with `soft_labels`, cross-entropy against the
          target's own distribution over the V' head tokens, softmax(head(f_{p+1})), as EAGLE's
          and EAGLE-3's reference trainers do, instead of its greedy token alone);
  step 2: input fc([h_p ; e(x_{p+2})]) at position p+1, attending to step 1's keys of positions
          <= p and to itself -- exactly what drafting a second token sees -- -> h2_p, regressed on
          f_{p+2} and classified as the target's greedy token after x_{p+2}; weighted by `second_step_weight`.
Training runs through `jaxspec.train.trainer.train` (optax AdamW, cosine schedule, orbax
checkpoints with exact resume, rich progress).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspec.models.transformer import _dense, _mlp, _norm, _qkv, forward_train
from jaxspec.speculative.drafters.eagle import draft_features, head_logits


def compute_features(target, seqs, max_len: int = 320, batch_size: int = 8, log=print,
                     labels: bool = False):
    """[(tokens [T] int32, features [T, D] bfloat16)] for (sequence, prompt length) pairs; with
    labels, a third array [T] int32: the target's greedy token after each position (so text the
    target did not write still teaches what the target would say).

    Sequences are truncated to max_len and batched by length (padded to a multiple of 64)."""
    import ml_dtypes

    def run(params, tokens):
        logits, hidden = forward_train(params, target.config, tokens)
        return hidden, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    fwd = jax.jit(run)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [None] * len(seqs)
    start = time.perf_counter()
    done_tokens = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        length = min(max_len, max(len(seqs[i][0]) for i in idx))
        padded = int(math.ceil(length / 64) * 64)
        tokens = np.zeros((batch_size, padded), np.int32)
        for j, i in enumerate(idx):
            t = seqs[i][0][:max_len]
            tokens[j, :len(t)] = t
        hidden, greedy = fwd(target.params, jnp.asarray(tokens))
        hidden, greedy = np.asarray(hidden, np.float32), np.asarray(greedy)
        for j, i in enumerate(idx):
            t = seqs[i][0][:max_len]
            item = (np.asarray(t, np.int32), hidden[j, :len(t)].astype(ml_dtypes.bfloat16))
            out[i] = item + (greedy[j, :len(t)].astype(np.int32),) if labels else item
            done_tokens += len(t)
        if (b // batch_size) % 10 == 0:
            log(f"features: {b + len(idx)}/{len(seqs)} sequences, "
                f"{done_tokens / (time.perf_counter() - start):.0f} tokens/s")
    return out


def head_token_ids(seqs, vocab_size: int, num_tokens: int, always=()) -> np.ndarray:
    """VocabTrim: the `num_tokens` most frequent ids of the sequences (ties by id), plus `always`."""
    counts = np.zeros(vocab_size, np.int64)
    for tokens, *_ in seqs:
        np.add.at(counts, np.asarray(tokens), 1)
    for t in always:
        counts[t] = counts.max() + 1
    order = np.lexsort((np.arange(vocab_size), -counts))
    return np.sort(order[:num_tokens]).astype(np.int32)


@dataclasses.dataclass
class FeatureBatches:
    """Fixed-shape batches over (tokens, features) pairs, a pure function of the position.

    Each sequence is cut into windows of `length + 3` tokens; position p is the p-th window of an
    endless stream of epochs, each a seeded permutation (so resume is exact). `starts` (one per
    item, e.g. prompt lengths) marks the tokens before it not valid, so a loss or metric counts
    only the predictions of later tokens (an answer's): a held-out score that counted the
    prompt's tokens (a fixed system prompt, predicted almost perfectly) would flatter the drafter."""

    items: list
    length: int = 128
    batch_size: int = 8
    seed: int = 0
    starts: list | None = None

    def __post_init__(self):
        win = self.length + 3
        self.windows = []
        for i, item in enumerate(self.items):
            tokens = item[0]
            for s in range(0, max(len(tokens) - 3, 1), self.length):
                if len(tokens) - s >= 8:
                    self.windows.append((i, s))
        if not self.windows:
            raise ValueError("no training windows: the sequences are too short")
        if self.starts is not None and len(self.starts) != len(self.items):
            raise ValueError(f"starts needs one entry per item: {len(self.starts)} for "
                             f"{len(self.items)} items")
        self.win = win

    def _window(self, w):
        i, s = self.windows[w]
        tokens, feats = self.items[i][:2]
        t = tokens[s:s + self.win]
        f = feats[s:s + self.win]
        n = len(t)
        out_t = np.zeros(self.win, np.int32)
        out_f = np.zeros((self.win, feats.shape[1]), np.float32)
        out_t[:n], out_f[:n] = t, f
        valid = np.zeros(self.win, bool)
        valid[:n] = True
        if self.starts is not None:
            valid[:max(0, self.starts[i] - s)] = False
        # The target's greedy next token at each position (the tokens' own shift when absent).
        out_l = np.zeros(self.win, np.int32)
        if len(self.items[i]) > 2:
            out_l[:n] = self.items[i][2][s:s + self.win]
        else:
            out_l[:n - 1] = t[1:]
        return out_t, out_f, valid, out_l

    def batch(self, position: int):
        n = len(self.windows)
        rows = []
        for k in range(position, position + self.batch_size):
            epoch, offset = divmod(k, n)
            perm = np.random.default_rng((self.seed, epoch)).permutation(n)
            rows.append(self._window(int(perm[offset])))
        tokens, feats, valid, labels = (np.stack(x) for x in zip(*rows))
        return ({"tokens": tokens, "features": feats, "valid": valid, "labels": labels},
                position + self.batch_size)


def _scores(q, k, allowed, scale):
    """q: [B, T, H, Dh]; k: [B, S, Hkv, Dh] (token-major; no cache here); allowed: [T, S] -> masked scores [B, Hkv, G, T, S]."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k) * scale
    return jnp.where(allowed, scores, -1e30)


def _finish(params, config, x, attended):
    """Output projection, residual and MLP. attended: [B, T, Hkv, G, Dh]."""
    lp = params["layer"]
    out = attended.reshape(*x.shape[:2], -1)
    x = x + _dense(out, lp["o"])
    return x + _mlp(_norm(x, lp["mlp_norm"], config), lp, config)


def step_one(params, config, x1, positions):
    """The decoder layer on true-feature inputs x1 [B, T, D] (causal). Returns h1 and its K/V."""
    lp = params["layer"]
    t = x1.shape[1]
    q1, k1, v1 = _qkv(_norm(x1, lp["attn_norm"], config), lp, positions, config)
    s1 = _scores(q1, k1, jnp.tril(jnp.ones((t, t), bool)), 1.0 / math.sqrt(config.head_dim))
    o1 = jnp.einsum("BKGTS,BSKD->BTKGD", jax.nn.softmax(s1, axis=-1), v1)
    return _finish(params, config, x1, o1), (k1, v1)


def step_two(params, config, x2, positions, k1, v1):
    """The layer on second-step inputs x2 [B, T, D]: query i sits at position i + 1 and sees
    step one's keys j <= i and its own key -- what drafting the second token sees."""
    lp = params["layer"]
    b, t, _ = x2.shape
    scale = 1.0 / math.sqrt(config.head_dim)
    q2, k2, v2 = _qkv(_norm(x2, lp["attn_norm"], config), lp, positions + 1, config)
    hkv, groups = config.num_kv_heads, config.num_heads // config.num_kv_heads
    s2 = _scores(q2, k1, jnp.tril(jnp.ones((t, t), bool)), scale)                  # [B,K,G,T,T]
    own = jnp.einsum("BTKGD,BTKD->BKGT", q2.reshape(b, t, hkv, groups, -1), k2) * scale
    w = jax.nn.softmax(jnp.concatenate([s2, own[..., None]], axis=-1), axis=-1)  # [B,K,G,T,T+1]
    o2 = (jnp.einsum("BKGTS,BSKD->BTKGD", w[..., :t], v1)
          + jnp.einsum("BKGT,BTKD->BTKGD", w[..., t], v2))
    return _finish(params, config, x2, o2)


def make_loss(config, embed, head_ids, ce_weight: float = 0.5, second_step_weight: float = 0.5,
              head=None, soft_labels: bool = False, logit_softcap: float | None = None):
    """loss(params, batch) for `trainer.train`; embed: the target's [V, D] embedding (frozen);
    head: the target's LM-head rows of head_ids [V', D] (default: embed[head_ids], tied).
    soft_labels: classify against the target's distribution over the head's tokens (from the
    cached feature f_{p+step}, renormalised over V') rather than its greedy token; `ce{step}` then
    reports that soft cross-entropy and `top1_{step}` still scores the greedy token.
    logit_softcap: the target's final_logit_softcap (Gemma 2/3), applied to the teacher's logits
    so that the soft labels are the target's own distribution."""
    vocab = embed.shape[0]
    to_head = jnp.full((vocab,), -1, jnp.int32).at[head_ids].set(jnp.arange(head_ids.shape[0]))
    head = embed[head_ids] if head is None else head                                 # [V', D]

    def loss_fn(params, batch):
        tokens, feats, valid = batch["tokens"], batch["features"], batch["valid"]   # [B, L+3], ...
        t = tokens.shape[1] - 3
        b = tokens.shape[0]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        f = feats.astype(jnp.float32)
        x1 = draft_features(params, config, f[:, :t], embed[tokens[:, 1:t + 1]])
        h1, (k1, v1) = step_one(params, config, x1, positions)
        x2 = draft_features(params, config, h1, embed[tokens[:, 2:t + 2]])
        h2 = step_two(params, config, x2, positions, k1, v1)
        metrics = {}
        total = 0.0
        for step, (h, weight) in enumerate(((h1, 1.0), (h2, second_step_weight)), start=1):
            target_f = f[:, step:t + step]
            # What the target would say after position p + step (its greedy token there).
            greedy = batch["labels"] if "labels" in batch else tokens[:, 1:]
            label = to_head[greedy[:, step:t + step]]                                 # [B, T]
            mask = valid[:, step + 1:t + step + 1].astype(jnp.float32)
            reg = jnp.mean(optax.huber_loss(h, target_f, delta=1.0), axis=-1)           # [B, T]
            logits = head_logits(head, h)                                           # [B, T, V']
            ce_mask = mask * (label >= 0)
            n, n_ce = jnp.maximum(mask.sum(), 1.0), jnp.maximum(ce_mask.sum(), 1.0)
            if soft_labels:
                teacher_logits = head_logits(head, target_f)                           # [B, T, V']
                if logit_softcap is not None:
                    teacher_logits = jnp.tanh(teacher_logits / logit_softcap) * logit_softcap
                teacher = jax.nn.softmax(teacher_logits, axis=-1)                     # [B, T, V']
                ce = optax.softmax_cross_entropy(logits, teacher)                      # [B, T]
                ce_l = (ce * mask).sum() / n
            else:
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0))
                ce_l = (ce * ce_mask).sum() / n_ce
            reg_l = (reg * mask).sum() / n
            top1 = ((jnp.argmax(logits, -1) == label) * ce_mask).sum() / n_ce
            total = total + weight * (reg_l + ce_weight * ce_l)
            metrics.update({f"reg{step}": reg_l, f"ce{step}": ce_l, f"top1_{step}": top1})
        metrics["loss"] = total
        return total, metrics

    return loss_fn
