"""DraftModel: a small jaxspec model proposes a chain, sampled with the target's Sampling.

The draft keeps its own KV cache with the same committed length as the target's. Each round
re-feeds the last committed token together with the root (re-writing an identical K/V at slot
len - 1), which covers the case where the previous round accepted the whole chain and the last
draft token was never fed; rolling back after a rejection is just resetting `lengths`.

num_tokens="auto" drafts up to `max_tokens` per round with a per-row length that grows by 2
after a fully accepted round and shrinks by 1 otherwise (HF assisted generation's schedule),
and stops a row early once the draft's own probability of the whole run drops below
`1 - stop_threshold` (the SpecDec++ rule with the draft's probabilities standing in for a trained
acceptance head). Drafting is a while_loop that exits as soon as every row has stopped.

tree=TreeSpec (branching) or tree=trees.dynamic(...) drafts a tree instead, one draft forward per
level; see draft_model_tree.py. tree=chain(n) is the same as num_tokens=n.

Chains are sized per round (`sizing`, default "auto"; docs/sizing.md): each draft token carries
the draft's own probability of it as its confidence, and the loop verifies the prefix (1, 2, 4,
..., k + 1 nodes) with the most expected committed tokens per measured ms of the target. An
adaptive chain that stopped early then verifies only its drafted tokens, not all k + 1 slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.models.cache import KVCache
from jaxspec.models.transformer import Model, forward, forward_step, new_cache
from jaxspec.sampling import Sampling, probabilities, sample
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters import draft_model_files, draft_model_tree
from jaxspec.speculative.costs import checked_calibrated, checked_sizing
from jaxspec.speculative.drafters.base import check_num_tokens, check_same_vocabulary
from jaxspec.speculative.trees import DynamicTree, TreeSpec, chain


def head_width(model: Model) -> int:
    """How many logits the model's LM head gives: its lm_head kernel's columns, else (tied) the
    embedding's rows."""
    if "lm_head" in model.params:
        return int(model.params["lm_head"]["kernel"].shape[-1])
    return int(model.params["embed"].shape[0])


def check_head_ids(head_ids, model: Model, vocab: int) -> None:
    """Refuse VocabTrim ids that do not match the draft's head or name no target token."""
    shape = getattr(head_ids, "shape", None)
    if shape is None or len(shape) != 1 or not jnp.issubdtype(head_ids.dtype, jnp.integer):
        raise ValueError(f"head_ids must be a 1-D integer array of target token ids (VocabTrim), "
                         f"got {type(head_ids).__name__} of shape {shape}")
    if shape[0] != head_width(model):
        raise ValueError(f"head_ids names {shape[0]} tokens but the draft model's head gives "
                         f"{head_width(model)} logits")
    ids = jax.device_get(head_ids)
    if shape[0] and (ids.min() < 0 or ids.max() >= vocab or len(set(ids.tolist())) != shape[0]):
        raise ValueError(f"head_ids must be distinct token ids in [0, {vocab}) (the target's "
                         "vocabulary)")


@struct.dataclass
class DraftModelState:
    cache: KVCache          # the draft's KV cache; lengths tracked from the target's
    num_tokens: jax.Array   # [B] int32, current draft length per row (adaptive mode)


