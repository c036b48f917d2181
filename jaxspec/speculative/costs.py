"""Measured target-forward cost per number of new tokens, and the per-round verify size it picks.

`CostModel(sizes, ms)`: the target's forward time (ms) for T new tokens, at a few static T (the
verify sizes compiled into the speculative program). `calibrate(target, batch)` measures it with
a few compiled forwards (against a 256-token cache) and caches the table on disk per (model
config, backend, device, batch bucket); `CostModel.from_table({T: ms})` takes a user's own.

`choose_size(costs, confidence, valid, parents, active)` is the per-round decision (inside the
jitted loop): the expected number of committed tokens of verifying the first S draft nodes is
rows x 1 (the target's own token) + the sum over those nodes of P(node accepted), where
P(node accepted) is the product of the drafter's per-node confidence along its path; the size
with the most expected tokens per measured millisecond wins. It depends on draft-side values
only (a prefix of a tree's nodes is a valid tree), which keeps greedy decoding exact. It is used
for greedy rounds only: under sampling a node's confidence depends on its own drawn token (and its
children's q on it), and choosing by it would skew the accepted tokens' law.

`choose_size_by_rate(costs, rate, prefix_depths, active)` sizes sampled rounds. It is decided
before the round's draft is drawn: from each row's acceptance rate, an exponential average over
earlier rounds of the first draft token's exact acceptance probability sum_x min(p(x), q(x))
(`first_acceptance`), and the static depth of each size's node prefix. Expected committed
tokens are sum_{d <= depth} rate^d (Leviathan et al.'s geometric model). Conditioned on the past,
the round's size is then fixed, so any lossless rule stays lossless (invariant 8).

`calibrated_confidence(confidence, calibration)` corrects a drafter's confidences before
`choose_size` by each row's record: a trained drafter's own probability is not the target's
acceptance (the shipped SmolLM2 Eagle is overconfident on prompts unlike its training data), so
every round the loop compares node 1's confidence with whether the target's argmax took it
(`update_calibration`, exponential averages of both) and scales the confidences by their ratio.
Greedy rounds only (where confidence sizing runs); the scale comes from earlier rounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxspec.sampling import top_token

DEFAULT_CACHE_LEN = 256
# Part of the on-disk cache key: 2 = sizes timed in interleaved rounds; 3 = the forward the loop
# runs (forward_pending: no cache write, so no copy of the whole cache in the timing); 4 = each
# entry records how busy the machine was ({"ms": table, "load": ...}; see `calibrate`); 5 = on
# CPU against a per-layer cache (`transformer.new_cache`), as the loops now hold it.
MEASURE_VERSION = 5
# A cached curve measured while the machine's load (1-minute average per core) was above BUSY is
# measured again once the load is below half of what it was.
BUSY = 0.5
_clock = time.perf_counter   # the timer `measure` reads (a test substitutes a fake clock)


@dataclasses.dataclass(frozen=True)
class CostModel:
    sizes: tuple      # static verify sizes (node counts, root included), ascending, sizes[0] >= 1
    ms: tuple         # measured forward time for each size
    # ms the drafter spends per drafted node (a draft model: one draft forward per token). Spent
    # before the size is chosen, but part of every round's time: a round's tokens are weighed
    # against ms[size] + draft_ms * (nodes drafted), so that a costly drafter's chain is not
    # cut short to save little verify time (more rounds would each pay the drafting again).
    draft_ms: float = 0.0

    def __post_init__(self):
        sizes, ms = tuple(self.sizes), tuple(self.ms)
        if not sizes or len(sizes) != len(ms):
            raise ValueError(f"a cost table needs one time per size; got sizes {sizes} and ms {ms}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes) \
                or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"cost table sizes must be distinct integers >= 1 in ascending order, "
                             f"got {sizes}")
        if any(not isinstance(m, (int, float)) or not m > 0 for m in ms):
            raise ValueError(f"cost table times must be positive numbers (ms), got {ms}")
        if isinstance(self.draft_ms, bool) or not isinstance(self.draft_ms, (int, float)) \
                or not self.draft_ms >= 0:
            raise ValueError(f"draft_ms must be a number >= 0 (ms per drafted node), got "
                             f"{self.draft_ms!r}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "ms", tuple(float(m) for m in ms))
        object.__setattr__(self, "draft_ms", float(self.draft_ms))

    @classmethod
    def from_table(cls, table) -> "CostModel":
        """{new tokens: ms} (keys may be strings, as in JSON) -> CostModel."""
        if isinstance(table, CostModel):
            return table
        if not isinstance(table, dict) or not table:
            raise ValueError("a cost table must be a non-empty dict {new tokens: milliseconds}, got "
                             f"{type(table).__name__}")
        def size(k):  # "4" (JSON) or 4; not 4.5 (int() would truncate it), not True
            if isinstance(k, bool):
                raise TypeError(k)
            return int(k) if isinstance(k, str) else operator.index(k)

        try:
            items = sorted((size(k), v) for k, v in table.items())
        except (TypeError, ValueError):
            raise ValueError(f"cost table keys must be integers (new tokens), got {list(table)}") from None
        return cls(sizes=tuple(k for k, _ in items), ms=tuple(v for _, v in items))

    def restricted(self, max_nodes: int) -> "CostModel":
        """The sizes up to max_nodes (a drafter's node count), max_nodes itself always included
        (its time interpolated when not measured)."""
        sizes = [s for s in self.sizes if s < max_nodes]
        ms = [m for s, m in zip(self.sizes, self.ms) if s < max_nodes]
        return CostModel(sizes=tuple(sizes) + (max_nodes,), ms=tuple(ms) + (self.at(max_nodes),),
                         draft_ms=self.draft_ms)

    def at(self, n: int) -> float:
        """Time for n new tokens, linearly interpolated (extrapolated from the last two)."""
        s, m = self.sizes, self.ms
        if n in s:
            return m[s.index(n)]
        if len(s) == 1:
            return m[0] * n / s[0]
        i = max(1, min(len(s) - 1, next((j for j, v in enumerate(s) if v > n), len(s) - 1)))
        a, b = s[i - 1], s[i]
        return max(m[i - 1] + (m[i] - m[i - 1]) * (n - a) / (b - a), 1e-3)

    def to_table(self) -> dict:
        return {str(s): m for s, m in zip(self.sizes, self.ms)}


def checked_sizing(sizing):
    """A drafter's `sizing` field: "auto", None or a CostModel as given; a {new tokens: ms} dict
    becomes a CostModel; anything else is refused."""
    if isinstance(sizing, dict):
        return CostModel.from_table(sizing)
    if sizing is None or sizing == "auto" or isinstance(sizing, CostModel):
        return sizing
    raise ValueError(f"sizing must be 'auto', None, a jaxspec.speculative.costs.CostModel or "
                     f"a {{new tokens: ms}} dict, got {sizing!r}")


def checked_calibrated(calibrated):
    """A drafter's `calibrated` field: True or False."""
    if not isinstance(calibrated, bool):
        raise ValueError(f"calibrated must be True or False, got {calibrated!r}")
    return calibrated


def path_probabilities(confidence, parents, valid, max_depth: int):
    """P(node accepted) [B, N]: the product of confidence [B, N] along each node's path (root 1);
    0 for invalid nodes and their descendants. parents: [B, N] (root -1)."""
    conf = jnp.where(valid, confidence, 0.0).at[:, 0].set(1.0)
    prob = conf
    parent = jnp.maximum(parents, 0)
    anc = parent
    for _ in range(max_depth):
        prob = prob * jnp.where(anc > 0, jnp.take_along_axis(conf, anc, axis=1), 1.0)
        anc = jnp.take_along_axis(parent, anc, axis=1)
    return prob


def choose_size(costs: CostModel, confidence, parents, valid, active, max_depth: int):
    """Index into costs.sizes of the size with the most expected committed tokens per ms.

    confidence, parents, valid: [B, N]; active: [B]. Returns an int32 scalar."""
    prob = path_probabilities(confidence, parents, valid, max_depth)           # [B, N]
    prob = jnp.where(active[:, None], prob, 0.0)
    cumulative = jnp.cumsum(prob, axis=1)                                      # [B, N]
    expected = jnp.stack([cumulative[:, s - 1].sum() for s in costs.sizes])    # [S] (root: 1/row)
    drafted = jnp.max(jnp.where(active, jnp.sum(valid[:, 1:], axis=1), 0))     # the round's nodes
    score = expected / (jnp.asarray(costs.ms, jnp.float32) + costs.draft_ms * drafted)
    return jnp.argmax(score).astype(jnp.int32)


RATE_PRIOR = 0.5   # a row's acceptance rate before its first round
RATE_DECAY = 0.7   # weight of the past in the per-round exponential average


def calibrated_confidence(confidence, calibration):
    """confidence [B, N] scaled per row by its record, calibration = (hits, claimed) [B] each:
    exponential averages of node 1's acceptance and of its confidence. Clipped to [0, 1]."""
    hits, claimed = calibration
    scale = hits / jnp.maximum(claimed, 1e-3)                                    # [B]
    return jnp.clip(confidence * scale[:, None], 0.0, 1.0)


def update_calibration(calibration, draft, root_logits, active):
    """One greedy round's evidence: node 1's confidence and whether it is the target's argmax at
    the root (root_logits [B, V], as verified). Rows without node 1 keep their record."""
    hits, claimed = calibration
    took = (draft.tokens[:, 1] == top_token(root_logits)).astype(jnp.float32)  # [B]
    seen = active & draft.valid[:, 1]
    keep = RATE_DECAY
    hits = jnp.where(seen, keep * hits + (1.0 - keep) * took, hits)
    claimed = jnp.where(seen, keep * claimed + (1.0 - keep) * draft.confidence[:, 1], claimed)
    return hits, claimed


def initial_calibration(batch: int):
    """Records before the first round: equal averages (scale 1, the drafter taken at its word)."""
    prior = jnp.full((batch,), RATE_PRIOR, jnp.float32)
    return prior, prior


def first_acceptance(draft, root_probs):
    """P(draft node 1 accepted) [B] under the lossless rule: sum_x min(p(x), q(x)), with p the
    target's processed distribution at the root (root_probs [B, V]) and q node 1's draft
    distribution (one-hot for deterministic drafters)."""
    if draft.q is None:
        return jnp.take_along_axis(root_probs, draft.tokens[:, 1:2], axis=1)[:, 0]
    return jnp.sum(jnp.minimum(root_probs, draft.q[:, 1]), axis=-1)


def update_rate(rate, draft, root_probs, active):
    """The exponential average of `first_acceptance` over rounds where node 1 was drafted. [B]"""
    moved = RATE_DECAY * rate + (1.0 - RATE_DECAY) * first_acceptance(draft, root_probs)
    return jnp.where(active & draft.valid[:, 1], moved, rate)


def prefix_depths(costs: CostModel, tree) -> tuple:
    """The deepest node among the first s nodes, for each size s (static): from the TreeSpec's
    depths, or, for a dynamic tree (whose shape is drawn), the depth a chain of s nodes has."""
    depths = getattr(tree, "depths", None)
    if depths is None:
        return tuple(min(s - 1, tree.max_depth) for s in costs.sizes)
    return tuple(int(max(depths[:s])) for s in costs.sizes)


def choose_size_by_rate(costs: CostModel, rate, depths: tuple, active, drafted: int = 0):
    """Index into costs.sizes maximising expected committed tokens per ms when each draft depth
    is reached with probability rate^depth. rate: [B] float32; depths: per size (static);
    active: [B]; drafted: the drafter's node count (static, for costs.draft_ms). Returns an
    int32 scalar. Uses nothing of the current round's draft."""
    rate = jnp.where(active, jnp.clip(rate, 0.0, 0.999), 0.0)                     # [B]
    powers = rate[:, None] ** jnp.arange(max(depths) + 1)[None, :]                 # [B, D+1]
    powers = jnp.where(active[:, None], powers, 0.0)
    reached = jnp.cumsum(powers.sum(axis=0))                                       # [D+1]
    expected = jnp.stack([reached[d] for d in depths])                             # [S]
    score = expected / (jnp.asarray(costs.ms, jnp.float32) + costs.draft_ms * drafted)
    return jnp.argmax(score).astype(jnp.int32)


# -- calibration ------------------------------------------------------------------------------

def _cache_file(target, batch: int, sizes) -> Path:
    from jaxspec.models.registry import cache_dir

    device = jax.devices()[0]
    parts = [repr(target.config), str(target.dtype), jax.default_backend(),
             getattr(device, "device_kind", ""), batch, list(sizes), DEFAULT_CACHE_LEN,
             os.cpu_count(), MEASURE_VERSION]
    head = target.params.get("lm_head", {}).get("kernel") if isinstance(target.params, dict) else None
    if head is not None and head.shape[-1] != target.config.vocab_size:
        parts.append(["head", int(head.shape[-1])])   # a VocabTrim draft's head (V' < V)
    key = json.dumps(parts)
    return cache_dir() / "costs" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def measured_step(model, tokens, cache):
    """The forward `measure` times: what a sized round's branch runs (`forward_pending`: logits
    and the new K/V, the cache only read). tokens: [B, T]. Returns two scalars that depend on
    every output. A forward that wrote the cache here would copy the whole cache buffer into
    the result on every call (the input is not donated), a cost the loop, which writes its
    carried cache in place, never pays: 94 MB per call for SmolLM2 at batch 8."""
    from jaxspec.models.transformer import forward_pending

    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None, :]
    logits, _, new_k, new_v = forward_pending(model, tokens, cache, positions)
    return logits[:, -1].sum(), new_k.sum() + new_v.sum()


