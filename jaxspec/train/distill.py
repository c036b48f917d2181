"""Distillation of a draft model from a target (the FastDraft recipe).

The draft is trained to match the target's next-token distribution at temperature 1,
KL(p_target || q_draft) summed over the vocabulary and averaged over positions, on two kinds
of text: corpus text and text the target itself generated (sampled continuations of short
corpus prompts), which is what the draft will see at inference time.
"""

from __future__ import annotations

import dataclasses
import functools

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
