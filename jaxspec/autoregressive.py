"""The autoregressive baseline: one prefill, then one `lax.while_loop` of single-token steps.

`autoregressive_tokens` is a pure function on token arrays (callable inside a user's jit) and
the honest baseline speedups are measured against: no drafter, no speculative bookkeeping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec import constraints
from jaxspec.decoding import TokenOutput, prefill, stop_mask
from jaxspec.models.cache import commit
from jaxspec.models.transformer import Model, forward_step, new_cache, unstack_layers
from jaxspec.sampling import Sampling, sample


def autoregressive_tokens(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                          max_new_tokens: int, sampling: Sampling, key: jax.Array,
                          stop_tokens: jax.Array | None = None, limit: jax.Array | None = None,
                          pad_id: int = 0, mesh=None,
                          constraint: constraints.Constraint | None = None) -> TokenOutput:
    """Plain decoding, one target forward per token, as one while_loop.

    prompt_tokens: [B, Tp] right-padded; prompt_lengths: [B]; max_new_tokens: static buffer
    size M; limit: optional [B] (or scalar) dynamic cap <= M; stop_tokens: [K] int32.
    mesh: a js.make_mesh mesh: rows split on "data", the KV cache by batch and KV head.
    constraint: a js.Constraint; each row's logits are masked at its DFA state before every
    draw (stop_tokens should include the constraint's, or a finished match will not stop).
    """
    if mesh is not None:
        from jaxspec.sharding import use_mesh
        with use_mesh(mesh, model.config):
            return autoregressive_tokens(model, prompt_tokens, prompt_lengths, max_new_tokens,
                                         sampling, key, stop_tokens, limit, pad_id,
                                         constraint=constraint)
    from jaxspec.placement import constrain_batch  # no-op unless a mesh is active
    prompt_tokens, prompt_lengths = constrain_batch(prompt_tokens, prompt_lengths)
    if jax.default_backend() == "cpu" and not isinstance(model.params["layers"], (list, tuple)):
        model = model.replace(params=unstack_layers(model.params))  # ~2x faster steps on CPU
    batch, tp = prompt_tokens.shape
    stop_tokens = jnp.zeros((0,), jnp.int32) if stop_tokens is None else stop_tokens
    limit = jnp.broadcast_to(jnp.asarray(max_new_tokens if limit is None else limit, jnp.int32), (batch,))
    cache = new_cache(model, batch, tp + max_new_tokens)   # per-layer buffers beside unstacked layers
    logits, _, cache = prefill(model, prompt_tokens, prompt_lengths, cache)
    dfa = None                                                                 # [B] DFA states
    if constraint is not None:
        dfa = constraints.start_states(constraint, batch)
        logits = constraints.mask_logits(constraint, logits, dfa)
    first = sample(jax.random.fold_in(key, 0), logits, sampling)               # [B]
    if constraint is not None:
        dfa = constraints.advance(constraint, dfa, first)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((batch,), jnp.int32)
    done = stop_mask(first, stop_tokens) | (n_out >= limit)
    steps = jnp.ones((batch,), jnp.int32)
    rows = jnp.arange(batch)

    def cond(state):
        _, _, _, _, done, step, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        cache, last, out, n_out, done, step, steps, dfa = state
        active = ~done
        logits, _, cache = forward_step(model, last[:, None], cache, cache.lengths[:, None])
        cache = commit(cache, active.astype(jnp.int32))
        logits = logits[:, 0]                                                   # [B, V]
        if constraint is not None:
            logits = constraints.mask_logits(constraint, logits, dfa)
        token = sample(jax.random.fold_in(key, step), logits, sampling)         # [B]
        if constraint is not None:
            dfa = jnp.where(active, constraints.advance(constraint, dfa, token), dfa)
        slot = jnp.where(active, n_out, max_new_tokens)                         # dropped if done
        out = out.at[rows, slot].set(token, mode="drop")
        n_out = n_out + active
        done = done | (active & (stop_mask(token, stop_tokens) | (n_out >= limit)))
        last = jnp.where(active, token, last)
        return cache, last, out, n_out, done, step + 1, steps + active, dfa

    state = (cache, first, out, n_out, done, jnp.int32(1), steps, dfa)
    _, _, out, n_out, _, _, steps, _ = jax.lax.while_loop(cond, body, state)
    zeros = jnp.zeros((batch,), jnp.int32)
    return TokenOutput(tokens=out, lengths=n_out, target_steps=steps, drafted=zeros,
                       accepted=zeros, accepted_by_position=zeros[:, None])