@struct.dataclass
class DraftModel:
    """A small model with the target's tokenizer drafts the tokens (Leviathan et al.; Chen et al.).

    num_tokens=k: a chain of k tokens per round (default 5); num_tokens="auto": an adaptive chain
    of up to max_tokens, stopped early per row when the draft's own run probability falls below
    1 - stop_threshold; tree=js.trees.kary(...) / from_paths(...) / dynamic(...): a tree. Drafts
    are sampled with the target's Sampling; verification is greedy at temperature 0 and the
    lossless rejection rule otherwise (docs/draft_model.md). Chains are sized per round
    (sizing="auto", the default; None verifies the whole chain; docs/sizing.md).
    """

    model: Model
    num_tokens: int | str | None = struct.field(pytree_node=False, default=None)  # None: 5
    max_tokens: int = struct.field(pytree_node=False, default=8)
    stop_threshold: float | None = struct.field(pytree_node=False, default=0.7)
    tree: TreeSpec | DynamicTree | None = struct.field(pytree_node=False, default=None)
    # Per-round verify size of a chain: "auto" (the target's measured cost curve, cached), a
    # costs.CostModel or {new tokens: ms} table, or None (verify all k + 1 slots). Trees: None.
    sizing: object = struct.field(pytree_node=False, default="auto")
    # Sized greedy rounds scale the confidences by each row's record (node 1's confidence
    # against the target's argmax, costs.calibrated_confidence); False takes them as drafted.
    calibrated: bool = struct.field(pytree_node=False, default=True)
    # VocabTrim: int32 [V'] the target ids of the draft head's V' rows (its logits [..., V'] are
    # placed at these ids of the target's vocabulary, -inf elsewhere, so the draft never proposes
    # another token); None: the draft's head covers the vocabulary.
    head_ids: jax.Array | None = None

    def __post_init__(self):
        if not isinstance(self.model, Model):
            raise ValueError(f"DraftModel needs a jaxspec Model (js.load(...)), got "
                             f"{type(self.model).__name__}")
        tree = self.tree
        if tree is not None and not isinstance(tree, (TreeSpec, DynamicTree)):
            raise ValueError(f"tree must be a js.trees TreeSpec (chain, kary, from_paths, ...) or "
                             f"js.trees.dynamic(...), got {type(tree).__name__}")
        is_chain = isinstance(tree, TreeSpec) and tree.max_children <= 1
        if self.num_tokens is None:  # not given: the chain's length, else 5
            object.__setattr__(self, "num_tokens", tree.max_depth if is_chain else 5)
        if self.num_tokens == "auto":
            check_num_tokens(self.max_tokens, "max_tokens")
        else:
            check_num_tokens(self.num_tokens)
        if self.stop_threshold is not None and not 0.0 < self.stop_threshold < 1.0:
            raise ValueError(f"stop_threshold must be in (0, 1) or None, got {self.stop_threshold}")
        if tree is None:
            object.__setattr__(self, "tree", chain(self.k))
        elif is_chain:
            if tree.max_depth < 1:
                raise ValueError("tree=chain(0) drafts nothing; use a chain of >= 1 tokens")
            if tree.max_depth != self.k:
                setting = "max_tokens" if self.adaptive else "num_tokens"
                raise ValueError(
                    f"{setting}={self.k} disagrees with tree=chain({tree.max_depth}); give one of "
                    "them (DraftModel.replace keeps the old chain: build a new DraftModel instead)")
        elif self.adaptive:
            raise ValueError("num_tokens='auto' drafts an adaptive chain; it cannot be combined "
                             "with a branching tree=...")
        sizing = checked_sizing(self.sizing)
        if self.branching and sizing is not None:
            if sizing != "auto":
                raise ValueError("DraftModel sizes chains only: a tree=... draft model verifies its "
                                 "whole tree; pass sizing=None or 'auto' with a tree")
            sizing = None   # "auto" on a tree: its whole tree, as before
        object.__setattr__(self, "sizing", sizing)
        checked_calibrated(self.calibrated)

    @property
    def branching(self) -> bool:
        """True when drafting a tree (static with branches, or dynamic) rather than a chain."""
        return isinstance(self.tree, DynamicTree) or self.tree.max_children > 1

    @property
    def rule(self) -> str:
        """Verification rule at temperature > 0: static trees are Gumbel-top-k (without
        replacement) draws, verified by "speculative_wor"; chains and dynamic trees (one-hot,
        deterministic candidates) use the default."""
        return "speculative_wor" if isinstance(self.tree, TreeSpec) and self.branching else "auto"

    @property
    def adaptive(self) -> bool:
        return self.num_tokens == "auto"

    @property
    def k(self) -> int:
        """Static maximum number of draft tokens per round."""
        return self.max_tokens if self.adaptive else self.num_tokens

    # -- files of a draft sharing its target's embedding (draft_model_files.py) -----------------
    def save(self, path, dtype: str = "bfloat16", extra: dict | None = None,
             target_fingerprint: str | None = None) -> None:
        """Write this VocabTrim draft's own layers, final norm and head_ids (not the target's
        embedding and head rows it shares) with a config.json."""
        draft_model_files.save(self, path, dtype, extra, target_fingerprint)

    @classmethod
    def load(cls, path, target: Model, dtype: str = "float32", **fields) -> "DraftModel":
        """A saved distilled draft with `target`'s embedding and head rows attached; refused for
        another target. fields: DraftModel settings (num_tokens, sizing, ...)."""
        return draft_model_files.load(cls, path, target, dtype, **fields)

    def cache_slack(self) -> int:
        """Positions past the committed length one step uses (the deepest node's, plus one)."""
        return self.tree.max_depth + 1

    def check_compatible(self, target: Model) -> None:
        check_same_vocabulary(target, self.model)
        if self.head_ids is not None:
            check_head_ids(self.head_ids, self.model, target.config.vocab_size)
        if self.tree.max_depth + 1 > self.model.config.max_position_embeddings:
            raise ValueError(f"num_tokens={self.k} is larger than the draft model's context allows")
        vocab = min(target.config.vocab_size, self.model.config.vocab_size)
        width = self.tree.top_k if isinstance(self.tree, DynamicTree) else self.tree.max_children
        if self.branching and width > vocab:
            raise ValueError(f"the tree has up to {width} children per node but the vocabulary "
                             f"has only {vocab} tokens")

    def check_positions(self, needed: int) -> None:
        """Refuse a run whose positions (prompt + new tokens + draft slots) exceed the draft's
        context: a learned-position draft would silently clamp them."""
        limit = self.model.config.max_position_embeddings
        if needed > limit:
            raise ValueError(f"the draft model supports at most {limit} positions "
                             f"(max_position_embeddings) but this run needs {needed} (prompt + "
                             "max_new_tokens + draft slots)")

    def init(self, target: Model, prompt_tokens, prompt_lengths, max_len: int, state=None):
        """Prefill the draft's cache with the prompts. prompt_tokens: [B, Tp]."""
        if self.branching:
            return draft_model_tree.init(self, target, prompt_tokens, prompt_lengths, max_len, state)
        batch, tp = prompt_tokens.shape
        cache = new_cache(self.model, batch, max_len)
        positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (batch, tp))
        _, _, cache = forward(self.model, prompt_tokens, cache, positions)
        start = self.k if not self.adaptive else min(4, self.k)
        return DraftModelState(cache=cache.replace(lengths=prompt_lengths),
                               num_tokens=jnp.full((batch,), start, jnp.int32))

    def _logits(self, logits, vocab: int):
        """Draft logits [..., Vd] -> [..., V] of the target's vocabulary (padded vocabularies;
        a VocabTrim head's V' logits placed at its head_ids)."""
        if self.head_ids is not None:
            full = jnp.full(logits.shape[:-1] + (vocab,), -jnp.inf, logits.dtype)
            return full.at[..., self.head_ids].set(logits)
        vd = logits.shape[-1]
        if vd >= vocab:
            return logits[..., :vocab]
        pad = [(0, 0)] * (logits.ndim - 1) + [(0, vocab - vd)]
        return jnp.pad(logits, pad, constant_values=-jnp.inf)

    def propose(self, state: DraftModelState, ctx: Context, sampling: Sampling, key, vocab: int):
        if self.branching:
            propose = (draft_model_tree.propose_dynamic if isinstance(self.tree, DynamicTree)
                       else draft_model_tree.propose_static)
            return propose(self, state, ctx, sampling, key, vocab)
        batch = ctx.length.shape[0]
        k, n = self.k, self.k + 1
        rows = jnp.arange(batch)
        committed = ctx.cache_lengths                                             # [B]
        root = ctx.history[rows, ctx.length - 1]
        before = ctx.history[rows, jnp.maximum(ctx.length - 2, 0)]
        cache = state.cache.replace(lengths=committed - 1)
        two = jnp.stack([before, root], axis=1)                                   # [B, 2]
        positions = (committed - 1)[:, None] + jnp.arange(2)[None, :]
        logits, _, cache = forward_step(self.model, two, cache, positions)
        limit = state.num_tokens if self.adaptive else jnp.full((batch,), k, jnp.int32)
        tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(root)
        valid = jnp.zeros((batch, n), bool).at[:, 0].set(True)
        q = None if sampling.greedy else jnp.zeros((batch, n, vocab), jnp.float32)
        # The draft's own (unprocessed) probability of each drawn token: P(node | parent) for
        # sizing, and the adaptive stop rule's factors. The root's is 1.
        confidence = jnp.ones((batch, n), jnp.float32)                            # [B, N]

        def draw(i, step_logits, tokens, valid, q, confidence, drafting, run_prob):
            """Sample draft token i + 1 from the draft's logits after token i. [B, V] -> ..."""
            step_logits = self._logits(step_logits, vocab)                        # [B, V]
            token = sample(jax.random.fold_in(key, i), step_logits, sampling)     # [B]
            tokens = tokens.at[:, i + 1].set(token)
            valid = valid.at[:, i + 1].set(drafting)
            if q is not None:
                q = q.at[:, i + 1].set(probabilities(step_logits, sampling))
            prob = jnp.take_along_axis(jax.nn.softmax(step_logits, axis=-1),
                                       token[:, None], axis=1)[:, 0]             # [B]
            confidence = confidence.at[:, i + 1].set(prob)
            drafting = drafting & (i + 1 < limit)
            if self.stop_threshold is not None and self.adaptive:
                run_prob = run_prob * prob   # confidence of the run so far
                drafting = drafting & (run_prob >= 1.0 - self.stop_threshold)
            return tokens, valid, q, confidence, drafting, run_prob

        def cond(carry):
            i, _, _, _, _, _, _, drafting, _ = carry
            return (i < k) & jnp.any(drafting)

        def body(carry):
            i, cache, _, tokens, valid, q, confidence, drafting, run_prob = carry
            slot = committed + i                                                  # token i's slot
            cache = cache.replace(lengths=slot)
            step_logits, _, cache = forward_step(self.model, tokens[:, i][:, None], cache,
                                                 slot[:, None])
            drawn = draw(i, step_logits[:, 0], tokens, valid, q, confidence, drafting, run_prob)
            return i + 1, cache, None, *drawn

        first = draw(0, logits[:, 1], tokens, valid, q, confidence, ctx.active,
                     jnp.ones((batch,), jnp.float32))
        carry = (jnp.int32(1), cache, None, *first)
        _, cache, _, tokens, valid, q, confidence, _, _ = jax.lax.while_loop(cond, body, carry)
        parents = jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (batch, n))
        draft = Draft(tokens=tokens, parents=parents, valid=valid, q=q, confidence=confidence)
        return draft, state.replace(cache=cache.replace(lengths=committed))

    def commit(self, state: DraftModelState, ctx: Context, draft: Draft, verdict, target_logits):
        if self.branching:
            return draft_model_tree.commit(self, state, ctx, draft, verdict)
        if not self.adaptive:
            return state
        drafted = jnp.sum(draft.valid, axis=1) - 1                                 # [B]
        full = verdict.num_accepted >= drafted
        grown = jnp.where(full, state.num_tokens + 2, state.num_tokens - 1)
        return state.replace(num_tokens=jnp.clip(grown, 1, self.k))
