"""Host entries: `js.generate` validates, tokenizes, buckets shapes so a new prompt length does
not recompile, runs one compiled program (autoregressive or speculative) and detokenizes.

The programs themselves are pure functions on token arrays: `jaxspec.autoregressive` and
`jaxspec.speculative.loop`; they are compiled once per static shape through
`jaxspec.decoding.PROGRAMS`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxspec import chat
from jaxspec import decoding
from jaxspec.constraints import Constraint
from jaxspec.autoregressive import autoregressive_tokens
from jaxspec.decoding import TokenOutput, bucket
from jaxspec.models.transformer import Model
from jaxspec.sampling import Sampling
from jaxspec.speculative.drafters.base import check_drafter
from jaxspec.speculative.loop import speculative_program
from jaxspec.search.beam import beam_search_tokens, check_beam_arguments, early_stopping_code


@dataclasses.dataclass
class GenerateOutput:
    """What `js.generate` returns.

    texts:   the generated text per prompt (prompt not repeated), None without a tokenizer
    tokens:  int32 [B, max_new_tokens], generated tokens only, padded after each row's end
    lengths: int32 [B], generated tokens per row (a stop token included when hit)
    stats:   target_steps, drafted, accepted (per row), mean_accepted (draft tokens accepted per
             speculative round), acceptance_rate, tokens_per_step, generated_tokens, seconds and
             tokens_per_s (decoding only), compile_seconds (0 when the program was cached)
    drafter_state: the drafter's state after the run (e.g. Token Recycling's matrix), to pass
             back as `drafter_state=`
    """

    texts: list[str] | None
    tokens: np.ndarray      # int32 [B, max_new_tokens]
    lengths: np.ndarray     # int32 [B]
    stats: dict[str, Any]
    drafter_state: Any = None  # the drafter's state after the run (e.g. Token Recycling's table)


def encode_prompts(model: Model, prompts: Sequence) -> list[list[int]]:
    """Strings (needs a tokenizer), conversations (chat template applied) or token-id lists ->
    token-id lists; validated."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings, of conversations (lists of "
                         '{"role", "content"} dicts) or of token-id lists')
    if chat.is_conversation(prompts):
        raise ValueError("prompts is a single conversation; pass a list of them: [conversation]")
    encoded = []
    for i, prompt in enumerate(prompts):
        if chat.is_conversation(prompt):
            ids = chat.encode_conversation(model.tokenizer, prompt, i)
        elif isinstance(prompt, str):
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


def check_seed(seed) -> None:
    """Refuse a seed jax.random.PRNGKey would choke on (floats, strings) or misread (bools)."""
    is_int = isinstance(seed, (int, np.integer)) or (
        np.ndim(seed) == 0 and np.issubdtype(getattr(seed, "dtype", np.float64), np.integer))
    if isinstance(seed, (bool, np.bool_)) or not is_int:
        raise ValueError(f"seed must be an integer (e.g. seed=0), got {seed!r} "
                         f"of type {type(seed).__name__}")


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


def _autoregressive_program(max_new_tokens, pad_id, mesh, model, prompt_tokens, prompt_lengths,
                            sampling, key, stop_tokens, limit, constraint=None):
    return autoregressive_tokens(model, prompt_tokens, prompt_lengths, max_new_tokens, sampling,
                                 key, stop_tokens, limit, pad_id, mesh=mesh, constraint=constraint)


def check_constraint(model: Model, constraint) -> Constraint | None:
    """Refuse what is not a js.Constraint or does not fit the model's vocabulary; a table built
    for a smaller vocabulary (the tokenizer's, under a padded embedding) is widened with -1."""
    if constraint is None:
        return None
    if not isinstance(constraint, Constraint):
        raise ValueError("constraint must be None or a js.Constraint (js.Constraint.regex(pattern, "
                         f"model) or js.Constraint.json_schema(schema, model)), got "
                         f"{type(constraint).__name__}")
    width, vocab = constraint.vocab_size, model.config.vocab_size
    if width > vocab:
        raise ValueError(f"the constraint was built for a vocabulary of {width} tokens but the "
                         f"model has {vocab}: build it with this model's tokenizer "
                         "(js.Constraint.regex(pattern, model))")
    if width < vocab:
        import jax.numpy as jnp
        constraint = constraint.replace(next_state=jnp.pad(
            constraint.next_state, [(0, 0), (0, vocab - width)], constant_values=-1))
    return constraint


