"""Medusa: K extra decoding heads on the target's own final hidden state (Medusa-1).

Notation as in eagle.py: x_p is the token at position p, f_p the target's final hidden state
after x_p (after the final norm: the vector its LM head reads, so lm_head(f_p) predicts x_{p+1}).

Head k (k = 1..K) is a residual block and its own LM head over the V' head tokens (VocabTrim's
`head_ids`):  r_k = f + SiLU(W_k f + b_k)  ([D] -> [D]),  logits_k = L_k r_k  ([V', D] @ [D]).
W_k starts at zero (the block is the identity) and L_k at the target's LM head rows of the head
tokens (the tied embedding, or the lm_head kernel of an untied target), so an untrained head
predicts what the target itself predicts. Trained, head k applied to f_t predicts x_{t+k+1}.

Per round, with c committed target positions (the root x_c is not in the target's cache yet),
the freshest feature is f_{c-1}: the target's hidden state at the last accepted node of the
previous verification (or at the prompt's last position), whose LM-head prediction IS the root.
So head k on f_{c-1} predicts x_{c+k}: the draft token at depth k. Candidates are the per-head
top-k lists combined along a static choice tree (`js.trees.from_paths`): a node at depth d whose
path of child ranks ends in r carries head d's rank-r token. One head evaluation per round, no
drafter cache; the only state is f_{c-1} per row.

Candidates are deterministic (Draft.q = None): the rules treat them as one-hot proposals, which
is lossless ("greedy" at temperature 0, the multi-draft "speculative" rule otherwise). Medusa's
own typical acceptance (rule="typical") is available as an option; it is LOSSY at temperature
> 0 (it equals greedy at temperature 0).

With shared_head=True the heads keep no LM head of their own: all K read the target's frozen LM-head
rows of the head tokens, attached per program by `bind(target)` (as Eagle's are), so a trained
set is only K residual blocks (about 2 MB in bfloat16 for SmolLM2-135M).

Per-node confidence is head d's probability of the node's token; with `sizing` (default "auto",
as for Eagle) the loop verifies only the prefix of the choice tree that pays (costs.py).

`Medusa.create(target, num_heads)` makes fresh heads (identity blocks), `Medusa.load(path)` reads
trained ones (safetensors + config.json, kind "medusa"); training is in jaxspec/train/medusa.py.
`check_compatible` refuses another target by hidden size, vocabulary or weight fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.models.transformer import Model
from jaxspec.sampling import Sampling
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.eagle import fingerprint
from jaxspec.speculative.trees import TreeSpec, chain, from_parents, from_paths

RULES = ("speculative", "speculative_wor", "typical")

# The default choice tree, for CPU-sized verification: 10 draft nodes, depth 4; wide where the
# heads are surest (head 1 top-3), a top-1 spine to depth 4. Cut to the heads' count.
DEFAULT_PATHS = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
                 (0, 0, 0, 0))


def default_tree(num_heads: int) -> TreeSpec:
    """DEFAULT_PATHS cut to depth num_heads (every prefix of a kept path is kept)."""
    return from_paths([p for p in DEFAULT_PATHS if len(p) <= num_heads])


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """The static shape of a set of heads: target hidden size D, target vocabulary V, K heads."""

    hidden_size: int
    vocab_size: int
    num_heads: int


def init_params(target: Model, num_heads: int, head_ids, key, init_std: float = 0.0,
                dtype=jnp.float32) -> dict:
    """heads: kernel [K, D, D] (zero: identity blocks, or N(0, init_std^2 / D)), bias [K, D];
    lm_head [K, V', D] = the target's LM head rows of head_ids, per head; head_ids [V']."""
    d = target.config.hidden_size
    head_ids = jnp.asarray(head_ids, jnp.int32)
    if target.config.tie_word_embeddings or "lm_head" not in target.params:
        rows = target.params["embed"][head_ids]                                   # [V', D]
    else:
        rows = target.params["lm_head"]["kernel"][:, head_ids].T                  # [V', D]
    kernel = jnp.zeros((num_heads, d, d), jnp.float32)
    if init_std:
        kernel = jax.random.normal(key, kernel.shape, jnp.float32) * (init_std / math.sqrt(d))
    return {"heads": {"kernel": kernel.astype(dtype), "bias": jnp.zeros((num_heads, d), dtype)},
            "lm_head": jnp.broadcast_to(rows.astype(dtype), (num_heads, *rows.shape)),
            "head_ids": head_ids}


def head_states(params: dict, h, heads=None):
    """Residual blocks r_k = h + SiLU(W_k h + b_k). h: [..., D] -> [..., K, D] float32 (all heads,
    or the heads listed in the static tuple `heads`, 0-based)."""
    kernel, bias = params["heads"]["kernel"], params["heads"]["bias"]        # [K, D, D], [K, D]
    if heads is not None:
        kernel, bias = kernel[np.asarray(heads)], bias[np.asarray(heads)]
    h = h.astype(jnp.float32)
    z = jnp.einsum("...D,KDE->...KE", h, kernel.astype(jnp.float32)) + bias.astype(jnp.float32)
    return h[..., None, :] + jax.nn.silu(z)


def head_logits(params: dict, h, heads=None):
    """Logits over the V' head tokens. h: [..., D] -> [..., K, V'] float32. params["lm_head"]
    is per head [K, V', D] or shared by every head [V', D]."""
    lm = params["lm_head"]                                                  # [K, V', D] | [V', D]
    states = head_states(params, h, heads)                                  # [..., K, D]
    if lm.ndim == 2:
        return jnp.einsum("...KD,VD->...KV", states, lm.astype(jnp.float32))
    if heads is not None:
        lm = lm[np.asarray(heads)]
    return jnp.einsum("...KD,KVD->...KV", states, lm.astype(jnp.float32))


@struct.dataclass
class MedusaState:
    pending: jax.Array      # [B, D] f_{c-1}: the target's hidden state whose prediction is the root


@struct.dataclass
class Medusa:
    """Medusa-1 heads on the target's final hidden state: head k predicts the token at depth k.

    `Medusa.create(target, num_heads)` makes identity heads (they predict what the target does),
    `jaxspec.train.medusa.train` trains them, `Medusa.load(dir)` reads trained ones. Candidates are
    the heads' top-k along a static choice tree (`tree`, or a chain of `num_tokens`). `rule`:
    "speculative" (default, lossless) or "typical" (Medusa's typical acceptance, LOSSY at
    temperature > 0). See the module docstring.
    """

    params: dict
    config: MedusaConfig = struct.field(pytree_node=False)
    num_tokens: int | None = struct.field(pytree_node=False, default=None)
    tree: TreeSpec | None = struct.field(pytree_node=False, default=None)
    target_fingerprint: str | None = struct.field(pytree_node=False, default=None)
    rule: str = struct.field(pytree_node=False, default="speculative")
    # Per-round verify size: "auto" (the target's measured cost curve, cached), a
    # costs.CostModel or {new tokens: ms} table, or None (always verify the whole tree).
    sizing: object = struct.field(pytree_node=False, default="auto")
    # Sized greedy rounds scale the confidences by each row's record (node 1's confidence
    # against the target's argmax, costs.calibrated_confidence); False takes them as drafted.
    calibrated: bool = struct.field(pytree_node=False, default=True)
    # {"lm_head": [V', D]}: the target's LM-head rows, for shared-head drafters (see bind).
    bound: dict | None = None

    uses_target_hidden = True

    def __post_init__(self):
        from jaxspec.speculative.costs import checked_calibrated, checked_sizing

        object.__setattr__(self, "sizing", checked_sizing(self.sizing))
        checked_calibrated(self.calibrated)
        k = self.config.num_heads
        if self.tree is None:
            if self.num_tokens is None:
                object.__setattr__(self, "tree", default_tree(k))
            else:
                if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) \
                        or self.num_tokens < 1:
                    raise ValueError(f"num_tokens must be an integer >= 1 (at most the number of "
                                     f"heads, {k}), got {self.num_tokens!r}")
                object.__setattr__(self, "tree", chain(self.num_tokens))
        elif not isinstance(self.tree, TreeSpec):
            raise ValueError(f"Medusa tree must be a js.trees TreeSpec (chain, kary, from_paths), "
                             f"got {type(self.tree).__name__}")
        if self.tree.max_depth < 1:
            raise ValueError("Medusa tree drafts nothing: give a tree with at least one draft node")
        if self.tree.max_depth > k:
            raise ValueError(f"the tree is {self.tree.max_depth} deep but this Medusa drafter has "
                             f"only {k} heads (head k drafts depth k); give a tree at most {k} "
                             f"deep (num_tokens <= {k}) or train more heads")
        if self.rule not in RULES:
            raise ValueError(f"Medusa rule must be 'speculative' (lossless), 'speculative_wor' "
                             f"(lossless) or 'typical' (Medusa's typical acceptance, lossy at "
                             f"temperature > 0), got {self.rule!r}")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, target: Model, num_heads: int = 4, tree: TreeSpec | None = None,
               num_tokens: int | None = None, head_tokens=None, key=0, init_std: float = 0.0,
               rule: str = "speculative", dtype=jnp.float32, shared_head: bool = False) -> "Medusa":
        """Fresh heads for `target`: identity blocks (init_std 0) and the target's LM head rows
        (per head, trainable; with shared_head=True none are kept: bound from the target).

        head_tokens: None (all V ids), an int V' (the first V' ids) or a sequence of token ids
        (VocabTrim, e.g. jaxspec.train.eagle.head_token_ids). key seeds W when init_std > 0."""
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
        v = target.config.vocab_size
        if head_tokens is None:
            head_ids = np.arange(v, dtype=np.int32)
        elif isinstance(head_tokens, (int, np.integer)) and not isinstance(head_tokens, bool):
            if not 1 <= head_tokens <= v:
                raise ValueError(f"head_tokens must be in [1, {v}] (the target's vocabulary), "
                                 f"got {head_tokens}")
            head_ids = np.arange(int(head_tokens), dtype=np.int32)
        else:
            head_ids = np.unique(np.asarray(head_tokens, np.int64))
            if head_ids.ndim != 1 or head_ids.size == 0 or head_ids[0] < 0 or head_ids[-1] >= v:
                raise ValueError(f"head_tokens ids must be a non-empty list of token ids in "
                                 f"[0, {v}), got {head_tokens!r:.80}")
            head_ids = head_ids.astype(np.int32)
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        config = MedusaConfig(hidden_size=target.config.hidden_size, vocab_size=v,
                              num_heads=num_heads)
        params = init_params(target, num_heads, head_ids, key, init_std, dtype)
        if shared_head:
            params.pop("lm_head")
        return cls(params=params, config=config, num_tokens=num_tokens, tree=tree,
                   target_fingerprint=fingerprint(target), rule=rule)

    def with_tree(self, num_tokens: int | None = None, tree: TreeSpec | None = None,
                  rule: str | None = None) -> "Medusa":
        """The same heads with another chain length, tree or rule (neither: keep the tree)."""
        if num_tokens is None and tree is None:
            num_tokens, tree = self.num_tokens, self.tree
        return self.replace(num_tokens=num_tokens, tree=tree,
                            rule=self.rule if rule is None else rule)

    @property
    def shared_head(self) -> bool:
        """True when the heads read the target's LM-head rows (no lm_head of their own)."""
        return "lm_head" not in self.params

    def save(self, path: str | os.PathLike, dtype: str = "bfloat16", extra: dict | None = None):
        """safetensors weights (heads.kernel, heads.bias, lm_head, head_ids) + config.json."""
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
        meta = {"kind": "medusa", "config": dataclasses.asdict(self.config),
                "head_tokens": int(self.params["head_ids"].shape[0]),
                "num_tokens": self.num_tokens, "tree_parents": [int(p) for p in self.tree.parents],
                "rule": self.rule, "target_fingerprint": self.target_fingerprint,
                "shared_head": self.shared_head, **(extra or {})}
        (path / "config.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: str = "float32", num_tokens: int | None = None,
             tree: TreeSpec | None = None, rule: str | None = None) -> "Medusa":
        from safetensors import safe_open

        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise ValueError(f"{path} is not a Medusa drafter directory (needs config.json and "
                             "model.safetensors, as written by Medusa.save)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("kind") != "medusa":
            raise ValueError(f"{cfg_file} describes a {meta.get('kind')!r} drafter, "
                             "not a Medusa one")
        config = MedusaConfig(**meta["config"])
        jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        params: dict = {}
        with safe_open(str(weights), framework="numpy") as f:
            for name in f.keys():
                arr = f.get_tensor(name)
                node = params
                *parents, leaf = name.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = (jnp.asarray(arr, jnp.int32) if arr.dtype == np.int32
                              else jnp.asarray(arr.astype(np.float32)).astype(jdtype))
        k, d, v = config.num_heads, config.hidden_size, meta["head_tokens"]
        want = {"heads.kernel": (k, d, d), "heads.bias": (k, d), "lm_head": (k, v, d),
                "head_ids": (v,)}
        if meta.get("shared_head", False):   # the target's LM-head rows, bound at run time
            del want["lm_head"]
        for name, shape in want.items():
            node = params
            for part in name.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None or tuple(node.shape) != shape:
                got = "missing" if node is None else f"shape {tuple(node.shape)}"
                raise ValueError(f"{weights}: tensor {name} is {got}, expected shape {shape} "
                                 f"from {cfg_file}")
        if tree is None and num_tokens is None:
            parents = meta.get("tree_parents")
            tree = from_parents(parents) if parents else None
            num_tokens = meta.get("num_tokens")
        return cls(params=params, config=config, num_tokens=num_tokens, tree=tree,
                   target_fingerprint=meta.get("target_fingerprint"),
                   rule=meta.get("rule", "speculative") if rule is None else rule)

    # -- drafter protocol -------------------------------------------------------------------
    def bind(self, target: Model) -> "Medusa":
        """Shared-head heads with the target's LM-head rows attached (the loop calls it)."""
        if not self.shared_head:
            return self
        from jaxspec.speculative.drafters.eagle import head_rows

        return self.replace(bound={"lm_head": head_rows(target.params, self.params["head_ids"])})

    def _head_params(self) -> dict:
        if not self.shared_head:
            return self.params
        if self.bound is None:
            raise ValueError("these Medusa heads share the target's LM head: bind(target) first "
                             "(js.generate and js.speculative.generate_tokens do)")
        return dict(self.params, lm_head=self.bound["lm_head"])

    def cache_slack(self) -> int:
        return self.tree.max_depth + 1

    def check_compatible(self, target: Model) -> None:
        c, t = self.config, target.config
        if c.hidden_size != t.hidden_size:
            raise ValueError(f"this Medusa drafter was built for a target with hidden size "
                             f"{c.hidden_size}, but the target has hidden size {t.hidden_size}")
        if c.vocab_size != t.vocab_size:
            raise ValueError(f"this Medusa drafter was trained for a vocabulary of {c.vocab_size} "
                             f"tokens, but the target's is {t.vocab_size}")
        if self.target_fingerprint is not None and self.target_fingerprint != fingerprint(target):
            raise ValueError(f"this Medusa drafter was trained for another target (fingerprint "
                             f"{self.target_fingerprint}, this target's is {fingerprint(target)}); "
                             "train heads for this target (jaxspec.train.medusa)")
        if self.tree.max_depth > c.num_heads:
            raise ValueError(f"the tree is {self.tree.max_depth} deep but this Medusa drafter has "
                             f"only {c.num_heads} heads (head k drafts depth k)")
        width, v = self.tree.max_children, self.params["head_ids"].shape[0]
        if width > v:
            raise ValueError(f"the tree has up to {width} children per node but the Medusa heads "
                             f"have only {v} tokens")

    def init(self, target: Model, prompt_tokens, prompt_lengths, max_len: int, state=None,
             target_hidden=None):
        """The pending feature f_{len-1}. target_hidden: [B, Tp, D] the prompt's hidden states."""
        if target_hidden is None:
            raise ValueError("Medusa needs the target's hidden states (run it through "
                             "js.generate / js.speculative.generate_tokens)")
        rows = jnp.arange(prompt_tokens.shape[0])
        last = jnp.clip(prompt_lengths - 1, 0, prompt_tokens.shape[1] - 1)
        return MedusaState(pending=target_hidden[rows, last])                        # [B, D]

    def propose(self, state: MedusaState, ctx: Context, sampling: Sampling, key, vocab: int):
        """Head d's top-(rank + 1) token at every depth-d node; deterministic (q = None)."""
        tree = self.tree
        n, depth = tree.num_nodes, tree.max_depth
        nodes = np.arange(1, n)
        depths, ranks = tree.depths[nodes] - 1, tree.child_rank[nodes]             # static
        width = int(ranks.max()) + 1
        batch = ctx.length.shape[0]
        rows = jnp.arange(batch)
        logits = head_logits(self._head_params(), state.pending,
                             heads=tuple(range(depth)))                              # [B, Dm, V']
        top_logit, top = jax.lax.top_k(logits, width)                                # [B, Dm, W]
        picked = self.params["head_ids"][top[:, depths, ranks]]                      # [B, N-1]
        # Confidence: head d's probability of the node's token (heads are independent, so
        # this stands in for P(node accepted | parent accepted)).
        prob = jnp.exp(top_logit - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        confidence = jnp.concatenate([jnp.ones((batch, 1), jnp.float32),
                                      prob[:, depths, ranks]], axis=1)                # [B, N]
        root = ctx.history[rows, ctx.length - 1]
        tokens = jnp.concatenate([root[:, None], picked.astype(jnp.int32)], axis=1)  # [B, N]
        valid = jnp.concatenate([jnp.ones((batch, 1), bool),
                                 jnp.broadcast_to(ctx.active[:, None], (batch, n - 1))], axis=1)
        parents = jnp.broadcast_to(jnp.asarray(tree.parents, jnp.int32), (batch, n))
        return Draft(tokens=tokens, parents=parents, valid=valid, q=None,
                     confidence=confidence), state

    def commit(self, state: MedusaState, ctx: Context, draft: Draft, verdict, target_logits,
               target_hidden=None):
        """The target's hidden state at the deepest accepted node (target_hidden [B, N, D]) is
        f_{c'-1} of the next round: its LM-head prediction is the next root."""
        rows = jnp.arange(target_hidden.shape[0])
        last = verdict.path[rows, verdict.num_accepted]                              # [B]
        new = target_hidden[rows, last].astype(state.pending.dtype)                  # [B, D]
        return state.replace(pending=jnp.where(ctx.active[:, None], new, state.pending))
