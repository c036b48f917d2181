"""Output constraints: a regular expression or a JSON schema, compiled with outlines-core to a
token-level DFA held in dense device tables, applied inside the jitted decode loops.

The contract every decode loop follows (autoregressive, speculative):
  * a row carries its DFA state s [B] int32, starting at `constraint.start`;
  * before a token is drawn, the target's logits are masked: token v keeps its logit iff
    next_state[s, v] >= 0, every other token gets -inf, and only then are temperature / top-k /
    top-p / min-p applied (`sampling.probabilities` of the masked logits is "the constrained
    distribution");
  * after token v is committed, s <- next_state[s, v].
A final state allows the constraint's stop tokens (next_state[s, stop] = s); an end state (final
with no text token leaving it) allows only them, so the stop is forced. Every state kept in the
table can still reach a final state (transitions into dead ends are removed when the table is
built), so a masked row always has an allowed token and every finished row is a match. A row cut
by max_new_tokens before it reaches a final state holds a prefix of a match.

The tables are pytree leaves: a new pattern whose table has the same (bucketed) shape runs the
same compiled program. outlines-core is an optional dependency, imported only when a constraint
is built (`pip install "jaxspec[constraints]"`).
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Most DFA states a constraint may have. The device table is S x V int32 (V the vocabulary):
# 2048 states take 64 MiB at V = 8192 and 384 MiB at V = 49152.
DEFAULT_MAX_STATES = 2048

INSTALL_HINT = 'pip install "jaxspec[constraints]"  (or: pip install outlines-core)'

# JSON-schema keywords outlines-core accepts but does not enforce (its regex ignores them), so an
# output could violate them; refused unless allow_unenforced=True.
UNENFORCED_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# Keys whose value maps names to subschemas (the names themselves are not keywords).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keys whose value is data, not a subschema.
_VALUES = ("enum", "const", "default", "examples")


@struct.dataclass
class Constraint:
    """A token-level DFA as dense tables (all pytree leaves, nothing static).

    next_state:  [S, V] int32  state after token v in state s; -1: v is not allowed in s.
                               S is padded to a power of two (>= 16) with all -1 rows.
    start:       [] int32      the state before the first generated token
    final:       [S] bool      states where the text so far is a full match
    stop_tokens: [K] int32     the tokens that end a match (allowed exactly in final states)

    Build one with `Constraint.regex(pattern, tokenizer)` or
    `Constraint.json_schema(schema, tokenizer)`; pass it as js.generate(..., constraint=...).
    """

    next_state: jax.Array
    start: jax.Array
    final: jax.Array
    stop_tokens: jax.Array

    @classmethod
    def regex(cls, pattern: str, tokenizer, *, stop_tokens: Sequence[int] | None = None,
              vocab_size: int | None = None, max_states: int = DEFAULT_MAX_STATES) -> "Constraint":
        """Constrain generated text to a full match of `pattern` (outlines-core regex syntax).

        tokenizer: a Hugging Face tokenizer or a js.Model (its tokenizer, vocabulary size and
        eos tokens). stop_tokens: the ids that end a match (default: the model's / tokenizer's
        eos). vocab_size: the table width (default: the model's vocabulary, else the
        tokenizer's size). max_states: the state budget; a larger DFA is refused.
        """
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a regular expression string, got "
                             f"{type(pattern).__name__}")
        tok, width, stops = _resolve_tokenizer(tokenizer, stop_tokens, vocab_size)
        return _build(pattern, tok, width, stops, max_states, what=f"the regex {pattern!r}")

    @classmethod
    def json_schema(cls, schema, tokenizer, *, whitespace_pattern: str | None = None,
                    stop_tokens: Sequence[int] | None = None, vocab_size: int | None = None,
                    max_states: int = DEFAULT_MAX_STATES,
                    allow_unenforced: bool = False) -> "Constraint":
        """Constrain generated text to JSON that validates against `schema` (a dict or JSON text).

        The schema becomes a regex by outlines-core's json_schema module (whitespace between
        tokens follows `whitespace_pattern`, default an optional single space). Keywords that
        module accepts but cannot enforce (numeric bounds, multipleOf) are refused unless
        allow_unenforced=True; other arguments as in `Constraint.regex`.
        """
        schema_obj = _schema_object(schema)
        _check_schema(schema_obj, allow_unenforced)
        oc = _outlines()
        try:
            regex = oc.json_schema.build_regex_from_schema(json.dumps(schema_obj),
                                                           whitespace_pattern)
        except (ValueError, TypeError) as err:
            raise ValueError(f"unsatisfiable or unsupported JSON schema: outlines-core cannot "
                             f"turn it into a regex ({_first_line(err)})") from None
        tok, width, stops = _resolve_tokenizer(tokenizer, stop_tokens, vocab_size)
        constraint = _build(regex, tok, width, stops, max_states, what="the JSON schema")
        table = np.asarray(constraint.next_state)
        start = int(constraint.start)
        text_tokens = np.setdiff1d(np.flatnonzero(table[start] >= 0), np.asarray(stops))
        if text_tokens.size == 0:
            raise ValueError(f"unsatisfiable JSON schema: it admits no JSON value (its regex "
                             f"{regex!r} matches only the empty string)")
        return constraint

    @property
    def num_states(self) -> int:
        """The DFA's states (host-side; the padding rows of the table are not counted)."""
        return int(np.sum(np.any(np.asarray(self.next_state) >= 0, axis=1)))

    @property
    def vocab_size(self) -> int:
        return int(self.next_state.shape[1])


