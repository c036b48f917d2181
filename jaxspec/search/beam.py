"""Beam search and Diverse Beam Search as one jitted program over token arrays.

Beams are a batch dimension: the K beams of B prompts run as G * B * S model rows (G groups of
S = K / G beams, row (g, b, s) at flat index (g * B + b) * S + s), one prefill per prompt, then one
`lax.while_loop` of single-token steps. After each step every row's KV cache is replaced by its
parent beam's (a gather over the beam axis). Finished hypotheses live in a fixed-size pool of S
per (group, prompt): static shapes throughout.

Scoring follows transformers' `_beam_search` (5.x) so that results compare token for token:

  score(beam)      sum of its tokens' log-probabilities (log_softmax of the float32 logits)
  candidates       per prompt (and group), the top C = max(2, 1 + n_stop) * S of
                   score(beam) + log p(token) over S beams x V tokens, best first
  finished         a candidate whose token is a stop token, or that reaches the length limit;
                   only one ranked in the top S enters the pool, with score
                   sum_logprobs / generated_length ** length_penalty (generated tokens, stop token
                   included, prompt excluded); the pool keeps its S best
  running          the S best candidates that did not finish continue
  early_stopping   True: a prompt is done once S hypotheses are finished. False: done once the
                   best running beam's score / current generated length ** length_penalty cannot
                   beat the worst finished score (transformers' heuristic). "never": the same
                   test, but with length_penalty > 0 against max_new_tokens ** length_penalty (the
                   exact bound: running scores only fall). Every mode stops at the length limit.
  initial beams    beam 0 starts at score 0, the others at -1e9, so step 0 expands one copy of
                   the prompt (transformers' convention, constant included)

Diverse Beam Search (Vijayakumar et al., 2018), num_beam_groups = G > 1: at each step the groups
choose in order; group g's log-probabilities are lowered by diversity_penalty x (number of beams
of earlier, not yet done groups of the same prompt that chose the token at this step): Hamming
diversity. Each group is otherwise its own beam search of S beams with its own pool, accumulating
the penalised log-probabilities (as transformers' group beam search did before 5.x moved it to
the Hub); the returned hypotheses are the best across all groups' pools.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.decoding import prefill, stop_mask
from jaxspec.models.cache import KVCache, commit
from jaxspec.models.transformer import Model, forward_step, new_cache, unstack_layers

# transformers' stand-in for minus infinity in beam scores (finite: sums of it stay ordered).
NEG = -1.0e9

# early_stopping as the int32 code the program takes (a dynamic value: one compiled program
# serves every mode).
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


@struct.dataclass
class BeamOutput:
    """Beam search results, best first per prompt (all arrays)."""

    tokens: jax.Array        # [B, R, M] int32, generated tokens, pad_id after each end
    lengths: jax.Array       # [B, R] int32, generated tokens (stop token included)
    scores: jax.Array        # [B, R] float32, sum of log-probs / length ** length_penalty
    target_steps: jax.Array  # [B] int32, target forward passes while the prompt was searched


@struct.dataclass
class _Groups:
    """Search state of every group, leading axes [G, B, S] (M = token buffer size)."""

    running_tokens: jax.Array    # [G, B, S, M] int32
    running_scores: jax.Array    # [G, B, S] float32, summed log-probs of the running beams
    finished_tokens: jax.Array   # [G, B, S, M] int32
    finished_scores: jax.Array   # [G, B, S] float32, length-penalised; NEG in empty slots
    finished_lengths: jax.Array  # [G, B, S] int32
    is_finished: jax.Array       # [G, B, S] bool, slot holds a hypothesis
    open: jax.Array              # [G, B] bool, finished hypotheses may still improve


def check_beam_arguments(num_beams, num_return_sequences=1, num_beam_groups=1,
                         diversity_penalty=0.0, length_penalty=1.0, early_stopping=False) -> None:
    """Refuse beam-search settings that are wrong, with what would be accepted.

    diversity_penalty and length_penalty are checked only when they are Python numbers (inside a
    user's jit they may be traced)."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an integer between 1 and num_beams "
                         f"({num_beams}), got {num_return_sequences!r}")
    if not is_int(num_beam_groups) or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beam_groups must be an integer >= 1 that divides num_beams "
                         f"({num_beams}) so every group has num_beams / num_beam_groups beams, "
                         f"got {num_beam_groups!r}")
    if isinstance(diversity_penalty, (int, float)):
        if not math.isfinite(diversity_penalty) or diversity_penalty < 0:
            raise ValueError(f"diversity_penalty must be a finite number >= 0, got "
                             f"{diversity_penalty!r}")
        if diversity_penalty != 0 and num_beam_groups == 1:
            raise ValueError(f"diversity_penalty={diversity_penalty!r} has no effect with "
                             "num_beam_groups=1: set num_beam_groups > 1 (Diverse Beam Search) "
                             "or diversity_penalty=0.0")
    if isinstance(length_penalty, (int, float)) and (
            isinstance(length_penalty, bool) or not math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    early_stopping_code(early_stopping)


def early_stopping_code(early_stopping) -> int:
    """True / False / "never" -> the program's int32 code (EARLY_STOPPING_CODES)."""
    for value, code in EARLY_STOPPING_CODES.items():
        if early_stopping is value or (isinstance(early_stopping, str) and early_stopping == value):
            return code
    raise ValueError(f"early_stopping must be True, False or \"never\", got {early_stopping!r}")


def _group_step(state: _Groups, logprobs, t, limit, stop_tokens, length_penalty, early_code):
    """One beam-search step of one group (transformers' `_beam_search` body, batched).

    state: one group's slice (leading axes [B, S]); logprobs: [B, S, V] (penalised for
    diversity); t: tokens generated before this step (scalar); limit: [B].
    Returns (state, new running tokens [B, S], their parent beams [B, S]).
    """
    batch, s, v = logprobs.shape
    m = state.running_tokens.shape[-1]
    n_stop = stop_tokens.shape[-1]
    c = min(max(2, 1 + n_stop) * s, s * v)
    total = (state.running_scores[:, :, None] + logprobs).reshape(batch, s * v)
    cand_scores, flat = jax.lax.top_k(total, c)                          # [B, C], best first
    parent, token = flat // v, flat % v                                  # [B, C]
    cand_tokens = jnp.take_along_axis(state.running_tokens, parent[:, :, None], axis=1)  # [B, C, M]
    cand_tokens = jnp.where(jnp.arange(m) == t, token[:, :, None], cand_tokens)
    length = t + 1                                                       # generated, this token incl.
    stops = stop_mask(token, stop_tokens) | (length >= limit)[:, None]   # [B, C]

    # The S best candidates that did not stop keep running.
    run_scores, pick = jax.lax.top_k(cand_scores + NEG * stops, s)       # [B, S]
    running_tokens = jnp.take_along_axis(cand_tokens, pick[:, :, None], axis=1)
    new_token = jnp.take_along_axis(token, pick, axis=1)
    new_parent = jnp.take_along_axis(parent, pick, axis=1)

    # Stopped candidates ranked in the top S enter the pool, unless the prompt is done.
    lp = jnp.asarray(length_penalty, jnp.float32)
    enters = stops & (jnp.arange(c) < s)[None, :]                        # [B, C]
    full = jnp.all(state.is_finished, axis=-1) & (early_code == 1)       # [B]
    closed = full | ~state.open
    entry_scores = (cand_scores / jnp.asarray(length, jnp.float32) ** lp
                    + NEG * closed[:, None] + NEG * ~enters)
    merged_scores = jnp.concatenate([state.finished_scores, entry_scores], axis=1)  # [B, S + C]
    keep_scores, keep = jax.lax.top_k(merged_scores, s)
    merged_tokens = jnp.concatenate([state.finished_tokens, cand_tokens], axis=1)
    merged_lengths = jnp.concatenate([state.finished_lengths, jnp.full((batch, c), length, jnp.int32)], axis=1)
    merged_flags = jnp.concatenate([state.is_finished, enters], axis=1)
    finished_tokens = jnp.take_along_axis(merged_tokens, keep[:, :, None], axis=1)
    finished_lengths = jnp.take_along_axis(merged_lengths, keep, axis=1)
    is_finished = jnp.take_along_axis(merged_flags, keep, axis=1)

    # Can a running beam still beat the worst finished hypothesis?
    hyp_length = jnp.where((early_code == 2) & (lp > 0), limit, length).astype(jnp.float32)
    best_running = run_scores[:, 0] / hyp_length ** lp                   # [B]
    worst = jnp.where(is_finished, jnp.min(keep_scores, axis=-1, keepdims=True), NEG)
    improvable = jnp.any(best_running[:, None] > worst, axis=-1)
    open_ = state.open & improvable & (length < limit)
    state = _Groups(running_tokens=running_tokens, running_scores=run_scores,
                    finished_tokens=finished_tokens, finished_scores=keep_scores,
                    finished_lengths=finished_lengths, is_finished=is_finished, open=open_)
    return state, new_token, new_parent


def _searching(groups: _Groups, early_code) -> jax.Array:
    """[G, B] bool: the group of the prompt is still searching."""
    full = jnp.all(groups.is_finished, axis=-1) & (early_code == 1)
    return groups.open & ~full


def _step(groups: _Groups, logprobs, t, limit, stop_tokens, length_penalty, early_code,
          diversity_penalty):
    """One step of every group in order; logprobs [G, B, S, V]. Returns (groups, tokens
    [G, B, S], parents [G, B, S])."""
    searching = _searching(groups, early_code)                           # [G, B], before the step
    counts = jnp.zeros(logprobs.shape[1:2] + logprobs.shape[3:], jnp.float32)  # [B, V]
    penalty = jnp.asarray(diversity_penalty, jnp.float32)

    def group(counts, inputs):
        state, lp_g, active = inputs
        state, token, parent = _group_step(state, lp_g - penalty * counts[:, None, :], t, limit,
                                           stop_tokens, length_penalty, early_code)
        chosen = jax.nn.one_hot(token, lp_g.shape[-1], dtype=jnp.float32).sum(axis=1)  # [B, V]
        return counts + chosen * active[:, None], (state, token, parent)

    _, (groups, tokens, parents) = jax.lax.scan(group, counts, (groups, logprobs, searching))
    return groups, tokens, parents


def beam_search_tokens(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                       max_new_tokens: int, num_beams: int, length_penalty=1.0,
                       early_stopping=False, num_return_sequences: int = 1,
                       num_beam_groups: int = 1, diversity_penalty=0.0,
                       stop_tokens: jax.Array | None = None, limit: jax.Array | None = None,
                       pad_id: int = 0) -> BeamOutput:
    """Beam search (Diverse Beam Search with num_beam_groups > 1) as one while_loop; jittable.

    prompt_tokens: [B, Tp] right-padded; prompt_lengths: [B]; max_new_tokens: static buffer size
    M; limit: optional [B] (or scalar) dynamic cap <= M on the generated length; stop_tokens:
    [K] shared or [B, K] per row (-1 padded). Static: max_new_tokens, num_beams,
    num_return_sequences, num_beam_groups, pad_id. Dynamic (arrays allowed): length_penalty,
    diversity_penalty, limit, and early_stopping given as its EARLY_STOPPING_CODES code.
    Returns the num_return_sequences best hypotheses per prompt, best first.
    """
    check_beam_arguments(num_beams, num_return_sequences, num_beam_groups, diversity_penalty,
                         length_penalty, early_stopping if isinstance(early_stopping, (bool, str))
                         else False)
    early_code = jnp.asarray(early_stopping_code(early_stopping)
                             if isinstance(early_stopping, (bool, str)) else early_stopping, jnp.int32)
    if jax.default_backend() == "cpu" and not isinstance(model.params["layers"], (list, tuple)):
        model = model.replace(params=unstack_layers(model.params))  # see autoregressive.py
    batch, tp = prompt_tokens.shape
    g, s = num_beam_groups, num_beams // num_beam_groups
    m = max_new_tokens
    stop_tokens = jnp.zeros((0,), jnp.int32) if stop_tokens is None else jnp.asarray(stop_tokens, jnp.int32)
    limit = jnp.broadcast_to(jnp.asarray(m if limit is None else limit, jnp.int32), (batch,))

    cache = new_cache(model, batch, tp + m)
    logits, _, cache = prefill(model, prompt_tokens, prompt_lengths, cache)   # [B, V]
    rows = jnp.broadcast_to(jnp.arange(batch)[None, :, None], (g, batch, s))  # prompt of each beam
    cache = _gather_rows(cache, rows.reshape(-1))
    logprobs = jnp.broadcast_to(jax.nn.log_softmax(logits)[None, :, None], (g, batch, s, logits.shape[-1]))

    first = jnp.zeros((s,), jnp.float32).at[1:].set(NEG)
    groups = _Groups(
        running_tokens=jnp.full((g, batch, s, m), pad_id, jnp.int32),
        running_scores=jnp.broadcast_to(first, (g, batch, s)),
        finished_tokens=jnp.full((g, batch, s, m), pad_id, jnp.int32),
        finished_scores=jnp.full((g, batch, s), NEG, jnp.float32),
        finished_lengths=jnp.zeros((g, batch, s), jnp.int32),
        is_finished=jnp.zeros((g, batch, s), bool),
        open=jnp.ones((g, batch), bool))
    step_args = (limit, stop_tokens, length_penalty, early_code, diversity_penalty)
    groups, tokens, parents = _step(groups, logprobs, 0, *step_args)
    steps = jnp.ones((batch,), jnp.int32)
    beam_offset = (jnp.arange(g)[:, None, None] * batch + jnp.arange(batch)[None, :, None]) * s

    def cond(state):
        groups, _, _, _, _, t = state
        return (t < m) & jnp.any(_searching(groups, early_code))

    def body(state):
        groups, tokens, parents, cache, steps, t = state
        active = jnp.any(_searching(groups, early_code), axis=0)                 # [B]
        cache = _gather_rows(cache, (beam_offset + parents).reshape(-1))         # parents' K/V
        flat = tokens.reshape(-1, 1)                                             # [G*B*S, 1]
        logits, _, cache = forward_step(model, flat, cache, cache.lengths[:, None])
        cache = commit(cache, jnp.ones_like(cache.lengths))
        logprobs = jax.nn.log_softmax(logits[:, 0]).reshape(g, batch, s, -1)     # [G, B, S, V]
        groups, tokens, parents = _step(groups, logprobs, t, *step_args)
        return groups, tokens, parents, cache, steps + active, t + 1

    state = (groups, tokens, parents, cache, steps, jnp.int32(1))
    groups, _, _, _, steps, _ = jax.lax.while_loop(cond, body, state)

    # The best hypotheses across every group's pool, best first.
    def across_groups(x):  # [G, B, S, ...] -> [B, G * S, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(batch, g * s, *x.shape[3:])

    scores, best = jax.lax.top_k(across_groups(groups.finished_scores), num_return_sequences)
    tokens = jnp.take_along_axis(across_groups(groups.finished_tokens), best[:, :, None], axis=1)
    lengths = jnp.take_along_axis(across_groups(groups.finished_lengths), best, axis=1)
    return BeamOutput(tokens=tokens, lengths=lengths, scores=scores, target_steps=steps)


def _gather_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache whose row i is row rows[i] of `cache` (rows: [N] int32)."""
    if cache.per_layer:
        return cache.replace(k=tuple(b[rows] for b in cache.k), v=tuple(b[rows] for b in cache.v),
                             lengths=cache.lengths[rows])
    return cache.replace(k=cache.k[:, rows], v=cache.v[:, rows], lengths=cache.lengths[rows])