def generate(model: Model, prompts: Sequence, max_new_tokens: int = 64,
             sampling: Sampling | None = None, drafter=None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, drafter_state=None,
             mesh=None, constraint: Constraint | None = None) -> GenerateOutput:
    """Generate continuations of `prompts` (strings, conversations or token-id lists).

        target, draft = js.load_default()
        out = js.generate(target, ["def fib(n):"], max_new_tokens=32,
                          drafter=js.DraftModel(draft, num_tokens=3))
        out.texts, out.tokens, out.lengths, out.stats["tokens_per_s"]

    model: a js.Model (js.load, js.load_default). prompts: a non-empty list of strings (needs the
    model's tokenizer), of conversations or of token-id lists. A conversation is a list of
    {"role", "content"} dicts: the model's chat template is applied with the generation prompt,
    and its end-of-turn token stops the row.
    max_new_tokens: tokens to generate per row (a row also stops at an EOS / stop token).
    sampling: js.Sampling(temperature, top_k, top_p, min_p); default greedy (temperature 0).
    drafter: None decodes autoregressively; a drafter (js.DraftModel, js.PromptLookup, js.Eagle,
    js.Medusa, js.TokenRecycling, js.default_drafter(model)) runs speculative decoding, whose
    output is exactly what the target alone would produce: token for token at temperature 0,
    in distribution under sampling (docs/acceptance_rules.md).
    seed: an int; the PRNG seed of sampling (unused when greedy).
    stop_tokens: extra token ids that end a row (the model's EOS ids always do).
    drafter_state: a previous run's `out.drafter_state` (e.g. Token Recycling's matrix).
    mesh (js.make_mesh): run sharded; the target is split by jaxspec.sharding.RULES (unless
    already placed on this mesh), the drafter replicated, the prompts split by row on "data".
    constraint (js.Constraint.regex / .json_schema): every row's text is a match (or, cut by
    max_new_tokens, a prefix of one); with a drafter, drafts are pruned to the language and the
    output is exactly constrained autoregressive decoding's.

    Returns a GenerateOutput: texts (generated text only), tokens int32 [B, max_new_tokens]
    (padded after each row's end), lengths int32 [B], stats (target_steps, drafted, accepted,
    mean_accepted, acceptance_rate, tokens_per_s, compile_seconds, ...) and drafter_state.

    Bad input (empty or over-long prompts, max_new_tokens < 1, a draft with another tokenizer,
    invalid sampling values) raises ValueError before any compute. One program is compiled per
    batch size, prompt-length and max_new_tokens bucket (powers of two) and drafter setting, and
    reused; `js.speculative.generate_tokens` is the same computation on token arrays, for use
    inside your own jax.jit.
    """
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a js.Sampling, got {type(sampling).__name__}")
    check_seed(seed)
    if drafter is not None:
        check_drafter(drafter)
    constraint = check_constraint(model, constraint)
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
    stops = _prompt_stop_tokens(model, prompts, stop_tokens)
    if constraint is not None:  # a finished match stops its row
        extra = np.asarray(constraint.stop_tokens, np.int32)  # repeats are harmless
        stops = np.concatenate([stops, np.broadcast_to(extra, stops.shape[:-1] + extra.shape)],
                               axis=-1).astype(np.int32)
    key = jax.random.PRNGKey(seed)
    limit = np.full((batch,), max_new_tokens, np.int32)
    if mesh is not None:
        from jaxspec.sharding import prepare_generate
        model, drafter, drafter_state, (prompt_tokens, prompt_lengths, limit) = prepare_generate(
            mesh, model, drafter, drafter_state, (prompt_tokens, prompt_lengths, limit))
    program_model = model.replace(tokenizer=None)  # host-only: not part of the program's key
    if drafter is not None and isinstance(getattr(drafter, "sizing", None), str):
        drafter = drafter.replace(sizing=_cost_model(program_model, batch, drafter))
    if isinstance(getattr(drafter, "model", None), Model):
        drafter = drafter.replace(model=drafter.model.replace(tokenizer=None))
    if drafter is None:
        args = (program_model, prompt_tokens, prompt_lengths, sampling, key, stops, limit)
        args += () if constraint is None else (constraint,)
        program, compile_s = decoding.PROGRAMS.get("autoregressive", _autoregressive_program,
                                                   (m, pad, mesh), args)
    else:
        args = (program_model, drafter, prompt_tokens, prompt_lengths, sampling, key, stops, limit,
                drafter_state)
        args += () if constraint is None else (constraint,)
        program, compile_s = decoding.PROGRAMS.get("speculative", speculative_program,
                                                   (m, pad, mesh), args)
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


def _cost_model(model: Model, batch: int, drafter):
    """sizing="auto": the target's measured cost curve at the drafter's candidate verify sizes
    (1, 2, 4, ... below its node count, the drafter's `verify_sizes` if it names any, and the
    node count), cached on disk after the first
    measurement (jaxspec.speculative.costs.calibrate); for a draft model also its own one-token
    forward time (CostModel.draft_ms, the drafting cost per node)."""
    from jaxspec.speculative.costs import calibrate

    if drafter.sizing != "auto":
        raise ValueError(f"sizing must be 'auto', None or a cost model, got {drafter.sizing!r}")
    n = drafter.tree.num_nodes
    sizes, s = [], 1
    while s < n:
        sizes.append(s)
        s *= 2
    # A drafter may name sizes its drafts often fit exactly (js.Hybrid: its trained chain's
    # root + depth), so such a draft is not verified padded to the next power of two.
    extra = [int(x) for x in getattr(drafter, "verify_sizes", ()) if 1 <= int(x) < n]
    curve = calibrate(model, batch, tuple(sorted(set(sizes) | set(extra))) + (n,))
    draft = getattr(drafter, "model", None)
    if isinstance(draft, Model):  # a draft model: one draft forward per drafted token
        draft_ms = calibrate(draft.replace(tokenizer=None), batch, (1,)).ms[0]
        curve = dataclasses.replace(curve, draft_ms=draft_ms)
    return curve


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