def measure(target, batch: int = 1, sizes=(1, 2, 4, 8, 16, 32, 64), repeats: int = 5,
            cache_len: int = DEFAULT_CACHE_LEN, capacity: int | None = None) -> CostModel:
    """Median forward time (ms) for T new tokens against a cache of cache_len tokens.

    Every size is compiled and run once first; then `repeats` rounds time each size once, in
    turn, so a burst of load on a shared machine shifts every size alike instead of one size's
    whole sample (sizes timed one after another gave a 1-token step 30% dearer than the same
    run's plain decode steps, and dearer than 2 tokens, on the 2-core CPU).
    capacity: the cache's slot count (default cache_len + max(sizes)); pass one fixed value to
    measure sizes one at a time against the same buffer."""
    from jaxspec.models.transformer import new_cache, unstack_layers

    model = target.replace(tokenizer=None)
    if jax.default_backend() == "cpu" and not isinstance(model.params["layers"], (list, tuple)):
        model = model.replace(params=unstack_layers(model.params))  # as the loops run it
    if capacity is not None and capacity < cache_len + max(sizes):
        raise ValueError(f"a cache of {capacity} slots cannot hold {cache_len} committed tokens "
                         f"and {max(sizes)} new ones")
    fn = jax.jit(measured_step)                            # one compilation per size
    cache = new_cache(model, batch, capacity or cache_len + max(sizes))   # as the loops hold it
    cache = cache.replace(lengths=jnp.full((batch,), cache_len, jnp.int32))
    inputs = [jnp.ones((batch, t), jnp.int32) for t in sizes]
    for tokens in inputs:                                  # compile and warm every size
        jax.block_until_ready(fn(model, tokens, cache))
    times = [[] for _ in sizes]
    for _ in range(repeats):
        for i, tokens in enumerate(inputs):
            start = _clock()
            jax.block_until_ready(fn(model, tokens, cache))
            times[i].append(_clock() - start)
    return CostModel(sizes=tuple(sizes), ms=tuple(1000 * statistics.median(t) for t in times))