# -- applied inside the loops (pure, jittable) ------------------------------------------------

def start_states(constraint: Constraint, batch: int) -> jax.Array:
    """[B] int32: every row at the start state."""
    return jnp.full((batch,), constraint.start, jnp.int32)


def allowed_tokens(constraint: Constraint, state: jax.Array) -> jax.Array:
    """state [...] -> bool [..., V]: tokens allowed in each state. A state of -1 (a draft node off
    the language, never emitted) allows every token, so its masked logits stay finite."""
    rows = constraint.next_state[jnp.maximum(state, 0)]                       # [..., V]
    return (rows >= 0) | (state < 0)[..., None]


def mask_logits(constraint: Constraint, logits: jax.Array, state: jax.Array) -> jax.Array:
    """logits [..., V] at DFA states state [...] -> the same with disallowed tokens at -inf."""
    if logits.shape[-1] != constraint.next_state.shape[1]:
        raise ValueError(f"the constraint's table covers {constraint.next_state.shape[1]} tokens "
                         f"but the logits have {logits.shape[-1]}")
    return jnp.where(allowed_tokens(constraint, state), logits, -jnp.inf)


def advance(constraint: Constraint, state: jax.Array, token: jax.Array) -> jax.Array:
    """state [...], token [...] -> next state [...] (-1 when the token is not allowed or the
    state is already -1)."""
    nxt = constraint.next_state[jnp.maximum(state, 0), token]
    return jnp.where(state < 0, -1, nxt).astype(jnp.int32)


# -- built on the host ------------------------------------------------------------------------

