"""Hybrid: a trained chain drafter and prompt lookup, the better of the two per row and round.

A trained feature drafter (js.Eagle) guesses the next tokens of any text but rarely more than
one or two; prompt lookup guesses nothing most of the time, but when the answer copies its
context (summaries, quoted passages, repeated lines, code edits) its continuation runs long.
Each round both propose a chain for every row, and each row verifies the one expected to commit
more tokens per ms of the target's measured cost curve, each at its best verify size (with
`sizing=None`, no curve: more tokens), from these per-depth probabilities:

  trained drafter: depth d accepted with prod_{i <= d} c_i, its per-node confidences scaled by
                   the row's record (how often its first token was the target's, over how
                   confident it claimed to be; exponential averages over earlier rounds);
  prompt lookup:   only where it matched, depth d accepted with r_1 * r_n^(d - 1), r_1 the
                   row's record of its first token being right where it matched, r_n the
                   record of a deeper token being right once its parent was.
The expected committed tokens of a chain verified at size s are 1 plus the sum of those over its
first s - 1 depths; a chain's score is the best such count per ms of the cost curve over the
curve's sizes (`lookup_wins`). Counting tokens alone (`choose_by="tokens"`) lets a long lookup
chain with middling records win over a short, likely Eagle chain only because it is long, though
verifying it costs more. On SmolLM2 the two rules measured within noise of each other
(`benchmarks/bench_smollm2_cpu_chat18_hybrid_rate.md`: 1.25x and 1.29x, the same acceptance).

Both records are kept for every round, whichever chain was verified: the tokens the round
committed tell whether each drafter's first tokens (and lookup's continuation) were right.

Exactness. The choice is made from draft-side values before the target's logits are seen, and
the chosen chain is verified as usual, so temperature 0 gives the target's greedy output. Under
sampling the choice reads no drawn token: the trained drafter's expectation is then
sum_{d <= K} r^d from its record r (not its confidences, which depend on the drawn tokens), and
lookup's match is a deterministic function of the history. A lookup row's chain is verified
with its one-hot proposal, a trained row's with its draft distribution q, both by the lossless
"speculative" rule, so the output keeps the target's law (conditioned on the past the chosen
chain's tokens are drawn from the q they are verified with).

The hybrid's chain is as deep as the deeper of the two (shorter proposals are padded with
invalid nodes); `sizing` ("auto" by default) then verifies only as many nodes as pay, from the
confidences above (the lookup row's r_1, r_n; the trained row's scaled c_i).

Skipping the trained drafter. Its round (catch-up on the committed features, then drafting) costs
about 14% of a one-token target step on SmolLM2 at this CPU, paid even when its chain is not
verified. A round runs it only when some active row's record of its first token being right is at
least `skip_below`, or `probe_every` rounds have gone by without it (so a record that fell can
rise again), or its pending features would no longer fit. A skipped round leaves its cache as it
was; the round's committed features are appended to the pending ones (Eagle.commit's `behind`),
and the next round that runs it catches up on all of them in one wider layer pass. The decision
reads only records of earlier rounds, so it is made before the target's logits are seen and the
hybrid stays lossless; a skipped round's first-token guess is not scored.

The trained drafter alone (`lookup=None`). The same rounds without prompt lookup: the Eagle's
chain, sized from its record-scaled confidences, and its rounds skipped while no active row's
record reaches `skip_below`. This is the Eagle with the skip that js.Eagle's own rounds lack (a
js.Eagle drafts every round, and sizing can only cut what it already paid for).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.speculative.costs import RATE_DECAY, RATE_PRIOR, CostModel, checked_sizing
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.eagle import Eagle
from jaxspec.speculative.drafters.prompt_lookup import PromptLookup
from jaxspec.speculative.trees import DynamicTree, chain

NEXT_PRIOR = 0.7   # prompt lookup's record of a deeper token being right, before any round
PILE = 4           # pending capacity of the trained drafter, in rounds of the hybrid's depth + 1


@struct.dataclass
class HybridState:
    inner: object              # the trained drafter's state
    model_token: jax.Array     # [B] int32 this round's first token of the trained drafter
    model_conf: jax.Array      # [B] float32 and its confidence (as drafted)
    lookup_tokens: jax.Array   # [B, K] int32 this round's lookup continuation (depths 1..K)
    lookup_valid: jax.Array    # [B, K] bool
    model_hits: jax.Array      # [B] float32 records: the trained drafter's first token right,
    model_claimed: jax.Array   # [B] its first token's confidence,
    lookup_first: jax.Array    # [B] lookup's first token right where it matched,
    lookup_next: jax.Array     # [B] a deeper lookup token right once its parent was
    model_ran: jax.Array       # [B] bool the trained drafter ran this round (skip_below)
    skipped: jax.Array         # [B] int32 rounds in a row it did not


def _padded(draft: Draft, n: int) -> Draft:
    """A chain draft padded with invalid nodes to n nodes."""
    extra = n - draft.tokens.shape[1]
    if extra == 0:
        return draft
    pad = lambda a, value: jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2),
                                   constant_values=value)
    batch = draft.tokens.shape[0]
    return Draft(tokens=pad(draft.tokens, 0),
                 parents=jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (batch, n)),
                 valid=pad(draft.valid, False),
                 q=None if draft.q is None else pad(draft.q, 0.0),
                 confidence=None if draft.confidence is None else pad(draft.confidence, 0.0))


def _expected(confidence, valid):
    """Expected accepted draft tokens of a chain: sum_d prod_{i <= d} confidence_i over valid
    nodes. confidence, valid: [B, K] (depths 1..K) -> [B]."""
    return jnp.sum(jnp.cumprod(jnp.where(valid, confidence, 0.0), axis=1), axis=1)


def _rate(confidence, valid, costs: CostModel):
    """Expected committed tokens per measured ms of a chain verified at its best size: the max
    over the cost model's sizes s of (1 + sum_{d < s} prod_{i <= d} confidence_i) / ms(s), the
    objective `costs.choose_size` maximises. confidence, valid: [B, K] (depths 1..K) -> [B]."""
    reach = jnp.cumsum(jnp.cumprod(jnp.where(valid, confidence, 0.0), axis=1), axis=1)  # [B, K]
    k = reach.shape[1]
    rates = [(1.0 + (reach[:, min(size - 1, k) - 1] if size > 1 else jnp.zeros_like(reach[:, 0])))
             / ms for size, ms in zip(costs.sizes, costs.ms)]
    return jnp.max(jnp.stack(rates, axis=1), axis=1)


def lookup_wins(model_conf, model_valid, lookup_conf, lookup_valid, costs: CostModel | None):
    """[B] bool: the rows whose lookup chain is expected to pay more than the trained drafter's.

    With a cost model: the chain with more expected committed tokens per ms at its best verify
    size (`_rate`), so a long lookup chain of middling records does not win over a short, likely
    trained one only because it is long (verifying it costs more). Without one (sizing=None):
    the chain with more expected accepted tokens. Confidences and validity: [B, K] each."""
    if costs is None:
        return _expected(lookup_conf, lookup_valid) > _expected(model_conf, model_valid)
    return _rate(lookup_conf, lookup_valid, costs) > _rate(model_conf, model_valid, costs)


def _average(record, value, seen):
    """One round's evidence in an exponential average (rows not seen keep their record)."""
    return jnp.where(seen, RATE_DECAY * record + (1.0 - RATE_DECAY) * value, record)


