"""The functional decoder-only transformer shared by every supported family.

Parameters are one pytree with the layers stacked on a leading axis [L, ...] (scanned, so the
compile time does not grow with depth). Layout:

  embed [V, D]; pos_embed [P, D] (gpt2)
  layers/{attn_norm,mlp_norm}/{scale,bias?} [L, D]
  layers/{post_attn_norm,post_mlp_norm}/scale [L, D] (gemma: norms of the attention and MLP outputs)
  layers/{q,k,v}/{kernel [L, D, H*Dh], bias? [L, H*Dh]}; layers/o/{kernel [L, Hq*Dh, D], bias?}
  layers/{q_norm,k_norm}/scale [L, Dh] (qwen3)
  layers/{gate,up}/kernel [L, D, F] (gated SiLU MLP) or layers/up only (gpt2); layers/down [L, F, D]
  final_norm/{scale,bias?} [D]; lm_head/kernel [D, V] (untied only)

Gemma norm scales are stored as the checkpoint holds them (w; the norm multiplies by 1 + w).
Per-layer attention facts (sliding window or not, the rope base) enter the layer scan as scanned
arrays, see `_layer_inputs`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.attention import attention, attention_pending
from jaxspec.models.cache import KVCache, write_layer, write_new
from jaxspec.models.config import ModelConfig, rope_inverse_frequencies


@struct.dataclass
class Model:
    """A model as one pytree: static config (and tokenizer), array params."""

    config: ModelConfig = struct.field(pytree_node=False)
    params: Any
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    attn_impl: str = struct.field(pytree_node=False, default="auto")

    @property
    def dtype(self):
        return self.params["embed"].dtype


# -- building blocks --------------------------------------------------------------------------

def _norm(x, p, config: ModelConfig):
    """RMSNorm (llama family; gemma: x (1 + w), multiplied in float32) or LayerNorm (gpt2),
    computed in float32. x: [..., D]."""
    xf = x.astype(jnp.float32)
    if config.is_gpt2:
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + config.norm_eps)
    if config.is_gemma:
        return (y * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)
    if config.is_gpt2:
        return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
    return p["scale"] * y.astype(x.dtype)


def _dense(x, p):
    """x: [..., In] @ kernel [In, Out] (+ bias [Out])."""
    y = jnp.einsum("...I,IO->...O", x, p["kernel"])
    if "bias" in p:
        y = y + p["bias"]
    return y


def _rope(x, positions, inv_freq):
    """Rotary embedding, HF 'rotate_half' convention. x: [B, T, H, Dh]; positions: [B, T]."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, T, Dh/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], axis=-1))[:, :, None, :]      # [B, T, 1, Dh]
    sin = jnp.sin(jnp.concatenate([angles, angles], axis=-1))[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _qkv(h, lp, positions, config: ModelConfig, inv_freq=None):
    """Project and position-encode. h: [B, T, D] -> q [B, T, Hq, Dh], k/v [B, T, Hkv, Dh].

    inv_freq: [Dh/2] this layer's rope frequencies (None = the config's global ones)."""
    batch, t, _ = h.shape
    q = _dense(h, lp["q"]).reshape(batch, t, config.num_heads, config.head_dim)
    k = _dense(h, lp["k"]).reshape(batch, t, config.num_kv_heads, config.head_dim)
    v = _dense(h, lp["v"]).reshape(batch, t, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q = _norm(q, lp["q_norm"], config)
        k = _norm(k, lp["k_norm"], config)
    if not config.is_gpt2:
        if inv_freq is None:
            inv_freq = rope_inverse_frequencies(config)
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
        q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
    return q, k, v


def _mlp(h, lp, config: ModelConfig):
    """h: [B, T, D] -> [B, T, D]."""
    if config.is_gpt2:
        return _dense(jax.nn.gelu(_dense(h, lp["up"]), approximate=True), lp["down"])
    gate = _dense(h, lp["gate"])
    if config.activation == "gelu_pytorch_tanh":
        gate = jax.nn.gelu(gate, approximate=True)
    else:
        gate = jax.nn.silu(gate)
    return _dense(gate * _dense(h, lp["up"]), lp["down"])


def _block(x, lp, config: ModelConfig, attend):
    """One decoder layer around its attention. x: [B, T, D]; attend(h [B, T, D]) -> [B, T, Hq*Dh]."""
    attn = _dense(attend(_norm(x, lp["attn_norm"], config)), lp["o"])
    if config.is_gemma:
        attn = _norm(attn, lp["post_attn_norm"], config)
    x = x + attn
    mlp = _mlp(_norm(x, lp["mlp_norm"], config), lp, config)
    if config.is_gemma:
        mlp = _norm(mlp, lp["post_mlp_norm"], config)
    return x + mlp


def _layer_inputs(config: ModelConfig):
    """Per-layer attention facts, numpy arrays with a leading [L] axis (scanned with the layers):
    rope inverse frequencies [L, Dh/2] f32 (None for gpt2) and, when some but not all layers use
    the sliding window, whether each does [L] bool (None: config.sliding_layers[0] for all)."""
    sliding = config.sliding_layers
    inv_freq = None
    if not config.is_gpt2:
        tables = {s: rope_inverse_frequencies(config, sliding=s) for s in set(sliding)}
        inv_freq = np.asarray([tables[s] for s in sliding], np.float32)
    use_window = np.asarray(sliding, bool) if len(set(sliding)) > 1 else None
    return inv_freq, use_window


def _embed(params, tokens, positions, config: ModelConfig):
    x = params["embed"][tokens]                                   # [B, T, D]
    if config.is_gemma:   # the normalizer sqrt(D), rounded to the embedding dtype first
        x = x * jnp.asarray(math.sqrt(config.hidden_size), jnp.float32).astype(x.dtype)
    if config.is_gpt2:
        x = x + params["pos_embed"][positions]
    return x


def lm_head(params, hidden, config: ModelConfig):
    """LM head. hidden: [..., D] (after the final norm) -> logits [..., V] float32
    (soft-capped when config.final_logit_softcap is set)."""
    if config.tie_word_embeddings:
        logits = jnp.einsum("...D,VD->...V", hidden, params["embed"])
    else:
        logits = jnp.einsum("...D,DV->...V", hidden, params["lm_head"]["kernel"])
    logits = logits.astype(jnp.float32)
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
    return logits


def _unembed(params, x, config: ModelConfig):
    """Final norm and LM head. x: [B, T, D] -> logits [B, T, V] float32, hidden [B, T, D]."""
    hidden = _norm(x, params["final_norm"], config)
    return lm_head(params, hidden, config), hidden


# -- forward passes ---------------------------------------------------------------------------

def forward(model: Model, tokens: jax.Array, cache: KVCache, positions: jax.Array,
            mask: jax.Array | None = None):
    """Run T new tokens per row against the cache.

    tokens: [B, T] int32; positions: [B, T] int32; mask: [B, T, T] bool among the new tokens
    (None = causal). The new K/V are written at slots [len, len + T) of each row; `len` is not
    advanced (see `cache.commit`). Returns (logits [B, T, V] f32, hidden [B, T, D], cache).
    """
    logits, hidden, (k, v) = _decode(model, tokens, cache, positions, mask, pending=False)
    return logits, hidden, cache.replace(k=k, v=v)


def forward_pending(model: Model, tokens: jax.Array, cache: KVCache, positions: jax.Array,
                    mask: jax.Array | None = None):
    """`forward` that leaves the cache untouched and returns the new tokens' K/V instead.

    Same arguments and the same logits as `forward` (up to float rounding: the new tokens'
    scores are computed beside the cache's, see `attention.attention_pending`). Returns
    (logits [B, T, V] f32, hidden [B, T, D], new_k [L, B, T, Hkv, Dh], new_v); write them with
    `cache.write_new`. For branches of a conditional: a branch that wrote the cache would make
    XLA copy the whole cache buffer every time the conditional runs.
    """
    logits, hidden, (new_k, new_v) = _decode(model, tokens, cache, positions, mask, pending=True)
    return logits, hidden, new_k, new_v


def forward_step(model: Model, tokens: jax.Array, cache: KVCache, positions: jax.Array,
                 mask: jax.Array | None = None):
    """`forward` as the decode loops run it: same arguments and results.

    A per-layer cache (`new_cache` beside unstacked layers, the CPU loops) is attended where it
    lies and the new K/V are written after the whole forward (`forward_pending`, an optimization
    barrier, `cache.write_new`). On XLA:CPU that costs 13 % less than writing each layer in
    place at batch 8 with 256 slots (34.3 -> 29.8 ms) and 5 % less at batch 1 (15.6 -> 14.8 ms);
    without the barrier XLA schedules the writes among the attention reads and copies buffers
    (41 ms). A stacked cache is written in place by `forward`.
    """
    if not cache.per_layer:
        return forward(model, tokens, cache, positions, mask)
    logits, hidden, new_k, new_v = forward_pending(model, tokens, cache, positions, mask)
    logits, hidden, new_k, new_v = jax.lax.optimization_barrier((logits, hidden, new_k, new_v))
    return logits, hidden, write_new(cache, new_k, new_v)


def _decode(model: Model, tokens, cache: KVCache, positions, mask, *, pending: bool):
    """The layers of `forward` (pending=False: returns the written cache k, v [L, B, Hkv, S, Dh],
    or L-tuples of [B, Hkv, S, Dh] for a per-layer cache)
    and `forward_pending` (pending=True: returns the new k, v [L, B, T, Hkv, Dh])."""
    config, params = model.config, model.params
    x = _embed(params, tokens, positions, config)
    inv_freqs, use_windows = _layer_inputs(config)           # [L, Dh/2] | None, [L] | None
    window = config.sliding_window if any(config.sliding_layers) else None
    attn_args = dict(scale=config.attn_scale, impl=model.attn_impl, sliding_window=window,
                     query_positions=positions, softcap=config.attn_logit_softcap)

    def layer(carry, inputs):
        x, cache_k, cache_v = carry
        lp, index, inv_freq, use_window = inputs
        new = []

        def attend(h):
            nonlocal cache_k, cache_v
            q, k, v = _qkv(h, lp, positions, config, inv_freq)
            if pending:
                new.extend((k, v))
            else:
                cache_k, cache_v = write_layer(cache_k, cache_v, index, k, v, cache.lengths)
            source = cache if pending else cache.replace(k=cache_k, v=cache_v)
            layer_k, layer_v = source.layer(index)                               # [B, Hkv, S, Dh]
            if pending:
                out = attention_pending(q, layer_k, layer_v, cache.lengths, k, v, mask,
                                        use_window=use_window, **attn_args)   # [B, T, Hq, Dh]
            else:
                out = attention(q, layer_k, layer_v, cache.lengths, mask, use_window=use_window,
                                **attn_args)
            return out.reshape(*out.shape[:2], -1)

        x = _block(x, lp, config, attend)
        return (x, cache_k, cache_v), (tuple(new) if pending else None)

    # pending: the cache is read where it lies (closed over), not carried through the layers
    start = (x, None, None) if pending else (x, cache.k, cache.v)
    if isinstance(params["layers"], (list, tuple)):   # unstacked: see unstack_layers
        carry, news = start, []
        for index, lp in enumerate(params["layers"]):
            carry, new = layer(carry, (lp, index, None if inv_freqs is None else inv_freqs[index],
                                       None if use_windows is None else bool(use_windows[index])))
            news.append(new)
        x, k, v = carry
        if pending:
            k, v = (jnp.stack([n[i] for n in news]) for i in (0, 1))
    else:
        if cache.per_layer:
            raise ValueError("a per-layer KVCache needs the layers unstacked "
                             "(transformer.unstack_layers); use new_cache(model, ...)")
        layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, k, v), new = jax.lax.scan(layer, start,
                                      (params["layers"], layer_ids, inv_freqs, use_windows))
        if pending:
            k, v = new
    logits, hidden = _unembed(params, x, config)
    return logits, hidden, (k, v)


def new_cache(model: Model, batch: int, max_len: int) -> KVCache:
    """An empty KVCache for `model`: per-layer buffers when its layers are unstacked (the CPU
    decode loops: no per-layer slice of a stacked buffer copied out every step), else stacked."""
    per_layer = isinstance(model.params["layers"], (list, tuple))
    return KVCache.create(model.config, batch, max_len, model.dtype, per_layer=per_layer)


def unstack_layers(params):
    """The same parameters with `layers` as a tuple of per-layer dicts ([L, ...] -> L x [...]).

    `forward` then runs a Python loop over the layers instead of a scan. For decode loops on
    CPU: XLA:CPU materialises the dynamic slice a scan takes of every stacked weight (a copy of
    all layer weights per step, about 2x the time of a memory-bound decode step), while slicing
    once before the loop copies them once per program. Costs compile time that grows with depth
    and, inside the program, a second copy of the layer weights.
    """
    layers = params["layers"]
    num_layers = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree_util.tree_map(lambda a: a[i], layers)
                                      for i in range(num_layers))}