def _outlines():
    try:
        import outlines_core
    except ImportError:
        raise ImportError("js.Constraint needs the optional dependency outlines-core, which is "
                          f"not installed: {INSTALL_HINT}") from None
    return outlines_core


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _resolve_tokenizer(tokenizer, stop_tokens, vocab_size):
    """(HF tokenizer, table width V, stop token ids) from a tokenizer or a js.Model."""
    from jaxspec.models.transformer import Model

    stops: set[int] = set()
    if isinstance(tokenizer, Model):
        model = tokenizer
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer files in its directory); a "
                             "constraint maps text to tokens and needs one")
        width = model.config.vocab_size if vocab_size is None else vocab_size
        stops.update(int(t) for t in model.config.eos_token_ids)
        tokenizer = model.tokenizer
    else:
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise ValueError("tokenizer must be a Hugging Face tokenizer or a js.Model, got "
                             f"{type(tokenizer).__name__}")
        width = vocab_size
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))
    if stop_tokens is not None:
        stops = {int(t) for t in stop_tokens}
    size = max(tokenizer.get_vocab().values()) + 1
    width = max(size, len(tokenizer)) if width is None else int(width)
    if not stops:
        raise ValueError("a constraint needs a stop token to end a match, and the tokenizer has no "
                         "eos token: pass stop_tokens=[...]")
    bad = sorted(t for t in stops if not 0 <= t < width)
    if bad:
        raise ValueError(f"stop token {bad[0]} is outside the vocabulary [0, {width})")
    return tokenizer, width, sorted(stops)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character standing for it."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = dict(zip(keep, keep)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _decoder_kinds(tokenizer) -> set[str]:
    """Decoder component types of a fast tokenizer ({"ByteLevel"}, {"Replace", "ByteFallback"})."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    spec = json.loads(backend.to_str()).get("decoder") or {}
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    return {p.get("type") for p in parts if isinstance(p, dict)}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The bytes each non-special token stands for (what the DFA reads).

    Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): each character of the token is one byte of
    GPT-2's alphabet. SentencePiece with byte fallback (Llama 2, Mistral, Gemma): "▁" is a
    space and "<0xNN>" is byte NN. Otherwise the token's decoded text; a token that decodes to
    part of a UTF-8 character (U+FFFD) cannot be placed and is left out (never allowed).
    """
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for added_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(added_id))
    kinds = _decoder_kinds(tokenizer)
    vocab = tokenizer.get_vocab()
    out: dict[int, bytes] = {}
    if "ByteLevel" in kinds:
        alphabet = {c: b for b, c in _bytes_to_unicode().items()}
        for tok, i in vocab.items():
            if i not in special and all(c in alphabet for c in tok):
                out[i] = bytes(alphabet[c] for c in tok)
    elif kinds & {"ByteFallback", "Metaspace", "Replace"}:
        for tok, i in vocab.items():
            if i in special:
                continue
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out[i] = bytes([int(tok[3:5], 16)])
            else:
                out[i] = tok.replace("▁", " ").encode()
    else:
        for tok, i in vocab.items():
            if i in special:
                continue
            text = tokenizer.convert_tokens_to_string([tok])
            if "\ufffd" not in text:
                out[i] = text.encode()
    return {i: b for i, b in out.items() if b}


# outlines-core (0.2.x) drops a token whose walk leaves a final state for a non-final one (its
# DFA reports matches one byte late, and such a token is mistaken for one that ends in a match:
# "1(\.1)?" loses "." after "1"). So the index is built for the pattern followed by a sentinel
# character no text token contains (tokens with its lead byte 0xF4, i.e. characters U+100000 to
# U+10FFFF, are left out): no text position is then a match, nothing is dropped, and the final
# states of the pattern are the states with a transition on the sentinel.
_SENTINEL = "\U0010FFFF"
_SENTINEL_BYTES = _SENTINEL.encode()


def _index(oc, regex: str, by_bytes: dict[bytes, list[int]], eos: int, sentinel_id: int):
    vocabulary = oc.Vocabulary(eos, {**by_bytes, _SENTINEL_BYTES: [sentinel_id]})
    return oc.Index(f"(?:{regex}){_SENTINEL}", vocabulary)


def _strip_anchors(regex: str) -> str:
    """The whole text must match: a leading ^ and a trailing (unescaped) $ are redundant."""
    if regex.startswith("^"):
        regex = regex[1:]
    if regex.endswith("$") and not regex.endswith("\\$"):
        regex = regex[:-1]
    return regex


