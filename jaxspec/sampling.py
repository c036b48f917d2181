"""Sampling parameters and the processed distribution that generation draws from.

`probabilities(logits, sampling)` is the single definition of "what the model samples": the
speculative acceptance rules preserve exactly this distribution, so every drafter and verifier
calls it rather than re-deriving temperature / top-k / top-p / min-p.

Values (temperature, top_k, top_p, min_p) are pytree leaves, so changing them does not
recompile; only the two flags that change the program (greedy or not, filtered or not) are
static.
"""

from __future__ import annotations

import dataclasses
from numbers import Number

import jax
import jax.numpy as jnp


def _is_concrete(x) -> bool:
    return isinstance(x, Number)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are drawn. temperature 0 is greedy (argmax); top_k 0 and top_p 1 disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    greedy: bool = dataclasses.field(default=None, metadata=dict(static=True))
    filtered: bool = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        values = (self.temperature, self.top_k, self.top_p, self.min_p)
        if all(_is_concrete(v) for v in values):
            if not self.temperature >= 0:
                raise ValueError(
                    f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
            if int(self.top_k) != self.top_k or self.top_k < 0:
                raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
            if not 0.0 <= self.min_p <= 1.0:
                raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p}")
            if self.greedy is None:
                object.__setattr__(self, "greedy", self.temperature == 0)
            if self.filtered is None:
                object.__setattr__(
                    self, "filtered", self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)
        elif self.greedy is None or self.filtered is None:
            raise ValueError("Sampling built from traced values needs explicit greedy= and filtered=")


def top_token(logits: jax.Array) -> jax.Array:
    """The greedy token: index of the first maximum of logits [..., V] -> int32 [...].

    `jnp.argmax` for finite logits, computed as a max and a min (two plain reductions): XLA:CPU
    runs argmax as a variadic (value, index) reduction 5-6x slower, about 1 ms for SmolLM2's
    [1, 9, 49152] verify logits against a 15 ms decode step. A row that is all NaN gives 0.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    first = jnp.min(jnp.where(logits == top, index, logits.shape[-1]), axis=-1)
    return jnp.where(first < logits.shape[-1], first, 0).astype(jnp.int32)


def processed_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Log-probabilities (unnormalised) of the distribution actually sampled from.

    logits: [..., V]. Returns [..., V] float32 with filtered-out tokens at -inf.
    For greedy sampling this is 0 at the argmax and -inf elsewhere.
    """
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        top = top_token(logits)
        return jnp.where(jax.nn.one_hot(top, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
    scaled = logits / jnp.asarray(sampling.temperature, jnp.float32)
    if not sampling.filtered:
        return scaled
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [..., V]
    # top-k: keep tokens at least as large as the k-th largest (ties kept, as in HF).
    top_k = jnp.asarray(sampling.top_k, jnp.int32)
    kth = jnp.take_along_axis(
        sorted_desc, jnp.clip(top_k - 1, 0, vocab - 1)[..., None] * jnp.ones_like(
            sorted_desc[..., :1], jnp.int32), axis=-1)
    keep = jnp.where(top_k > 0, scaled >= kth, True)
    scaled = jnp.where(keep, scaled, -jnp.inf)
    sorted_desc = jnp.where(jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab),
                            sorted_desc, -jnp.inf)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    top_p = jnp.asarray(sampling.top_p, jnp.float32)
    sorted_probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [..., V]
    in_nucleus = (mass_before < top_p) | (jnp.arange(vocab) == 0)
    cutoff = jnp.min(jnp.where(in_nucleus, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where((top_p < 1.0) & (scaled < cutoff), -jnp.inf, scaled)
    # min-p: drop tokens whose probability is below min_p times the top probability.
    min_p = jnp.asarray(sampling.min_p, jnp.float32)
    log_ratio = scaled - jnp.max(scaled, axis=-1, keepdims=True)
    scaled = jnp.where((min_p > 0.0) & (log_ratio < jnp.log(jnp.maximum(min_p, 1e-30))),
                       -jnp.inf, scaled)
    return scaled


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The processed distribution [..., V] (float32, sums to 1) that generation samples from."""
    return jax.nn.softmax(processed_logits(logits, sampling), axis=-1)


def sample(key: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Draw token ids [...] from logits [..., V] under `sampling` (argmax when greedy)."""
    if sampling.greedy:
        return top_token(logits)
    return jax.random.categorical(key, processed_logits(logits, sampling), axis=-1).astype(jnp.int32)


def sample_from_probs(key: jax.Array, probs: jax.Array) -> jax.Array:
    """Draw token ids [...] from an explicit distribution probs [..., V] (zeros never drawn)."""
    return jax.random.categorical(
        key, jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf), axis=-1
    ).astype(jnp.int32)