def forward_train(params, config: ModelConfig, tokens: jax.Array):
    """Cache-free causal forward over whole sequences (training, scoring).

    tokens: [B, T] -> (logits [B, T, V] f32, hidden [B, T, D]).
    """
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    x = _embed(params, tokens, positions, config)
    causal = jnp.tril(jnp.ones((t, t), bool))                                # [T, T]
    windowed = causal
    if any(config.sliding_layers):
        windowed = causal & ((jnp.arange(t)[:, None] - jnp.arange(t)[None, :])
                             < config.sliding_window)
    inv_freqs, use_windows = _layer_inputs(config)
    groups = config.num_heads // config.num_kv_heads

    def layer(x, inputs):
        lp, inv_freq, use_window = inputs
        if use_window is None:
            visible = windowed if config.sliding_layers[0] else causal
        else:
            visible = jnp.where(use_window, windowed, causal)

        def attend(h):
            q, k, v = _qkv(h, lp, positions, config, inv_freq)
            qg = q.reshape(batch, t, config.num_kv_heads, groups, config.head_dim)
            scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k,
                                preferred_element_type=jnp.float32) * config.attn_scale  # [B, K, G, T, T]
            if config.attn_logit_softcap is not None:
                scores = jnp.tanh(scores / config.attn_logit_softcap) * config.attn_logit_softcap
            scores = jnp.where(visible, scores, -1e30)
            weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            return jnp.einsum("BKGTS,BSKD->BTKGD", weights, v).reshape(batch, t, -1)

        return _block(x, lp, config, attend), None

    if isinstance(params["layers"], (list, tuple)):   # unstacked: see unstack_layers
        for i, lp in enumerate(params["layers"]):
            x, _ = layer(x, (lp, None if inv_freqs is None else inv_freqs[i],
                             None if use_windows is None else bool(use_windows[i])))
    else:
        x, _ = jax.lax.scan(layer, x, (params["layers"], inv_freqs, use_windows))
    return _unembed(params, x, config)


