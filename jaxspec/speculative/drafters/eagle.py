"""Eagle: an EAGLE-style feature drafter (one decoder layer over the target's own hidden states).

Notation: x_p is the token at position p, f_p the target's final hidden state after x_p (after the
final norm: the vector the target's LM head reads, as in the EAGLE reference code, which feeds
`base_model.model(...)[0]` to the drafter), e the target's frozen token embedding.

The drafter's input at position p is fc([f_p ; e(x_{p+1})]) ([2D] -> [D]); one decoder layer of
the target's own shape (causal attention over the drafter's own KV cache) turns it into h_p, a
prediction of f_{p+1}; the LM head (the target's tied embedding, restricted to the V' token ids of
VocabTrim, `head_ids`; the lm_head kernel for untied targets) turns h_p into draft logits for x_{p+2}. Drafting goes on from predicted
features: a drafted node's input is [h_parent ; e(its token)].

Per round, with c committed target positions (root x_c not yet in the target's cache):
  1. catch-up: positions whose true features arrived since the last round (the accepted path
     of the last verification, or the prompt's last position) are fed with their true features
     (at most max_depth + 1 of them, a static window); the output at position c - 1 is h_root
     (predicted f_c), whose logits give the root's children. The drafter's cache then holds
     exactly the positions < c, all computed from true features.
  2. one feed per tree level: nodes 1 .. end of the draft tree, each at position c + depth - 1,
     attending to the cache and to their own tree ancestors, give the logits of the next level.
     (Earlier levels are re-fed each level, so no node sees a cousin; the layer is small.)
Children are the top-(number of children) draft tokens at temperature 0 and a Gumbel-top-k
without-replacement draw from the processed draft distribution q otherwise (rule
"speculative_wor", lossless; q is zero outside the V' head tokens). After verification the
target's hidden states at the accepted path become the next round's catch-up features.

Dynamic trees (`tree=js.trees.dynamic(budget, max_depth, top_k)`, EAGLE-2). Level 1 holds the
root's top_k head tokens; at each later level the top_k candidates of the level above by
cumulative draft log-probability (the sum along the path) are expanded, each with its top_k
children: one feed of the expanded nodes so far per level, as in step 2. The best `budget`
candidates are kept and ordered by that score, best first (ties by candidate index): a child
never outscores its parent and comes later among the candidates, so every prefix of the nodes is
a tree, and a per-round size that verifies the first S nodes (costs.choose_size) verifies the S
most probable ones. The candidates are top-k of the raw draft distribution, a deterministic
function of the context, so the draft carries no q and is verified as one-hot proposals (greedy
at temperature 0, multi-draft "speculative" otherwise): lossless. `stop_below` skips a level when
no active row's best candidate above it has path probability >= stop_below.

`Eagle.load(path)` reads a trained drafter (safetensors + config.json); `Eagle.create(target)`
makes a random one (tests, training from scratch). A drafter is tied to the target it was trained
for: `check_compatible` refuses another target by hidden size, vocabulary or weight fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.attention import attention
from jaxspec.models.cache import KVCache, write_layer
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import Model, _dense, _mlp, _norm, _qkv
from jaxspec.sampling import Sampling, processed_logits
from jaxspec.speculative.costs import CostModel, checked_calibrated, checked_sizing
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.trees import DynamicTree, TreeSpec, ancestors_of, chain


def fingerprint(target: Model) -> str:
    """A short hash of a target's config and a sample of its weights (embedding and final norm)."""
    c = target.config
    h = hashlib.sha256(repr((c.family, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
                             c.num_kv_heads, c.head_dim, c.intermediate_size)).encode())
    # Sampled as bfloat16, so the same weights loaded in float32 or bfloat16 give one fingerprint.
    embed = np.asarray(jax.device_get(target.params["embed"][:64:7, :64].astype(jnp.bfloat16)),
                       np.float32)
    norm = np.asarray(jax.device_get(target.params["final_norm"]["scale"][:64].astype(jnp.bfloat16)),
                      np.float32)
    h.update(np.round(embed, 3).tobytes())
    h.update(np.round(norm, 3).tobytes())
    return h.hexdigest()[:16]


