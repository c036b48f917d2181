"""Distillation of a draft model from a target (the FastDraft recipe).

Two ways: `kl_loss` runs the target on every batch (the tiny default pair); `feature_kl_loss`
reads the target's cached final hidden states and greedy tokens (the features the Eagle recipe
caches), for a draft that shares the target's embedding and has a VocabTrim head
(`jaxspec train draft`).

The draft is trained to match the target's next-token distribution at temperature 1,
KL(p_target || q_draft) summed over the vocabulary and averaged over positions, on two kinds
of text: corpus text and text the target itself generated (sampled continuations of short
corpus prompts), which is what the draft will see at inference time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models.cache import KVCache, commit
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import Model, forward, forward_train
from jaxspec.train.trainer import _COMPUTE_DTYPES, cast_params, log


def kl_loss(draft_params, tokens, target_params, *, draft_config: ModelConfig,
            target_config: ModelConfig, compute_dtype: str = "float32"):
    """Mean KL(target || draft) over positions. tokens: [B, T+1] (the last token is unused).

    Returns (kl, {"kl", "loss" (draft cross-entropy on the text), "agree" (argmax match rate)}).
    """
    if draft_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"draft vocab {draft_config.vocab_size} != target vocab "
                         f"{target_config.vocab_size}: distillation needs one tokenizer")
    dt = _COMPUTE_DTYPES[compute_dtype]
    inputs = tokens[:, :-1]                                                    # [B, T]
    t_logits, _ = forward_train(cast_params(target_params, dt), target_config, inputs)
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits), axis=-1)      # [B, T, V]
    d_logits, _ = forward_train(cast_params(draft_params, dt), draft_config, inputs)
    d_logp = jax.nn.log_softmax(d_logits, axis=-1)                             # [B, T, V]
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - d_logp), axis=-1)                 # [B, T]
    kl = jnp.mean(kl)
    ce = -jnp.mean(jnp.take_along_axis(d_logp, tokens[:, 1:, None], axis=-1))
    agree = jnp.mean((jnp.argmax(d_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32))
    return kl, {"kl": kl, "loss": ce, "agree": agree}


def make_kl_loss(draft_config: ModelConfig, target_config: ModelConfig, compute_dtype: str = "float32"):
    return functools.partial(kl_loss, draft_config=draft_config, target_config=target_config,
                             compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=("config", "new_tokens", "temperature"))
def sample_continuations(params, config: ModelConfig, prompts, key, *, new_tokens: int,
                         temperature: float = 1.0):
    """Sample `new_tokens` tokens after each prompt with a KV cache, in one jitted loop.

    prompts: [B, P] int32 (full, no padding) -> [B, P + new_tokens] int32.
    temperature 0 is greedy.
    """
    batch, plen = prompts.shape
    model = Model(config=config, params=params, attn_impl="xla")
    cache = KVCache.create(config, batch, plen + new_tokens, dtype=jax.tree_util.tree_leaves(params)[0].dtype)
    positions = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), (batch, plen))
    logits, _, cache = forward(model, prompts, cache, positions)
    cache = commit(cache, jnp.full((batch,), plen, jnp.int32))
    out = jnp.concatenate([prompts, jnp.zeros((batch, new_tokens), jnp.int32)], axis=1)

    def draw(logits, k):                                                       # [B, V] -> [B]
        if temperature == 0.0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(k, logits / temperature, axis=-1).astype(jnp.int32)

    def body(i, carry):
        out, cache, last_logits, key = carry
        key, k = jax.random.split(key)
        tok = draw(last_logits, k)                                             # [B]
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, plen + i))
        pos = jnp.full((batch, 1), plen + i, jnp.int32)
        logits, _, cache = forward(model, tok[:, None], cache, pos)
        cache = commit(cache, jnp.ones((batch,), jnp.int32))
        return out, cache, logits[:, -1], key

    out, _, _, _ = jax.lax.fori_loop(0, new_tokens, body, (out, cache, logits[:, -1], key))
    return out


def generate_pool(params, config: ModelConfig, corpus: np.ndarray, num_sequences: int,
                  seq_len: int, prompt_len: int = 32, batch_size: int = 32, seed: int = 0,
                  temperature: float = 1.0, console=None) -> np.ndarray:
    """Target-generated sequences [N, seq_len + 1]: random corpus prompts of `prompt_len`
    tokens continued by sampling from the target at `temperature`."""
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    new = seq_len + 1 - prompt_len
    out = []
    for start in range(0, num_sequences, batch_size):
        starts = rng.integers(0, len(corpus) - prompt_len, batch_size)
        prompts = np.stack([corpus[s:s + prompt_len] for s in starts]).astype(np.int32)
        key, k = jax.random.split(key)
        out.append(np.asarray(sample_continuations(params, config, jnp.asarray(prompts), k,
                                                   new_tokens=new, temperature=temperature)))
        if console is not None:
            log(console, f"[distill] generated {min(start + batch_size, num_sequences)}/"
                          f"{num_sequences} sequences")
    return np.concatenate(out)[:num_sequences]


@dataclasses.dataclass(frozen=True)
class MixedBatcher:
    """Each batch is rows from several batch sources (e.g. corpus and generated text).

    The position counts batches: source i serves its batch at position * its batch size.
    """

    sources: tuple

    def batch(self, position: int):
        parts = [src.batch(position * src.batch_size)[0] for src in self.sources]
        return np.concatenate(parts, axis=0), position + 1


def greedy_agreement(draft_params, draft_config: ModelConfig, target_params,
                     target_config: ModelConfig, batches) -> float:
    """Fraction of held-out positions where the draft's argmax equals the target's
    (teacher-forced on the held-out text)."""
    fn = jax.jit(lambda d, t, b: make_kl_loss(draft_config, target_config)(d, b, t)[1]["agree"])
    vals = [float(fn(draft_params, target_params, jnp.asarray(b))) for b in batches]
    return float(np.mean(vals)) if vals else float("nan")


# -- a VocabTrim draft distilled from cached target features (jaxspec train draft) ------------

def feature_kl_loss(params, batch, *, config: ModelConfig, shared: dict, head, head_ids,
                    ce_weight: float = 0.5):
    """Distillation loss of a draft sharing the target's embedding, with a V'-token head, from
    cached target features (no target forward): KL(p_target || q_draft) over the head's V'
    tokens (the target's logits there are features @ head rows, renormalised over V') plus
    `ce_weight` x the draft's cross-entropy on the target's greedy tokens that the head holds.

    params: the draft's own (layers, final_norm); shared: {"embed": [V, D]} (frozen);
    head: [V', D] the target's head rows of head_ids [V']; batch (jaxspec.train.eagle.
    FeatureBatches): tokens [B, T], features [B, T, D] (the target's final normed hidden
    state), valid [B, T], labels [B, T] (the target's greedy next token).
    Returns (loss, {"kl", "ce", "top1": argmax == the target's greedy token, a label outside
    the head counted as a miss}), over valid positions.
    """
    tokens, feats, valid, labels = (batch[k] for k in ("tokens", "features", "valid", "labels"))
    full = dict(params, embed=shared["embed"], lm_head={"kernel": head.T})
    d_logits, _ = forward_train(full, config, tokens)                         # [B, T, V']
    d_logp = jax.nn.log_softmax(d_logits, axis=-1)
    t_logits = jnp.einsum("BTD,VD->BTV", feats.astype(jnp.float32), head.astype(jnp.float32))
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits), axis=-1)    # [B, T, V']
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - d_logp), axis=-1)                 # [B, T]
    # The label's index in the head, -1 when the head lacks it.
    index = jnp.full((shared["embed"].shape[0],), -1, jnp.int32).at[head_ids].set(
        jnp.arange(head_ids.shape[0], dtype=jnp.int32))
    label_index = index[labels]                                                # [B, T]
    held = valid & (label_index >= 0)
    ce = -jnp.take_along_axis(d_logp, jnp.maximum(label_index, 0)[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(valid), 1)
    kl_mean = jnp.sum(jnp.where(valid, kl, 0.0)) / count
    ce_mean = jnp.sum(jnp.where(held, ce, 0.0)) / jnp.maximum(jnp.sum(held), 1)
    top1 = jnp.sum(valid & (jnp.argmax(d_logits, -1) == label_index)) / count
    loss = kl_mean + ce_weight * ce_mean
    return loss, {"kl": kl_mean, "ce": ce_mean, "top1": top1}


def draft_from_target(target_params, target_config: ModelConfig, layers: Sequence[int],
                      head_ids) -> tuple[ModelConfig, dict, dict, jax.Array]:
    """A draft of the target's layer shape whose decoder layers start as copies of the target's
    `layers` (e.g. (0, L - 1): the first sees embeddings as it was trained to, the last feeds the
    final norm and head what they expect). Returns (config, own params {layers, final_norm},
    shared {embed}, head rows [V', D])."""
    from jaxspec.speculative.drafters.eagle import head_rows
    from jaxspec.models.transformer import unstack_layers

    if not layers:
        raise ValueError("a draft needs at least one layer")
    bad = [i for i in layers if not 0 <= i < target_config.num_layers]
    if bad:
        raise ValueError(f"target layers {bad} do not exist (the target has "
                         f"{target_config.num_layers})")
    config = dataclasses.replace(target_config, num_layers=len(layers), tie_word_embeddings=False,
                                 layer_types=None if target_config.layer_types is None else
                                 tuple(target_config.layer_types[i] for i in layers))
    per_layer = target_params["layers"]
    if not isinstance(per_layer, (list, tuple)):
        per_layer = unstack_layers(target_params)["layers"]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs).astype(jnp.float32),
                                     *[per_layer[i] for i in layers])
    own = {"layers": stacked,
           # copies (jnp.array copies): the trainer donates these buffers
           "final_norm": jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32),
                                                target_params["final_norm"])}
    head_ids = jnp.asarray(head_ids, jnp.int32)
    return config, own, {"embed": target_params["embed"].astype(jnp.float32)}, \
        head_rows(target_params, head_ids).astype(jnp.float32)