# -- initialisation ---------------------------------------------------------------------------

def param_shapes(config: ModelConfig) -> dict:
    """The parameter pytree as nested dicts of shape tuples (used by init, loading, sharding)."""
    c, n = config, config.num_layers
    d, f = c.hidden_size, c.intermediate_size

    def dense(i, o, bias):
        out = {"kernel": (n, i, o)}
        if bias:
            out["bias"] = (n, o)
        return out

    def norm(dim, stacked=True):
        lead = (n,) if stacked else ()
        out = {"scale": lead + (dim,)}
        if c.is_gpt2:
            out["bias"] = lead + (dim,)
        return out

    layers = {"attn_norm": norm(d), "mlp_norm": norm(d),
              "q": dense(d, c.q_size, c.qkv_bias), "k": dense(d, c.kv_size, c.qkv_bias),
              "v": dense(d, c.kv_size, c.qkv_bias), "o": dense(c.q_size, d, c.o_bias),
              "up": dense(d, f, c.mlp_bias), "down": dense(f, d, c.mlp_bias)}
    if not c.is_gpt2:
        layers["gate"] = dense(d, f, c.mlp_bias)
    if c.qk_norm:
        layers["q_norm"] = {"scale": (n, c.head_dim)}
        layers["k_norm"] = {"scale": (n, c.head_dim)}
    if c.is_gemma:
        layers["post_attn_norm"] = norm(d)
        layers["post_mlp_norm"] = norm(d)
    shapes = {"embed": (c.vocab_size, d), "layers": layers, "final_norm": norm(d, stacked=False)}
    if c.is_gpt2:
        shapes["pos_embed"] = (c.max_position_embeddings, d)
    if not c.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (d, c.vocab_size)}
    return shapes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02):
    """Random parameters: normal(std) matrices, unit norm scales (gemma: w = 0), zero biases."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            out.append((jnp.zeros if config.is_gemma else jnp.ones)(shape, dtype))
        elif "bias" in name:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def create(config: ModelConfig, key: jax.Array | int = 0, dtype=jnp.float32, tokenizer=None) -> Model:
    """A randomly initialised Model (tests, training from scratch)."""
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    return Model(config=config, params=init_params(config, key, dtype), tokenizer=tokenizer)


def num_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