def machine_load() -> float:
    """The 1-minute load average per CPU core (0.0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0] / max(os.cpu_count() or 1, 1)
    except (AttributeError, OSError):
        return 0.0


def calibrate(target, batch: int = 1, sizes=(1, 2, 4, 8, 16, 32, 64), table=None,
              refresh: bool = False) -> CostModel:
    """The target's cost curve: `table` when given, else the cached measurement, else measure
    (and cache) it. Batch is bucketed to a power of two.

    Each cache entry records the machine's load when it was measured (`machine_load`). An entry
    measured on a busy machine (load above BUSY) is measured again once the load has fallen
    below half of that: a curve timed beside other work is steeper than the machine's own
    (SmolLM2 on the 2-core CPU: 3.3x a step for 9 tokens under load, 1.7x quiet), and sized
    rounds that read it verify too little for as long as it stays cached."""
    if table is not None:
        return CostModel.from_table(table)
    bucketed = 1
    while bucketed < batch:
        bucketed *= 2
    path = _cache_file(target, bucketed, sizes)
    if path.is_file() and not refresh:
        try:
            entry = json.loads(path.read_text())
            cached = CostModel.from_table(entry["ms"])
            load = float(entry["load"])
            if not (load > BUSY and machine_load() < load / 2):
                return cached
        except (ValueError, TypeError, KeyError, json.JSONDecodeError):
            pass  # a damaged cache entry is measured again
    load = machine_load()
    model = measure(target, bucketed, sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ms": model.to_table(), "load": round(load, 3)}))
    return model