def _build(regex: str, tokenizer, width: int, stops: list[int], max_states: int,
           what: str) -> Constraint:
    """Index the regex over the tokenizer's vocabulary and lay it out as dense tables."""
    oc = _outlines()
    if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
        raise ValueError(f"max_states must be an integer >= 1, got {max_states!r}")
    regex = _strip_anchors(regex)
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in token_bytes(tokenizer).items():
        if i < width and i not in stops and _SENTINEL_BYTES[0] not in b:
            by_bytes.setdefault(b, []).append(i)
    sentinel_id = width                                  # a token id no model has
    try:
        index = _index(oc, regex, by_bytes, stops[0], sentinel_id)
    except ValueError as err:
        every_byte = {bytes([b]): [width + 1 + b] for b in range(256) if b != _SENTINEL_BYTES[0]}
        try:
            _index(oc, regex, every_byte, stops[0], sentinel_id)
        except ValueError as byte_err:
            source = "" if what.startswith("the regex") else f" (built from {what})"
            raise ValueError(f"invalid regular expression {regex!r}{source}: outlines-core cannot "
                             f"build its DFA ({_first_line(byte_err)})") from None
        missing = re.search(r"following characters: (\[.*?\])", str(err))
        detail = (f"no token continues it with any of {missing.group(1)}" if missing
                  else _first_line(err))
        raise ValueError(f"the tokenizer cannot express {what}: some part of it cannot be spelled "
                         f"with the tokenizer's tokens ({detail})") from None
    transitions = index.get_transitions()            # {state: {token: next state}}
    initial = index.get_initial_state()
    accept = {m[sentinel_id] for m in transitions.values() if sentinel_id in m}
    states = [initial] + sorted(s for s in transitions if s != initial and s not in accept)
    if len(states) > max_states:
        mib = len(states) * width * 4 / 2 ** 20
        raise ValueError(f"{what} needs a DFA of {len(states)} states over this vocabulary, more "
                         f"than the state budget max_states={max_states} (its table would be "
                         f"{len(states)} x {width} int32 = {mib:.0f} MiB); bound the pattern's "
                         "repetitions and alternatives, or raise max_states")
    dense = {s: k for k, s in enumerate(states)}
    finals = {dense[s] for s, m in transitions.items() if sentinel_id in m and s in dense}
    table = np.full((len(states), width), -1, np.int32)
    for s, moves in transitions.items():
        if s not in dense:
            continue
        for token, nxt in moves.items():
            if token < width and nxt in dense:
                table[dense[s], token] = dense[nxt]
    table[:, stops] = -1
    table = _prune_dead_ends(table, finals)
    if not (np.any(table[0] >= 0) or 0 in finals):
        raise ValueError(f"the tokenizer cannot express {what}: no sequence of its tokens spells "
                         "a full match")
    for f in finals:
        table[f, stops] = f
    size = 16
    while size < len(states):
        size *= 2
    padded = np.full((size, width), -1, np.int32)
    padded[:len(states)] = table
    final = np.zeros((size,), bool)
    final[sorted(finals)] = True
    return Constraint(next_state=jnp.asarray(padded), start=jnp.asarray(0, jnp.int32),
                      final=jnp.asarray(final), stop_tokens=jnp.asarray(stops, jnp.int32))


def _prune_dead_ends(table: np.ndarray, finals: set[int]) -> np.ndarray:
    """Remove transitions into states from which no final state is reachable, so that every
    state a row can be in has an allowed continuation."""
    s = table.shape[0]
    src, tok = np.nonzero(table >= 0)
    dst = table[src, tok]
    into: list[list[int]] = [[] for _ in range(s)]
    for a, b in zip(src.tolist(), dst.tolist()):
        into[b].append(a)
    alive = np.zeros((s,), bool)
    queue = deque(finals)
    alive[list(finals)] = True
    while queue:
        b = queue.popleft()
        for a in into[b]:
            if not alive[a]:
                alive[a] = True
                queue.append(a)
    table = table.copy()
    table[(table >= 0) & ~alive[np.maximum(table, 0)]] = -1
    return table


def _schema_object(schema) -> Any:
    if isinstance(schema, (str, bytes)):
        try:
            return json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"schema is not valid JSON text: {err}") from None
    if isinstance(schema, (dict, bool)):
        return schema
    raise ValueError(f"schema must be a dict or JSON text, got {type(schema).__name__}")


def _check_schema(schema, allow_unenforced: bool) -> None:
    """Refuse a malformed schema (when jsonschema is installed) and keywords outlines-core would
    silently ignore."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.exceptions.SchemaError as err:
            raise ValueError(f"invalid JSON schema: {err.message}") from None
    if schema is False:
        raise ValueError("unsatisfiable JSON schema: `false` admits no value")
    found: list[str] = []

    def walk(node, path: str, names: bool):
        if isinstance(node, dict):
            for key, value in node.items():
                if names:                        # key is a property / definition name
                    walk(value, f"{path}/{key}", False)
                    continue
                if key in UNENFORCED_KEYWORDS:
                    found.append(f"{path}/{key}")
                if key == "allOf" and isinstance(value, list) and len(value) > 1:
                    raise ValueError(f"unsupported JSON schema: allOf with {len(value)} subschemas "
                                     f"at {path or '/'} (outlines-core does not intersect them)")
                if key not in _VALUES:
                    walk(value, f"{path}/{key}", key in _SCHEMA_MAPS)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}", False)

    walk(schema, "", False)
    if found and not allow_unenforced:
        raise ValueError(f"the JSON schema uses {', '.join(found)}, which outlines-core does not "
                         "enforce (outputs could violate it): remove it, express it with an enum "
                         "or a string pattern, or pass allow_unenforced=True to accept outputs "
                         "that ignore it")