def layer_config(target_config: ModelConfig) -> ModelConfig:
    """The drafter's one decoder layer: the target's layer shape, llama-style."""
    c = target_config
    return ModelConfig(family="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                       num_layers=1, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                       head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                       max_position_embeddings=c.max_position_embeddings, norm_eps=c.norm_eps,
                       rope_theta=c.rope_theta, rope_scaling=c.rope_scaling)


def init_params(config: ModelConfig, num_head_tokens: int, key, dtype=jnp.float32) -> dict:
    """Random drafter parameters: fc [2D, D] + bias, one decoder layer, head_ids [V']."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    keys = iter(jax.random.split(key, 8))

    def w(shape, fan_in):
        return (jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)

    layer = {"attn_norm": {"scale": jnp.ones((d,), dtype)}, "mlp_norm": {"scale": jnp.ones((d,), dtype)},
             "q": {"kernel": w((d, q), d)}, "k": {"kernel": w((d, kv), d)},
             "v": {"kernel": w((d, kv), d)}, "o": {"kernel": w((q, d), q) * 0.1},
             "gate": {"kernel": w((d, f), d)}, "up": {"kernel": w((d, f), d)},
             "down": {"kernel": w((f, d), f) * 0.1}}
    return {"fc": {"kernel": w((2 * d, d), 2 * d), "bias": jnp.zeros((d,), dtype)}, "layer": layer,
            "head_ids": jnp.arange(num_head_tokens, dtype=jnp.int32)}


def draft_features(params: dict, config: ModelConfig, features, next_embeds):
    """fc([f ; e]) -> the decoder layer's input. features, next_embeds: [B, T, D] -> [B, T, D]."""
    x = jnp.concatenate([features, next_embeds.astype(features.dtype)], axis=-1)     # [B, T, 2D]
    return _dense(x, params["fc"])


def layer_step(params: dict, config: ModelConfig, x, cache: KVCache, positions, mask=None):
    """The decoder layer on T new inputs against the drafter's cache (K/V written at
    [len, len + T), len not moved). x: [B, T, D]; positions: [B, T]; mask: [B, T, T] or None."""
    lp = params["layer"]
    q, k, v = _qkv(_norm(x, lp["attn_norm"], config), lp, positions, config)
    cache_k, cache_v = write_layer(cache.k, cache.v, 0, k, v, cache.lengths)
    out = attention(q, cache_k[0], cache_v[0], cache.lengths, mask,
                    scale=1.0 / math.sqrt(config.head_dim), impl="xla")               # [B, T, H, Dh]
    x = x + _dense(out.reshape(*out.shape[:2], -1), lp["o"])
    x = x + _mlp(_norm(x, lp["mlp_norm"], config), lp, config)
    return x, cache.replace(k=cache_k, v=cache_v)


def head_rows(target_params: dict, head_ids):
    """The target's LM-head rows of the V' head tokens [V', D]: the tied embedding, or the
    untied lm_head kernel's columns."""
    if "lm_head" in target_params:
        return jnp.take(target_params["lm_head"]["kernel"], head_ids, axis=1).T
    return target_params["embed"][head_ids]


def head_logits(head, h):
    """Draft logits over the V' head tokens. head: [V', D]; h: [..., D] -> [..., V'] float32."""
    return jnp.einsum("...D,VD->...V", h, head.astype(h.dtype)).astype(jnp.float32)


def _tree_meta(tree) -> dict:
    """config.json's description of a drafter's tree (Eagle.save)."""
    if isinstance(tree, DynamicTree):
        return {"dynamic_tree": [tree.budget, tree.max_depth, tree.top_k]}
    return {"tree_parents": [int(p) for p in tree.parents]}


def _tree_from_meta(meta: dict):
    """The tree a config.json describes, or None (Eagle.load)."""
    from jaxspec.speculative.trees import dynamic, from_parents

    if meta.get("dynamic_tree"):
        return dynamic(*meta["dynamic_tree"])
    parents = meta.get("tree_parents")
    return from_parents(parents) if parents else None