# -- beam search ------------------------------------------------------------------------------

@dataclasses.dataclass
class BeamSearchOutput(GenerateOutput):
    """What `js.beam_search` returns: `GenerateOutput` over B * num_return_sequences rows (each
    prompt's hypotheses together, best first), plus their scores."""

    sequence_scores: np.ndarray | None = None  # float32 [B * num_return_sequences]


def _prompt_stop_tokens(model: Model, prompts: Sequence, stop_tokens) -> np.ndarray:
    """The stop set [K], or per row [B, K] (-1 padded) when only some prompts are conversations
    (whose chat template's end of turn also stops them)."""
    stops = stop_token_array(model, stop_tokens)
    conversation_rows = [chat.is_conversation(p) for p in prompts]
    if not any(conversation_rows):
        return stops
    chat_stops = stop_token_array(model, list(stop_tokens or ()) + chat.end_of_turn_ids(model.tokenizer))
    if all(conversation_rows):
        return chat_stops
    per_row = np.full((len(prompts), len(chat_stops)), -1, np.int32)
    for i, is_chat in enumerate(conversation_rows):
        row = chat_stops if is_chat else stops
        per_row[i, :len(row)] = row
    return per_row


def _beam_program(max_new_tokens, num_beams, num_beam_groups, pad_id, model, prompt_tokens,
                  prompt_lengths, length_penalty, early_code, diversity_penalty, stop_tokens, limit):
    return beam_search_tokens(model, prompt_tokens, prompt_lengths, max_new_tokens, num_beams,
                              length_penalty, early_code, num_beams, num_beam_groups,
                              diversity_penalty, stop_tokens, limit, pad_id)


def beam_search(model: Model, prompts: Sequence, num_beams: int = 4, max_new_tokens: int = 64,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1, num_beam_groups: int = 1,
                diversity_penalty: float = 0.0,
                stop_tokens: Sequence[int] | None = None) -> BeamSearchOutput:
    """Beam search over `prompts` (strings, conversations or token-id lists), transformers'
    conventions (`generate(num_beams=..., do_sample=False)`): same sequences, same scores.

    Returns the num_return_sequences best hypotheses of each prompt, best first: rows
    [i * R, (i + 1) * R) belong to prompt i. sequence_scores are sum of log-probs /
    generated_length ** length_penalty. early_stopping: True (stop once num_beams hypotheses are
    finished), False (transformers' heuristic) or "never" (the exact bound).
    num_beam_groups > 1 with diversity_penalty > 0 is Diverse Beam Search (Hamming diversity
    between groups). Under it, `jaxspec.search.beam_search_tokens` runs inside a user's jit.
    """
    check_beam_arguments(num_beams, num_return_sequences, num_beam_groups, diversity_penalty,
                         length_penalty, early_stopping)
    encoded = encode_prompts(model, prompts)
    check_lengths(model, encoded, max_new_tokens)
    batch = len(encoded)
    tp = bucket(max(len(ids) for ids in encoded))
    m = bucket(max_new_tokens)
    pad = pad_token_id(model)
    prompt_tokens = np.full((batch, tp), pad, np.int32)
    for i, ids in enumerate(encoded):
        prompt_tokens[i, :len(ids)] = ids
    prompt_lengths = np.asarray([len(ids) for ids in encoded], np.int32)
    stops = _prompt_stop_tokens(model, prompts, stop_tokens)
    limit = np.full((batch,), max_new_tokens, np.int32)
    args = (model.replace(tokenizer=None), prompt_tokens, prompt_lengths,
            np.float32(length_penalty), np.int32(early_stopping_code(early_stopping)),
            np.float32(diversity_penalty), stops, limit)
    program, compile_s = decoding.PROGRAMS.get("beam_search", _beam_program,
                                               (m, num_beams, num_beam_groups, pad), args)
    start = time.perf_counter()
    out = jax.block_until_ready(program(*args))
    elapsed = time.perf_counter() - start
    r = num_return_sequences
    tokens = np.array(out.tokens)[:, :r, :max_new_tokens].reshape(batch * r, max_new_tokens)
    lengths = np.array(out.lengths)[:, :r].reshape(-1)
    scores = np.array(out.scores)[:, :r].reshape(-1)
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                 for i in range(batch * r)]
    steps = np.repeat(np.asarray(out.target_steps), r)
    zeros = np.zeros_like(steps)
    stats = _stats(TokenOutput(tokens=tokens, lengths=lengths, target_steps=steps, drafted=zeros,
                               accepted=zeros, accepted_by_position=zeros[:, None]),
                   lengths, elapsed, compile_s)
    stats["num_beams"] = num_beams
    return BeamSearchOutput(texts=texts, tokens=tokens, lengths=lengths, stats=stats,
                            sequence_scores=scores)
