"""Generation entry points: the autoregressive baseline and the host-side `generate`.

`autoregressive_tokens` is a pure function on token arrays (callable inside a user's jit): one
prefill, then one `lax.while_loop` of single-token decode steps. `generate` is the convenient
host entry: it validates, tokenizes, buckets shapes so a new prompt length does not recompile,
runs one compiled program (autoregressive or speculative) and detokenizes.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models.cache import KVCache, commit
from jaxspec.models.transformer import Model, forward, lm_head, unstack_layers
from jaxspec.sampling import Sampling, sample

# Number of times each generation program was compiled (tests assert on it).
COMPILATIONS: Counter = Counter()


@struct.dataclass
class TokenOutput:
    """What the token-level generators return (all arrays)."""

    tokens: jax.Array           # [B, M] int32, generated tokens, pad_id after each row's end
    lengths: jax.Array          # [B] int32, generated tokens per row (stop token included)
    target_steps: jax.Array     # [B] int32, target forward passes while the row was active
    drafted: jax.Array          # [B] int32, draft tokens proposed for the row
    accepted: jax.Array         # [B] int32, draft tokens accepted
    accepted_by_position: jax.Array  # [B, K] int32, accepted count per draft position (K>=1)


def prefill(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, cache: KVCache):
    """Run right-padded prompts [B, Tp] through the model and commit them.

    Returns (logits after each row's last prompt token [B, V], hidden there [B, D], cache).
    """
    batch, tp = prompt_tokens.shape
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (batch, tp))
    _, hidden, cache = forward(model, prompt_tokens, cache, positions)
    last = jnp.clip(prompt_lengths - 1, 0, tp - 1)
    rows = jnp.arange(batch)
    cache = commit(cache, prompt_lengths)
    hidden = hidden[rows, last]                                      # [B, D]
    # The LM head on the last positions only: forward's [B, Tp, V] logits are dead code.
    return lm_head(model.params, hidden, model.config), hidden, cache


def stop_mask(tokens: jax.Array, stop_tokens: jax.Array) -> jax.Array:
    """tokens [...] -> bool [...]: is the token one of stop_tokens [K] (K may be 0)."""
    if stop_tokens.shape[0] == 0:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == stop_tokens, axis=-1)


def autoregressive_tokens(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                          max_new_tokens: int, sampling: Sampling, key: jax.Array,
                          stop_tokens: jax.Array | None = None, limit: jax.Array | None = None,
                          pad_id: int = 0, mesh=None) -> TokenOutput:
    """Plain decoding, one target forward per token, as one while_loop.

    prompt_tokens: [B, Tp] right-padded; prompt_lengths: [B]; max_new_tokens: static buffer
    size M; limit: optional [B] (or scalar) dynamic cap <= M; stop_tokens: [K] int32.
    mesh: a js.make_mesh mesh: rows split on "data", the KV cache by batch and KV head.
    """
    if mesh is not None:
        from jaxspec.sharding import use_mesh
        with use_mesh(mesh, model.config):
            return autoregressive_tokens(model, prompt_tokens, prompt_lengths, max_new_tokens,
                                         sampling, key, stop_tokens, limit, pad_id)
    from jaxspec.sharding import constrain_batch  # no-op unless a mesh is active
    prompt_tokens, prompt_lengths = constrain_batch(prompt_tokens, prompt_lengths)
    if jax.default_backend() == "cpu" and not isinstance(model.params["layers"], (list, tuple)):
        model = model.replace(params=unstack_layers(model.params))  # ~2x faster steps on CPU
    batch, tp = prompt_tokens.shape
    stop_tokens = jnp.zeros((0,), jnp.int32) if stop_tokens is None else stop_tokens
    limit = jnp.broadcast_to(jnp.asarray(max_new_tokens if limit is None else limit, jnp.int32), (batch,))
    cache = KVCache.create(model.config, batch, tp + max_new_tokens, model.dtype)
    logits, _, cache = prefill(model, prompt_tokens, prompt_lengths, cache)
    first = sample(jax.random.fold_in(key, 0), logits, sampling)               # [B]
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((batch,), jnp.int32)
    done = stop_mask(first, stop_tokens) | (n_out >= limit)
    steps = jnp.ones((batch,), jnp.int32)
    rows = jnp.arange(batch)

    def cond(state):
        _, _, _, _, done, step, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        cache, last, out, n_out, done, step, steps = state
        active = ~done
        logits, _, cache = forward(model, last[:, None], cache, cache.lengths[:, None])
        cache = commit(cache, active.astype(jnp.int32))
        token = sample(jax.random.fold_in(key, step), logits[:, 0], sampling)   # [B]
        slot = jnp.where(active, n_out, max_new_tokens)                         # dropped if done
        out = out.at[rows, slot].set(token, mode="drop")
        n_out = n_out + active
        done = done | (active & (stop_mask(token, stop_tokens) | (n_out >= limit)))
        last = jnp.where(active, token, last)
        return cache, last, out, n_out, done, step + 1, steps + active

    state = (cache, first, out, n_out, done, jnp.int32(1), steps)
    _, _, out, n_out, _, _, steps = jax.lax.while_loop(cond, body, state)
    zeros = jnp.zeros((batch,), jnp.int32)
    return TokenOutput(tokens=out, lengths=n_out, target_steps=steps, drafted=zeros,
                       accepted=zeros, accepted_by_position=zeros[:, None])


# -- host side --------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerateOutput:
    texts: list[str] | None
    tokens: np.ndarray      # int32 [B, max_new_tokens]
    lengths: np.ndarray     # int32 [B]
    stats: dict[str, Any]
    drafter_state: Any = None  # the drafter's state after the run (e.g. Token Recycling's table)


def bucket(n: int, minimum: int = 16) -> int:
    """The static size used for a dynamic length n: the next power of two >= max(n, minimum)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def encode_prompts(model: Model, prompts: Sequence) -> list[list[int]]:
    """Strings (needs a tokenizer) or token-id lists -> token-id lists; validated."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError("string prompts need a tokenizer, and this model has none "
                                 "(no tokenizer files in its directory): pass token-id lists")
            ids = list(model.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
            bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                 f"[0, {model.config.vocab_size})")
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        encoded.append(ids)
    return encoded


def check_lengths(model: Model, encoded: list[list[int]], max_new_tokens: int, extra: int = 0):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = model.config.max_position_embeddings
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens + extra > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens}"
                + (f" and {extra} draft slots" if extra else "")
                + f" it needs {len(ids) + max_new_tokens + extra} positions, but the model "
                f"supports at most {limit} (max_position_embeddings)")


def stop_token_array(model: Model, stop_tokens) -> np.ndarray:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    for t in stop_tokens or ():
        if not 0 <= int(t) < model.config.vocab_size:
            raise ValueError(f"stop token {t} is outside the vocabulary [0, {model.config.vocab_size})")
        ids.add(int(t))
    return np.asarray(sorted(ids), np.int32)


def pad_token_id(model: Model) -> int:
    c = model.config
    if c.pad_token_id is not None:
        return int(c.pad_token_id)
    return int(c.eos_token_ids[0]) if c.eos_token_ids else 0


class _ProgramCache:
    """Compiled programs keyed by static arguments and argument shapes.

    Compiling ahead of time (lower + compile) lets `generate` report compile time apart from
    decode time; COMPILATIONS counts real compilations per program name.
    """

    def __init__(self):
        self._programs = {}
        self.last_memory_bytes = 0  # arguments + outputs + temporaries of the last program used

    def get(self, name: str, fn, static: tuple, args: tuple):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (name, static, treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves))
        if key not in self._programs:
            start = time.perf_counter()
            compiled = jax.jit(fn, static_argnums=tuple(range(len(static)))).lower(
                *static, *args).compile()
            self._programs[key] = (compiled, time.perf_counter() - start, _program_bytes(compiled))
            COMPILATIONS[name] += 1
            self.last_memory_bytes = self._programs[key][2]
            return compiled, self._programs[key][1]
        self.last_memory_bytes = self._programs[key][2]
        return self._programs[key][0], 0.0


def _program_bytes(compiled) -> int:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return 0


PROGRAMS = _ProgramCache()


def _autoregressive_program(max_new_tokens, pad_id, mesh, model, prompt_tokens, prompt_lengths,
                            sampling, key, stop_tokens, limit):
    return autoregressive_tokens(model, prompt_tokens, prompt_lengths, max_new_tokens, sampling,
                                 key, stop_tokens, limit, pad_id, mesh=mesh)


def generate(model: Model, prompts: Sequence, max_new_tokens: int = 64,
             sampling: Sampling | None = None, drafter=None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, drafter_state=None,
             mesh=None) -> GenerateOutput:
    """Generate continuations of `prompts` (strings or token-id lists).

    drafter=None decodes autoregressively; a drafter (js.DraftModel, js.PromptLookup, ...) runs
    speculative decoding, whose output is exactly what the target alone would produce.
    mesh (js.make_mesh): run sharded; the target is split by jaxspec.sharding.RULES (unless
    already placed on this mesh), the drafter replicated, the prompts split by row on "data".
    """
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a js.Sampling, got {type(sampling).__name__}")
    encoded = encode_prompts(model, prompts)
    slack = 0 if drafter is None else drafter.cache_slack()
    check_lengths(model, encoded, max_new_tokens, slack)
    if drafter is not None:
        drafter.check_compatible(model)
        if hasattr(drafter, "check_positions"):
            drafter.check_positions(max(len(ids) for ids in encoded) + max_new_tokens + slack)
    batch = len(encoded)
    tp = bucket(max(len(ids) for ids in encoded))
    m = bucket(max_new_tokens)
    pad = pad_token_id(model)
    prompt_tokens = np.full((batch, tp), pad, np.int32)
    for i, ids in enumerate(encoded):
        prompt_tokens[i, :len(ids)] = ids
    prompt_lengths = np.asarray([len(ids) for ids in encoded], np.int32)
    stops = stop_token_array(model, stop_tokens)
    key = jax.random.PRNGKey(seed)
    limit = np.full((batch,), max_new_tokens, np.int32)
    if mesh is not None:
        from jaxspec.sharding import prepare_generate
        model, drafter, drafter_state, (prompt_tokens, prompt_lengths, limit) = prepare_generate(
            mesh, model, drafter, drafter_state, (prompt_tokens, prompt_lengths, limit))
    program_model = model.replace(tokenizer=None)  # host-only: not part of the program's key
    if isinstance(getattr(drafter, "model", None), Model):
        drafter = drafter.replace(model=drafter.model.replace(tokenizer=None))
    if drafter is None:
        args = (program_model, prompt_tokens, prompt_lengths, sampling, key, stops, limit)
        program, compile_s = PROGRAMS.get("autoregressive", _autoregressive_program, (m, pad, mesh), args)
    else:
        from jaxspec.speculative.loop import speculative_program
        args = (program_model, drafter, prompt_tokens, prompt_lengths, sampling, key, stops, limit,
                drafter_state)
        program, compile_s = PROGRAMS.get("speculative", speculative_program, (m, pad, mesh), args)
    start = time.perf_counter()
    result = program(*args)
    result = jax.block_until_ready(result)
    elapsed = time.perf_counter() - start
    out = result[0] if isinstance(result, tuple) else result
    tokens = np.array(out.tokens)[:, :max_new_tokens]
    lengths = np.minimum(np.asarray(out.lengths), max_new_tokens)
    for i in range(batch):
        tokens[i, lengths[i]:] = pad
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                 for i in range(batch)]
    stats = _stats(out, lengths, elapsed, compile_s)
    return GenerateOutput(texts=texts, tokens=tokens, lengths=lengths, stats=stats,
                          drafter_state=result[1] if isinstance(result, tuple) else None)


def _stats(out: TokenOutput, lengths: np.ndarray, elapsed: float, compile_s: float) -> dict:
    steps = np.asarray(out.target_steps)
    drafted = np.asarray(out.drafted)
    accepted = np.asarray(out.accepted)
    by_position = np.asarray(out.accepted_by_position)
    rounds = np.maximum(steps - 1, 0)  # speculative rounds after the prefill
    return {
        "target_steps": steps.tolist(),
        "drafted": drafted.tolist(),
        "accepted": accepted.tolist(),
        "accepted_by_position": by_position.tolist(),
        "mean_accepted": float(accepted.sum() / max(rounds.sum(), 1)) if drafted.sum() else 0.0,
        "acceptance_rate": float(accepted.sum() / drafted.sum()) if drafted.sum() else 0.0,
        "tokens_per_step": float(lengths.sum() / max(steps.sum(), 1)),
        "generated_tokens": int(lengths.sum()),
        "seconds": elapsed,
        "compile_seconds": compile_s,
        "tokens_per_s": float(lengths.sum() / elapsed) if elapsed > 0 else float("inf"),
    }