@struct.dataclass
class EagleState:
    cache: KVCache          # the drafter's one-layer cache; lengths = positions fed with true f
    pending: jax.Array      # [B, P, D] true target features not yet fed (positions len .. len+n)
    num_pending: jax.Array  # [B] int32
    head: jax.Array | None = None   # [V', D] the target's LM-head rows of the head tokens and
    embed: jax.Array | None = None  # [V, D] its token embedding: here only for an unbound
                                    # drafter (the loop binds them: see Eagle.bind)
    # Catch-up slots of a usual round (P above is this unless a wrapper lets rounds go by
    # without a catch-up, js.Hybrid: then a round with more pending uses all P).
    window: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class Eagle:
    """An EAGLE-style feature drafter: one decoder layer over the target's own hidden states.

    `Eagle.load(dir)` reads a trained drafter (`js.default_drafter(target)` finds the shipped
    one), `Eagle.create(target)` makes a random one to train (`jaxspec.train.eagle`), and
    `.with_tree(num_tokens=k)` / `.with_tree(tree=js.trees...)` reshapes the draft. Greedy at
    temperature 0, `speculative_wor` under sampling: lossless. `sizing` ("auto", a cost model, a
    {tokens: ms} table or None) lets greedy rounds verify only as many nodes as pay (docs/sizing.md).
    Tied to the target it was trained for (weight fingerprint). See the module docstring.
    """

    params: dict
    config: ModelConfig = struct.field(pytree_node=False)
    num_tokens: int = struct.field(pytree_node=False, default=5)
    tree: TreeSpec | DynamicTree | None = struct.field(pytree_node=False, default=None)
    target_fingerprint: str | None = struct.field(pytree_node=False, default=None)
    # Per-round verify size from the target's measured cost curve and the draft's confidence:
    # "auto" (js.generate measures the curve once and caches it), a costs.CostModel or a
    # {new tokens: ms} table, or None (always verify the whole tree).
    sizing: object = struct.field(pytree_node=False, default="auto")
    # A deeper tree level is drafted only while some active row's best node at the level above
    # has path probability (product of draft confidences from the root) >= stop_below; later
    # levels are left invalid (never verified, never accepted). None drafts every level. The
    # decision reads only nodes above the level it cuts, so the sampled rule stays lossless.
    stop_below: float | None = struct.field(pytree_node=False, default=0.1)
    # Sized greedy rounds scale the confidences by each row's record (node 1's confidence
    # against the target's argmax, costs.calibrated_confidence); False takes them as drafted.
    calibrated: bool = struct.field(pytree_node=False, default=True)
    # The target's frozen arrays the drafter reads ({"embed": [V, D], "head": [V', D]}), bound
    # once per program (`bind`) so they are loop constants, not a 100+ MB while_loop carry.
    bound: dict | None = None

    uses_target_hidden = True

    def __post_init__(self):
        object.__setattr__(self, "sizing", checked_sizing(self.sizing))
        checked_calibrated(self.calibrated)
        if self.tree is None:
            if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) \
                    or not 1 <= self.num_tokens <= 64:
                raise ValueError(f"num_tokens must be an integer in [1, 64], got {self.num_tokens!r}")
            object.__setattr__(self, "tree", chain(self.num_tokens))
        elif not isinstance(self.tree, (TreeSpec, DynamicTree)):
            raise ValueError(f"Eagle tree must be a js.trees TreeSpec (chain, kary, from_paths) or "
                             f"js.trees.dynamic(...), got {type(self.tree).__name__}")
        elif self.tree.max_depth < 1:
            raise ValueError("Eagle tree drafts nothing: give a tree with at least one draft node")
        if self.stop_below is not None and not 0.0 <= self.stop_below < 1.0:
            raise ValueError(f"stop_below must be in [0, 1) or None, got {self.stop_below!r}")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, target: Model, num_tokens: int = 5, tree: TreeSpec | DynamicTree | None = None,
               head_tokens: int | None = None, key=0, dtype=jnp.float32) -> "Eagle":
        """A randomly initialised drafter for `target` (head over the first V' ids, or all)."""
        config = layer_config(target.config)
        v = target.config.vocab_size if head_tokens is None else int(head_tokens)
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        return cls(params=init_params(config, v, key, dtype), config=config, num_tokens=num_tokens,
                   tree=tree, target_fingerprint=fingerprint(target))

    def with_tree(self, num_tokens: int | None = None, tree: TreeSpec | DynamicTree | None = None,
                  sizing=...) -> "Eagle":
        """The same trained weights with another chain length or tree (or sizing)."""
        return self.replace(num_tokens=self.num_tokens if num_tokens is None else num_tokens,
                            tree=tree, sizing=self.sizing if sizing is ... else sizing)

    def save(self, path: str | os.PathLike, dtype: str = "bfloat16", extra: dict | None = None):
        """safetensors weights + config.json (layer config, head size, target fingerprint)."""
        from safetensors.numpy import save_file
        import ml_dtypes

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
        flat = {}
        for keypath, value in jax.tree_util.tree_flatten_with_path(self.params)[0]:
            name = ".".join(str(getattr(k, "key", k)) for k in keypath)
            arr = np.asarray(jax.device_get(value))
            flat[name] = arr if arr.dtype == np.int32 else arr.astype(np.float32).astype(np_dtype)
        save_file(flat, str(path / "model.safetensors"))
        meta = {"kind": "eagle", "layer": dataclasses.asdict(self.config),
                "head_tokens": int(self.params["head_ids"].shape[0]),
                "num_tokens": self.num_tokens, **_tree_meta(self.tree),
                "target_fingerprint": self.target_fingerprint, **(extra or {})}
        (path / "config.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: str = "float32", num_tokens: int | None = None,
             tree: TreeSpec | DynamicTree | None = None) -> "Eagle":
        from safetensors import safe_open

        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise ValueError(f"{path} is not an Eagle drafter directory (needs config.json and "
                             "model.safetensors, as written by Eagle.save)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("kind") != "eagle":
            raise ValueError(f"{cfg_file} describes a {meta.get('kind')!r} drafter, not an Eagle one")
        layer = dict(meta["layer"])
        for key in ("rope_scaling", "eos_token_ids"):
            if isinstance(layer.get(key), list):
                layer[key] = tuple(layer[key])
        config = ModelConfig(**layer)
        jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        params: dict = {}
        with safe_open(str(weights), framework="numpy") as f:
            for name in f.keys():
                arr = f.get_tensor(name)
                node = params
                *parents, leaf = name.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = jnp.asarray(arr if arr.dtype == np.int32
                                         else arr.astype(np.float32)).astype(
                    jnp.int32 if arr.dtype == np.int32 else jdtype)
        if tree is None and num_tokens is None:
            tree = _tree_from_meta(meta)
        return cls(params=params, config=config,
                   num_tokens=meta.get("num_tokens", 5) if num_tokens is None else num_tokens,
                   tree=tree, target_fingerprint=meta.get("target_fingerprint"))

    # -- drafter protocol -------------------------------------------------------------------
    def bind(self, target: Model) -> "Eagle":
        """This drafter with the target's embedding and head rows attached (the loop calls it)."""
        return self.replace(bound={"embed": target.params["embed"],
                                   "head": head_rows(target.params, self.params["head_ids"])})

    def _arrays(self, state):
        if self.bound is not None:
            return self.bound["embed"], self.bound["head"]
        return state.embed, state.head

    @property
    def rule(self) -> str:
        """Verification rule at temperature > 0: static trees' children are Gumbel-top-k draws
        without replacement from q ("speculative_wor"); a dynamic tree's candidates are
        deterministic, verified as one-hot proposals (the default)."""
        return "auto" if isinstance(self.tree, DynamicTree) else "speculative_wor"

    def cache_slack(self) -> int:
        return self.tree.max_depth + 1

    def check_compatible(self, target: Model) -> None:
        c, t = self.config, target.config
        if (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) != \
                (t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim):
            raise ValueError(f"this Eagle drafter was built for a target with hidden size "
                             f"{c.hidden_size} ({c.num_heads} heads of {c.head_dim}), but the target "
                             f"has hidden size {t.hidden_size} ({t.num_heads} heads of {t.head_dim})")
        if c.vocab_size != t.vocab_size:
            raise ValueError(f"this Eagle drafter was trained for a vocabulary of {c.vocab_size} "
                             f"tokens, but the target's is {t.vocab_size}")
        if self.target_fingerprint is not None and self.target_fingerprint != fingerprint(target):
            raise ValueError(f"this Eagle drafter was trained for another target (fingerprint "
                             f"{self.target_fingerprint}, this target's is {fingerprint(target)}); "
                             "train one for this target with `jaxspec train eagle`")
        width = self.tree.top_k if isinstance(self.tree, DynamicTree) else self.tree.max_children
        if width > self.params["head_ids"].shape[0]:
            raise ValueError(f"the tree has up to {width} children per node but the drafter's head "
                             f"has only {self.params['head_ids'].shape[0]} tokens")

    def init(self, target: Model, prompt_tokens, prompt_lengths, max_len: int, state=None,
             target_hidden=None, window: int | None = None, capacity: int | None = None):
        """Feed the prompt's positions 0 .. len-2 with their true features.

        prompt_tokens: [B, Tp]; target_hidden: [B, Tp, D] the target's hidden states there.
        window: catch-up slots per round (default this tree's depth + 1); a drafter that wraps
        this one and verifies deeper drafts (js.Hybrid) passes its own depth + 1.
        capacity: pending slots (>= window), for a wrapper that skips this drafter's rounds and
        lets the committed features pile up (`commit(..., behind=...)`)."""
        if target_hidden is None:
            raise ValueError("Eagle needs the target's hidden states (run it through "
                             "js.generate / js.speculative.generate_tokens)")
        batch, tp = prompt_tokens.shape
        embed = target.params["embed"]
        head = head_rows(target.params, self.params["head_ids"])                    # [V', D]
        cache = KVCache.create(self.config, batch, max_len, target_hidden.dtype)
        nxt = jnp.concatenate([prompt_tokens[:, 1:], prompt_tokens[:, -1:]], axis=1)  # [B, Tp]
        x = draft_features(self.params, self.config, target_hidden, embed[nxt])
        positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (batch, tp))
        _, cache = layer_step(self.params, self.config, x, cache, positions)
        rows = jnp.arange(batch)
        window = max(self.tree.max_depth + 1, window or 0)
        p = max(window, capacity or 0)
        last = target_hidden[rows, jnp.maximum(prompt_lengths - 1, 0)]              # [B, D]
        pending = jnp.zeros((batch, p, target_hidden.shape[-1]), target_hidden.dtype)
        pending = pending.at[:, 0].set(last)
        unbound = self.bound is None
        return EagleState(cache=cache.replace(lengths=jnp.maximum(prompt_lengths - 1, 0)),
                          pending=pending, num_pending=jnp.ones((batch,), jnp.int32),
                          head=head if unbound else None, embed=embed if unbound else None,
                          window=window)

    def propose(self, state: EagleState, ctx: Context, sampling: Sampling, key, vocab: int):
        tree = self.tree
        batch = ctx.length.shape[0]
        rows = jnp.arange(batch)
        head_ids = self.params["head_ids"]
        embed, head = self._arrays(state)
        committed = ctx.cache_lengths                                                # c [B]
        stable = state.cache.lengths                                                 # c - n_pending
        # 1. catch-up on the true features of positions [stable, c).
        def catch_up(width: int):
            offs = jnp.arange(width)[None, :]
            nxt_pos = jnp.minimum(stable[:, None] + offs + 1, ctx.history.shape[1] - 1)  # [B, P]
            nxt = jnp.take_along_axis(ctx.history, nxt_pos, axis=1)
            x = draft_features(self.params, self.config, state.pending[:, :width], embed[nxt])
            out, cache = layer_step(self.params, self.config, x, state.cache,
                                    stable[:, None] + offs)
            return out[rows, jnp.maximum(state.num_pending - 1, 0)], cache           # [B, D]

        p, window = state.pending.shape[1], state.window or state.pending.shape[1]
        if p == window:
            h_root, cache = catch_up(p)
        else:  # the wide catch-up only after skipped rounds (js.Hybrid)
            most = jnp.max(jnp.where(ctx.active, state.num_pending, 0))
            h_root, cache = jax.lax.cond(most <= window, lambda: catch_up(window),
                                         lambda: catch_up(p))
        cache = cache.replace(lengths=committed)
        if isinstance(tree, DynamicTree):
            draft = self._propose_dynamic(ctx, h_root, cache, embed, head, head_ids)
            return draft, state.replace(cache=cache)
        # 2. tree levels.
        n, max_depth = tree.num_nodes, tree.max_depth
        depths, parents_np = tree.depths, np.asarray(tree.parents)
        num_children = np.bincount(parents_np[1:], minlength=n)
        root = ctx.history[rows, ctx.length - 1]
        tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(root)
        valid = jnp.zeros((batch, n), bool).at[:, 0].set(True)
        q = None if sampling.greedy else jnp.zeros((batch, n, vocab), jnp.float32)
        confidence = jnp.ones((batch, n), jnp.float32)
        hidden = jnp.zeros((batch, n, h_root.shape[-1]), h_root.dtype).at[:, 0].set(h_root)
        path_prob = jnp.ones((batch, n), jnp.float32)       # product of confidences from the root
        carry = (tokens, valid, q, confidence, hidden, path_prob)
        for level in range(max_depth):
            expand = np.flatnonzero((depths == level) & (num_children > 0))         # static
            if expand.size == 0:
                continue
            draft_level = functools.partial(self._draft_level, level, expand, committed, cache,
                                            embed, head, head_ids, sampling, key, vocab,
                                            ctx.active)
            if level == 0 or self.stop_below is None:
                carry = draft_level(carry)
            else:  # skip the level (and so every deeper one) when no row is likely to get there
                frontier = jnp.where(ctx.active[:, None] & carry[1][:, expand],
                                     carry[5][:, expand], 0.0)                       # [B, U]
                carry = jax.lax.cond(jnp.max(frontier) >= self.stop_below, draft_level,
                                     lambda c: c, carry)
        tokens, valid, q, confidence, _, _ = carry
        parents = jnp.broadcast_to(jnp.asarray(parents_np, jnp.int32), (batch, n))
        draft = Draft(tokens=tokens, parents=parents, valid=valid, q=q, confidence=confidence)
        return draft, state.replace(cache=cache)

    def _draft_level(self, level, expand, committed, cache, embed, head, head_ids, sampling, key,
                     vocab, active, carry):
        """Draft the children of the tree nodes `expand` (static, all at depth `level`)."""
        tree = self.tree
        n = tree.num_nodes
        depths, parents_np, ranks = tree.depths, np.asarray(tree.parents), tree.child_rank
        num_children = np.bincount(parents_np[1:], minlength=n)
        tokens, valid, q, confidence, hidden, path_prob = carry
        batch = tokens.shape[0]
        if level > 0:  # feed nodes 1 .. end (earlier levels again) to get these nodes' h
            end = int(expand.max()) + 1
            nodes = np.arange(1, end)
            inputs = draft_features(self.params, self.config,
                                    hidden[:, parents_np[nodes]], embed[tokens[:, nodes]])
            mask = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask[1:end, 1:end]),
                                    (batch, end - 1, end - 1))
            positions = committed[:, None] + jnp.asarray(depths[nodes] - 1)[None, :]
            fed, _ = layer_step(self.params, self.config, inputs, cache, positions, mask)
            hidden = hidden.at[:, nodes].set(fed)
        logits = head_logits(head, hidden[:, expand])                      # [B, U, V']
        width = int(num_children[expand].max())
        if sampling.greedy:
            score = logits
        else:
            processed = processed_logits(logits, sampling)
            score = processed + jax.random.gumbel(jax.random.fold_in(key, level), processed.shape)
        top_score, top_index = jax.lax.top_k(score, width)                       # [B, U, W]
        kids = np.flatnonzero(np.isin(parents_np, expand) & (np.arange(n) > 0))
        slot = np.searchsorted(expand, parents_np[kids])
        tokens = tokens.at[:, kids].set(head_ids[top_index[:, slot, ranks[kids]]])
        valid = valid.at[:, kids].set(jnp.isfinite(top_score[:, slot, ranks[kids]])
                                      & active[:, None])
        # Acceptance estimate of each child: its draft probability (EAGLE-2's observation:
        # a well-trained draft's confidence tracks the acceptance rate).
        dist = jax.nn.softmax(logits if sampling.greedy else processed, axis=-1)  # [B, U, V']
        chosen = top_index[:, slot, ranks[kids]]                                 # [B, K]
        confidence = confidence.at[:, kids].set(
            jnp.take_along_axis(dist[:, slot], chosen[..., None], axis=-1)[..., 0])
        if q is not None:
            probs = jax.nn.softmax(processed, axis=-1)[:, slot]                  # [B, K, V']
            q = q.at[:, kids].set(jnp.zeros((batch, kids.size, vocab), jnp.float32)
                                  .at[:, :, head_ids].set(probs))
        path_prob = path_prob.at[:, kids].set(path_prob[:, parents_np[kids]]
                                              * confidence[:, kids])
        return tokens, valid, q, confidence, hidden, path_prob

    def _propose_dynamic(self, ctx: Context, h_root, cache: KVCache, embed, head, head_ids) -> Draft:
        """EAGLE-2: expand the top_k candidates per level by path log-probability, keep the best
        `budget`, best first (module docstring). h_root: [B, D]; cache holds positions < c."""
        spec: DynamicTree = self.tree
        k, max_depth, budget = spec.top_k, spec.max_depth, spec.budget
        batch, dim = h_root.shape
        rows = jnp.arange(batch)[:, None]                                            # [B, 1]
        committed = ctx.cache_lengths                                                # [B]
        c = 1 + spec.max_candidates                          # candidate 0 is the root
        e = (max_depth - 1) * k                              # fed (expanded) nodes, at most

        def level_start(depth: int) -> int:                  # first candidate id at a depth >= 1
            return 1 if depth == 1 else 1 + k + (depth - 2) * k * k

        root = ctx.history[rows[:, 0], ctx.length - 1]
        carry = dict(
            token=jnp.zeros((batch, c), jnp.int32).at[:, 0].set(root),               # [B, C]
            parent=jnp.full((batch, c), -1, jnp.int32),                              # candidate id
            score=jnp.full((batch, c), -jnp.inf, jnp.float32).at[:, 0].set(0.0),     # path log p
            logp=jnp.zeros((batch, c), jnp.float32),                                 # own log p
            fed=jnp.full((batch, c), -1, jnp.int32),                                 # index among fed
            fed_token=jnp.zeros((batch, max(e, 1)), jnp.int32),                      # [B, E]
            fed_parent=jnp.full((batch, max(e, 1)), -1, jnp.int32),                  # -1: the root
            fed_depth=jnp.ones((batch, max(e, 1)), jnp.int32),
            fed_hidden=jnp.zeros((batch, max(e, 1), dim), h_root.dtype))             # [B, E, D]

        def children(carry, depth, expanded, h_new):
            """Candidates at `depth` + 1: the top_k head tokens under each of the expanded
            candidates (ids [B, m]) whose predicted features are h_new [B, m, D]."""
            logp = jax.nn.log_softmax(head_logits(head, h_new).astype(jnp.float32), axis=-1)
            top_logp, top_index = jax.lax.top_k(logp, k)                             # [B, m, k]
            m = h_new.shape[1]
            span = level_start(depth + 1) + np.arange(m * k)
            parent_ids = jnp.repeat(expanded, k, axis=1)                             # [B, m*k]
            parent_score = jnp.take_along_axis(carry["score"], parent_ids, axis=1)
            return dict(carry,
                        token=carry["token"].at[:, span].set(
                            head_ids[top_index].reshape(batch, m * k)),
                        parent=carry["parent"].at[:, span].set(parent_ids),
                        logp=carry["logp"].at[:, span].set(top_logp.reshape(batch, m * k)),
                        score=carry["score"].at[:, span].set(
                            parent_score + top_logp.reshape(batch, m * k)))

        def expand(depth, carry):
            """Feed the top_k candidates at `depth` (with the expanded ones above) and add their
            children."""
            start = level_start(depth)
            count = k if depth == 1 else k * k
            _, pick = jax.lax.top_k(carry["score"][:, start:start + count], k)      # [B, k]
            expanded = start + pick                                                  # [B, k]
            new = (depth - 1) * k + np.arange(k)                                     # fed slots
            end = depth * k
            parent_fed = carry["fed"][rows, carry["parent"][rows, expanded]]         # [B, k]
            fed_token = carry["fed_token"].at[:, new].set(carry["token"][rows, expanded])
            fed_parent = carry["fed_parent"].at[:, new].set(parent_fed)
            fed_depth = carry["fed_depth"].at[:, new].set(depth)
            parent_h = jnp.where(
                (fed_parent[:, :end] < 0)[..., None], h_root[:, None],
                jnp.take_along_axis(carry["fed_hidden"],
                                    jnp.maximum(fed_parent[:, :end], 0)[..., None], axis=1))
            inputs = draft_features(self.params, self.config, parent_h, embed[fed_token[:, :end]])
            mask = ancestors_of(fed_parent[:, :end], depth)                          # [B, T, T]
            positions = committed[:, None] + fed_depth[:, :end] - 1
            fed_out, _ = layer_step(self.params, self.config, inputs, cache, positions, mask)
            carry = dict(carry, fed=carry["fed"].at[rows, expanded].set(
                             jnp.asarray(new, jnp.int32)[None, :]),
                         fed_token=fed_token, fed_parent=fed_parent, fed_depth=fed_depth,
                         fed_hidden=carry["fed_hidden"].at[:, :end].set(fed_out))
            return children(carry, depth, expanded, fed_out[:, new])

        carry = children(carry, 0, jnp.zeros((batch, 1), jnp.int32), h_root[:, None])
        for depth in range(1, max_depth):
            if self.stop_below is None:
                carry = expand(depth, carry)
            else:  # skip the level (and so every deeper one) when no row is likely to get there
                start = level_start(depth)
                best = jnp.max(carry["score"][:, start:start + (k if depth == 1 else k * k)], axis=1)
                best = jnp.where(ctx.active, best, -jnp.inf)
                carry = jax.lax.cond(jnp.max(best) >= math.log(max(self.stop_below, 1e-30)),
                                     functools.partial(expand, depth), lambda c: c, carry)
        # Keep the best `budget` candidates, best first; a stable sort puts a parent (higher or
        # equal score, smaller id) before its children, so node i's parent is a node < i.
        order = jnp.argsort(-carry["score"][:, 1:], axis=1, stable=True)[:, :budget] + 1
        node = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), order.astype(jnp.int32)], 1)
        n = budget + 1
        index_of = jnp.full((batch, c), -1, jnp.int32).at[rows, node].set(
            jnp.arange(n, dtype=jnp.int32)[None, :])
        parents = jnp.take_along_axis(index_of, jnp.maximum(carry["parent"][rows, node], 0), axis=1)
        parents = parents.at[:, 0].set(-1)
        score = carry["score"][rows, node]
        valid = (jnp.isfinite(score) & ctx.active[:, None]).at[:, 0].set(True)
        confidence = jnp.exp(carry["logp"][rows, node]).at[:, 0].set(1.0)
        return Draft(tokens=carry["token"][rows, node], parents=parents, valid=valid, q=None,
                     confidence=confidence)

    def commit(self, state: EagleState, ctx: Context, draft: Draft, verdict, target_logits,
               target_hidden=None, behind=None):
        """The target's hidden states on the accepted path become the next catch-up features.

        behind: [B] bool, rows whose catch-up this round was skipped (js.Hybrid): their features
        go after the ones still pending instead of replacing them (the caller keeps the pending
        count + depth + 1 within the capacity)."""
        path_hidden = jnp.take_along_axis(target_hidden, verdict.path[:, :, None], axis=1)  # [B, D+1, D]
        if path_hidden.shape[1] > state.pending.shape[1]:
            raise ValueError(f"the verified drafts are {path_hidden.shape[1] - 1} deep but this "
                             f"Eagle's catch-up window holds {state.pending.shape[1]} positions: "
                             "pass window=depth + 1 to Eagle.init")
        batch, width = path_hidden.shape[:2]
        path_hidden = path_hidden.astype(state.pending.dtype)
        if behind is None and width == state.pending.shape[1]:
            start, written = jnp.zeros((batch,), jnp.int32), path_hidden
        else:
            start = jnp.zeros((batch,), jnp.int32) if behind is None else \
                jnp.where(behind, state.num_pending, 0)                              # [B]
            slots = start[:, None] + jnp.arange(width)[None, :]                      # [B, D+1]
            written = state.pending.at[jnp.arange(batch)[:, None], slots].set(path_hidden,
                                                                               mode="drop")
        pending = jnp.where(ctx.active[:, None, None], written, state.pending)
        num = jnp.where(ctx.active, start + verdict.num_accepted + 1, state.num_pending)
        return state.replace(pending=pending, num_pending=num)