@struct.dataclass
class Hybrid:
    """A trained chain drafter (`drafter`, a js.Eagle chain) and prompt lookup (`lookup`): each
    round every row verifies the chain expected to commit more (module docstring). Lossless
    under greedy and sampled decoding. `sizing` ("auto", a cost model, a {tokens: ms} table or
    None) sizes every round from the chosen chain's confidences, as for the drafters alone.
    `skip_below` (None: never skip) and `probe_every` decide the rounds that run the trained
    drafter at all; `choose_by` ("rate" or "tokens") how a row's chain is chosen (module
    docstring); `model_prior`, `lookup_prior` and `lookup_next_prior` the records a row starts
    from.
    """

    drafter: Eagle
    # None: the trained drafter alone, with the records and the skip (module docstring).
    lookup: PromptLookup | None = PromptLookup(ngram=3, num_tokens=8, sizing=None)
    sizing: object = struct.field(pytree_node=False, default="auto")
    skip_below: float | None = struct.field(pytree_node=False, default=0.3)
    probe_every: int = struct.field(pytree_node=False, default=8)
    # How a row's chain is chosen: "rate", expected committed tokens per ms of the cost curve
    # (when the hybrid is sized; else tokens), or "tokens", expected accepted tokens.
    choose_by: str = struct.field(pytree_node=False, default="rate")
    # The records before a row's first round: the trained drafter's first token right, lookup's
    # first token right where it matched, a deeper lookup token right once its parent was.
    model_prior: float = struct.field(pytree_node=False, default=RATE_PRIOR)
    lookup_prior: float = struct.field(pytree_node=False, default=RATE_PRIOR)
    lookup_next_prior: float = struct.field(pytree_node=False, default=NEXT_PRIOR)

    uses_target_hidden = True
    drafts_confidence = True
    calibrated = False   # the confidences are the records' already (the loop takes them as is)
    rule = "speculative"  # chains with their own q (one-hot for lookup rows): lossless

    def __post_init__(self):
        if not isinstance(self.drafter, Eagle):
            raise ValueError(f"Hybrid's drafter must be a js.Eagle chain (a trained drafter), got "
                             f"{type(self.drafter).__name__}")
        if isinstance(self.drafter.tree, DynamicTree) or self.drafter.tree.max_children != 1:
            raise ValueError("Hybrid's drafter must draft a chain: use "
                             "eagle.with_tree(num_tokens=k)")
        if self.lookup is not None and not isinstance(self.lookup, PromptLookup):
            raise ValueError(f"Hybrid's lookup must be a js.PromptLookup or None, got "
                             f"{type(self.lookup).__name__}")
        if self.lookup is not None and self.lookup.num_candidates != 1:
            raise ValueError("Hybrid's lookup must draft a chain (num_candidates=1)")
        if self.skip_below is not None and not 0.0 <= self.skip_below <= 1.0:
            raise ValueError(f"Hybrid's skip_below is a first-token hit rate in [0, 1] or None, "
                             f"got {self.skip_below!r}")
        if self.choose_by not in ("rate", "tokens"):
            raise ValueError(f"Hybrid's choose_by is 'rate' (expected tokens per ms of the cost "
                             f"curve) or 'tokens', got {self.choose_by!r}")
        for name in ("model_prior", "lookup_prior", "lookup_next_prior"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value <= 1.0:
                raise ValueError(f"Hybrid's {name} is a hit rate in [0, 1], got {value!r}")
        if isinstance(self.probe_every, bool) or not isinstance(self.probe_every, int) \
                or self.probe_every < 1:
            raise ValueError(f"Hybrid's probe_every is a number of rounds >= 1, got "
                             f"{self.probe_every!r}")
        object.__setattr__(self, "sizing", checked_sizing(self.sizing))
        # The parts are sized by the hybrid, never on their own.
        object.__setattr__(self, "drafter", self.drafter.replace(sizing=None))
        if self.lookup is not None:
            object.__setattr__(self, "lookup", self.lookup.replace(sizing=None))

    def with_tree(self, num_tokens: int | None = None, lookup_tokens: int | None = None) -> "Hybrid":
        """The same drafters with another Eagle chain length and/or lookup chain length."""
        drafter = self.drafter if num_tokens is None else self.drafter.with_tree(num_tokens=num_tokens)
        if lookup_tokens is not None and self.lookup is None:
            raise ValueError("this Hybrid has no prompt lookup (lookup=None): lookup_tokens does "
                             "not apply")
        lookup = self.lookup if lookup_tokens is None else self.lookup.replace(num_tokens=lookup_tokens)
        return self.replace(drafter=drafter, lookup=lookup)

    @property
    def tree(self):
        lookup_depth = 0 if self.lookup is None else self.lookup.num_tokens
        return chain(max(self.drafter.tree.max_depth, lookup_depth))

    @property
    def verify_sizes(self) -> tuple:
        """Sizes the cost curve is measured at besides 1, 2, 4, ...: the trained chain's root +
        depth, so that a round verifying the whole Eagle chain of 2 costs a 3-token forward,
        not a 4-token one (measured on SmolLM2: the hybrid then verifies as much of the Eagle
        chain as the Eagle alone does)."""
        return (self.drafter.tree.max_depth + 1,)

    def cache_slack(self) -> int:
        return self.tree.max_depth + 1

    def check_compatible(self, target) -> None:
        self.drafter.check_compatible(target)

    def bind(self, target) -> "Hybrid":
        return self.replace(drafter=self.drafter.bind(target))

    def init(self, target, prompt_tokens, prompt_lengths, max_len: int, state=None,
             target_hidden=None):
        depth = self.tree.max_depth
        capacity = None if self.skip_below is None else PILE * (depth + 1)
        inner = self.drafter.init(target, prompt_tokens, prompt_lengths, max_len,
                                  None if state is None else state.inner,
                                  target_hidden=target_hidden, window=depth + 1, capacity=capacity)
        batch = prompt_tokens.shape[0]
        prior = lambda value: jnp.full((batch,), value, jnp.float32)
        return HybridState(inner=inner, model_token=jnp.zeros((batch,), jnp.int32),
                           model_conf=jnp.zeros((batch,), jnp.float32),
                           lookup_tokens=jnp.zeros((batch, depth), jnp.int32),
                           lookup_valid=jnp.zeros((batch, depth), bool),
                           model_hits=prior(self.model_prior),
                           model_claimed=prior(self.model_prior),
                           lookup_first=prior(self.lookup_prior),
                           lookup_next=prior(self.lookup_next_prior),
                           model_ran=jnp.ones((batch,), bool),
                           skipped=jnp.zeros((batch,), jnp.int32))

    def _model_round(self, state: HybridState, ctx: Context, sampling, key, vocab: int):
        """The trained drafter's chain and state, or (skip_below) a root-only chain and its
        state untouched when no row's record asks for it. -> (Draft, inner state, ran [B])."""
        batch = ctx.length.shape[0]
        run_model = lambda: self.drafter.propose(state.inner, ctx, sampling, key, vocab)
        if self.skip_below is None:
            model, inner = run_model()
            return model, inner, jnp.ones((batch,), bool)

        def root_only():
            shapes = jax.eval_shape(lambda: run_model()[0])
            empty = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            n = empty.tokens.shape[1]
            root = ctx.history[jnp.arange(batch), ctx.length - 1]
            return empty.replace(
                tokens=empty.tokens.at[:, 0].set(root),
                parents=jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=empty.parents.dtype),
                                         (batch, n)),
                valid=empty.valid.at[:, 0].set(True),
                confidence=empty.confidence.at[:, 0].set(1)), state.inner

        active = ctx.active
        most = jnp.max(jnp.where(active, state.inner.num_pending, 0))
        room = most + self.tree.max_depth + 1 <= state.inner.pending.shape[1]
        run = (jnp.any(active & (state.model_hits >= self.skip_below))
               | (jnp.max(jnp.where(active, state.skipped, 0)) >= self.probe_every - 1) | ~room)
        model, inner = jax.lax.cond(run, run_model, root_only)
        return model, inner, jnp.broadcast_to(run, (batch,))

    def propose(self, state: HybridState, ctx: Context, sampling, key, vocab: int):
        n = self.tree.num_nodes
        model, inner, ran = self._model_round(state, ctx, sampling, key, vocab)
        model = _padded(model, n)
        if self.lookup is None:     # no lookup chain: an empty one never wins a row
            lookup = model.replace(tokens=jnp.zeros_like(model.tokens),
                                   valid=jnp.zeros_like(model.valid), q=None, confidence=None)
        else:
            lookup, _ = self.lookup.propose(None, ctx, sampling, key, vocab)
            lookup = _padded(lookup, n)
        batch, k = ctx.length.shape[0], n - 1
        scale = state.model_hits / jnp.maximum(state.model_claimed, 1e-3)           # [B]
        model_conf = jnp.clip(model.confidence[:, 1:] * scale[:, None], 0.0, 1.0)   # [B, K]
        depth = jnp.arange(k)[None, :]
        lookup_conf = jnp.where(depth == 0, state.lookup_first[:, None],
                                state.lookup_next[:, None]) * jnp.ones((batch, k))  # [B, K]
        if sampling.greedy:
            model_claim, model_valid = model_conf, model.valid[:, 1:]
        else:  # from the record alone: the confidences depend on the drawn tokens
            model_claim = jnp.broadcast_to(state.model_hits[:, None], (batch, k))
            model_valid = (depth < self.drafter.tree.max_depth) & ran[:, None]
        costs = self.sizing if isinstance(self.sizing, CostModel) and self.choose_by == "rate" \
            else None
        use = lookup.valid[:, 1] & lookup_wins(model_claim, model_valid, lookup_conf,
                                               lookup.valid[:, 1:], costs)          # [B]
        pick = lambda a, b: jnp.where(use.reshape((batch,) + (1,) * (a.ndim - 1)), a, b)
        q = None
        if model.q is not None and self.lookup is None:
            q = model.q
        elif model.q is not None:
            one_hot = jax.nn.one_hot(lookup.tokens, vocab, dtype=jnp.float32)       # [B, N, V]
            q = pick(one_hot * lookup.valid[..., None], model.q)
        ones = jnp.ones((batch, 1), jnp.float32)
        draft = Draft(tokens=pick(lookup.tokens, model.tokens), parents=model.parents,
                      valid=pick(lookup.valid, model.valid), q=q,
                      confidence=jnp.concatenate([ones, pick(lookup_conf, model_conf)], axis=1))
        return draft, state.replace(inner=inner, model_token=model.tokens[:, 1],
                                    model_conf=model.confidence[:, 1],
                                    lookup_tokens=lookup.tokens[:, 1:],
                                    lookup_valid=lookup.valid[:, 1:], model_ran=ran)

    def commit(self, state: HybridState, ctx: Context, draft: Draft, verdict, target_logits,
               target_hidden=None):
        behind = None if self.skip_below is None else ~state.model_ran
        inner = self.drafter.commit(state.inner, ctx, draft, verdict, target_logits,
                                    target_hidden=target_hidden, behind=behind)
        batch, k = state.lookup_tokens.shape
        rows = jnp.arange(batch)
        # The round's committed tokens: the accepted path after the root, then the next token.
        accepted = verdict.num_accepted                                              # [B]
        path_tokens = jnp.take_along_axis(draft.tokens, verdict.path, axis=1)       # [B, K+1]
        emitted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
        emitted = emitted.at[rows, accepted].set(verdict.next_token)[:, :k]          # [B, K]
        known = jnp.arange(k)[None, :] <= accepted[:, None]                          # [B, K]
        active = ctx.active
        scored = active & state.model_ran          # a skipped round's first token is no guess
        model_hit = (state.model_token == emitted[:, 0]).astype(jnp.float32)
        right = (state.lookup_tokens == emitted) & state.lookup_valid & known        # [B, K]
        prefix = jnp.cumprod(right, axis=1).astype(bool)                             # [B, K]
        tried = state.lookup_valid[:, 1:] & prefix[:, :-1] & known[:, 1:]            # [B, K-1]
        tries = jnp.sum(tried, axis=1)
        hits = jnp.sum(tried & right[:, 1:], axis=1)
        return state.replace(
            inner=inner,
            model_hits=_average(state.model_hits, model_hit, scored),
            model_claimed=_average(state.model_claimed, state.model_conf, scored),
            skipped=jnp.where(active, jnp.where(state.model_ran, 0, state.skipped + 1),
                              state.skipped),
            lookup_first=_average(state.lookup_first, right[:, 0].astype(jnp.float32),
                                  active & state.lookup_valid[:, 0]),
            lookup_next=_average(state.lookup_next, hits / jnp.maximum(tries, 1),
                                 active & (tries > 0)))
