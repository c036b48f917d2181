"""Sharding checks run in a subprocess with 8 CPU devices (jax_num_cpu_devices must be set before
jax starts, so the pytest process itself cannot host them).

    python tests/sharding_worker.py OUT.json SECTION...

SECTION: single (generation on one device, no mesh), 8x1 / 2x4 / 1x8 (generation on that
mesh), placement, errors, loading. Each section adds its results to one JSON object;
tests/test_sharding.py runs two workers side by side and compares their outputs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import struct  # noqa: E402

import jaxspec as js  # noqa: E402
from jaxspec import sharding  # noqa: E402
from jaxspec.models.config import ModelConfig  # noqa: E402
from jaxspec.models.transformer import create  # noqa: E402
from jaxspec.speculative import trees  # noqa: E402
from jaxspec.speculative.draft import Draft  # noqa: E402

MESHES = ((8, 1), (2, 4), (1, 8))
BATCH, MAX_NEW = 8, 10

# Tiny llama: GQA (16 heads over 8 KV heads), every split dimension divisible by 8.
TARGET = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=2, num_heads=16,
                     num_kv_heads=8, head_dim=4, intermediate_size=128, max_position_embeddings=128,
                     norm_eps=1e-5)
# The draft: the target's first layer (a related, cheaper model with a different config).
DRAFT = ModelConfig(**{**TARGET.__dict__, "num_layers": 1})


def models():
    target = create(TARGET, 1)
    params = jax.tree_util.tree_map(lambda x: x, target.params)
    params["layers"] = jax.tree_util.tree_map(lambda x: x[:1], params["layers"])
    return target, js.Model(config=DRAFT, params=params)


def prompts():
    rng = np.random.default_rng(0)
    out = []
    for i in range(BATCH):
        base = list(rng.integers(0, 64, size=3))
        out.append((base * 4)[: 4 + i] if i % 2 else list(rng.integers(0, 64, size=2 + i)))
    return out


@struct.dataclass
class TwoBranchLookup:
    """A test-only static-tree drafter: two chains of 3 tokens, the continuations of the latest
    and the second-latest earlier occurrence of the root token (so accepted paths are often not
    the first branch, which exercises cache compaction)."""

    @property
    def tree(self):
        return trees.from_paths([(0,), (1,), (0, 0), (1, 0), (0, 0, 0), (1, 0, 0)])

    def cache_slack(self):
        return 7

    def check_compatible(self, target):
        return None

    def init(self, target, prompt_tokens, prompt_lengths, max_len, state=None):
        return state

    def propose(self, state, ctx, sampling, key, vocab):
        batch, h = ctx.history.shape
        rows = jnp.arange(batch)
        idx = jnp.arange(h)[None, :]
        root = ctx.history[rows, ctx.length - 1]
        match = (ctx.history == root[:, None]) & (idx < ctx.length[:, None] - 1)
        first = jnp.max(jnp.where(match, idx, -1), axis=1)
        second = jnp.max(jnp.where(match & (idx < first[:, None]), idx, -1), axis=1)

        def branch(at):
            offs = at[:, None] + 1 + jnp.arange(3)[None, :]
            ok = (at[:, None] >= 0) & (offs < ctx.length[:, None])
            return ctx.history[rows[:, None], jnp.clip(offs, 0, h - 1)], ok

        a, ok_a = branch(first)
        b, ok_b = branch(second)
        # Node order of the tree: root, a0, b0, a1, b1, a2, b2.
        tokens = jnp.stack([root, a[:, 0], b[:, 0], a[:, 1], b[:, 1], a[:, 2], b[:, 2]], axis=1)
        valid = jnp.stack([jnp.ones_like(root, bool), ok_a[:, 0], ok_b[:, 0], ok_a[:, 1],
                           ok_b[:, 1], ok_a[:, 2], ok_b[:, 2]], axis=1) & ctx.active[:, None]
        valid = valid.at[:, 0].set(True)
        parents = jnp.broadcast_to(jnp.asarray(self.tree.parents, jnp.int32), tokens.shape)
        return Draft(tokens=tokens, parents=parents, valid=valid, q=None), state

    def commit(self, state, ctx, draft, verdict, target_logits):
        return state


def methods(draft, mesh: str | None = None):
    """name -> (drafter, Sampling) run on `mesh` ("2x4"; None = the one-device baseline).

    Each program costs 5-15 s of CPU to compile, so the matrix is pruned: every method runs on
    the mixed 2x4 mesh except the test-only two-branch tree (which, with autoregressive decoding,
    covers the pure-data 8x1 and pure-model 1x8 meshes); 8x1 and 1x8 each also run one chain
    drafter (DraftModel, PromptLookup).
    """
    greedy = js.Sampling(temperature=0.0)
    hot = js.Sampling(temperature=0.9)
    table = {
        "autoregressive": (None, greedy, None),
        # sizing=None: a size chosen from this machine's measured cost curve could make every
        # round a plain step, and the test needs accepted drafts to compare verification
        "draft_model": (js.DraftModel(draft, num_tokens=3, sizing=None), greedy, ("8x1", "2x4")),
        "prompt_lookup": (js.PromptLookup(ngram=2, num_tokens=4, sizing=None), greedy, ("2x4", "1x8")),
        "tree": (TwoBranchLookup(), greedy, ("8x1", "1x8")),
        "draft_model_sampled": (js.DraftModel(draft, num_tokens=3, sizing=None), hot, ("2x4",)),
    }
    # The tree drafters from the trees work, when present.
    if hasattr(js, "TokenRecycling"):
        table["token_recycling"] = (js.TokenRecycling(sizing=None), greedy, ("2x4",))
    if "tree" in getattr(js.DraftModel, "__dataclass_fields__", {}):
        table["draft_tree"] = (js.DraftModel(draft, tree=trees.kary(2, 2)), greedy, ("2x4",))
    return {name: (d, s) for name, (d, s, where) in table.items()
            if mesh is None or where is None or mesh in where}


def _generate(result, mesh_shape):
    target, draft = models()
    label = "single" if mesh_shape is None else "%dx%d" % mesh_shape
    mesh = None if mesh_shape is None else js.make_mesh(data=mesh_shape[0], model=mesh_shape[1])
    if mesh is not None:
        target = js.shard(target, mesh)
    runs = result.setdefault("generate", {})
    for name, (drafter, sampling) in methods(draft, None if mesh is None else label).items():
        start = time.perf_counter()
        out = js.generate(target, prompts(), max_new_tokens=MAX_NEW, sampling=sampling,
                          drafter=drafter, seed=3, mesh=mesh)
        runs.setdefault(name, {})[label] = {
            "tokens": out.tokens.tolist(), "lengths": out.lengths.tolist(),
            "accepted": int(np.sum(out.stats["accepted"])), "seconds": time.perf_counter() - start}


def section_placement(result):
    """Parameter and cache shardings, inside and outside the generation programs."""
    from jaxspec.decoding import prefill
    from jaxspec.models.cache import KVCache
    target, draft = models()
    out = {}
    for data, model in MESHES:
        mesh = js.make_mesh(data=data, model=model)
        key = f"{data}x{model}"
        placed = js.shard(target, mesh)
        flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in
                jax.tree_util.tree_flatten_with_path(placed.params)[0]}
        checks = {p: bool(x.sharding.is_equivalent_to(
            jax.sharding.NamedSharding(mesh, sharding.partition_spec(p)), x.ndim))
            for p, x in flat.items()}
        shard_shapes = {p: list(x.addressable_shards[0].data.shape) for p, x in flat.items()}
        replicated = js.shard(draft, mesh, replicate=True)
        draft_ok = all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(replicated.params))

        def run_prefill(model, tokens, lengths, draft_model):
            with sharding.use_mesh(mesh, model.config):
                tokens, lengths = sharding.constrain_batch(tokens, lengths)
                cache = KVCache.create(model.config, tokens.shape[0], 32, model.dtype)
                _, _, cache = prefill(model, tokens, lengths, cache)
                dcache = KVCache.create(draft_model.config, tokens.shape[0], 32, draft_model.dtype)
            return cache, dcache

        tokens = np.zeros((BATCH, 16), np.int32)
        lengths = np.full((BATCH,), 5, np.int32)
        cache, dcache = jax.jit(run_prefill)(placed, tokens, lengths, replicated)
        want_kv = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", "model", None, None))
        want_draft = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", None, None, None))
        want_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        out[key] = {
            "params": checks,
            "shard_shapes": shard_shapes,
            "draft_replicated": draft_ok,
            "cache_k": bool(cache.k.sharding.is_equivalent_to(want_kv, 5)),
            "cache_v": bool(cache.v.sharding.is_equivalent_to(want_kv, 5)),
            "cache_lengths": bool(cache.lengths.sharding.is_equivalent_to(want_rows, 1)),
            "cache_shard_shape": list(cache.k.addressable_shards[0].data.shape),
            "draft_cache_k": bool(dcache.k.sharding.is_equivalent_to(want_draft, 5)),
            "cache_spec": str(cache.k.sharding.spec),
        }
    result["placement"] = out


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def section_errors(result):
    target, _ = models()
    few_kv = ModelConfig(**{**TARGET.__dict__, "num_kv_heads": 4})
    odd_heads = ModelConfig(**{**TARGET.__dict__, "num_heads": 12, "num_kv_heads": 4, "head_dim": 4})
    odd_vocab = ModelConfig(**{**TARGET.__dict__, "vocab_size": 62})
    m18, m81, m44 = (js.make_mesh(data=1, model=8), js.make_mesh(data=8, model=1),
                     js.make_mesh(data=2, model=4))
    result["errors"] = {
        "kv_heads": _error(lambda: js.shard(create(few_kv, 0), m18)),
        "heads": _error(lambda: js.shard(create(odd_heads, 0), js.make_mesh(data=1, model=8))),
        "vocab": _error(lambda: js.shard(create(odd_vocab, 0), m44)),
        "batch": _error(lambda: js.generate(target, prompts()[:6], max_new_tokens=2, mesh=m81)),
        "too_many_devices": _error(lambda: js.make_mesh(data=4, model=4)),
        "bad_axis_size": _error(lambda: js.make_mesh(data=0, model=2)),
        "replicated_ok": _error(lambda: js.shard(create(odd_vocab, 0), m44, replicate=True)),
    }


def section_loading(result):
    from jaxspec.models.hf import SliceReader
    target, _ = models()
    gpt2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=8,
                       num_kv_heads=8, head_dim=4, intermediate_size=64, max_position_embeddings=32,
                       tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True)
    out = {}
    reads = []
    original_read = SliceReader.read

    def counting_read(self, name, index):
        block = original_read(self, name, index)
        reads.append((name, block.size))
        return block
    SliceReader.read = counting_read
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, model in (("llama", target), ("gpt2", create(gpt2, 5))):
                hf_dir = Path(tmp) / label
                js.save(model, hf_dir)
                plain = js.load(hf_dir)
                for data, m in ((2, 4), (1, 8)):
                    mesh = js.make_mesh(data=data, model=m)
                    reads.clear()
                    loaded = js.load(hf_dir, mesh=mesh)
                    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
                        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        plain.params, loaded.params))
                    placed = jax.tree_util.tree_all(jax.tree_util.tree_map(
                        lambda a, b: bool(a.sharding.is_equivalent_to(b.sharding, a.ndim)),
                        loaded.params, js.shard(plain, mesh).params))
                    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(plain.params))
                    out[f"hf_{label}_{data}x{m}"] = {"equal": bool(same), "placed": bool(placed),
                                                     "elements_read": sum(n for _, n in reads),
                                                     "elements_total": total,
                                                     "largest_read": max(n for _, n in reads)}
            # Orbax: save sharded on (2, 4), restore into other layouts.
            mesh24 = js.make_mesh(data=2, model=4)
            ckpt = Path(tmp) / "orbax"
            sharding.save_checkpoint(js.shard(target, mesh24), ckpt)
            for data, m, replicate in ((1, 8, False), (8, 1, False), (2, 4, True)):
                mesh = js.make_mesh(data=data, model=m)
                restored = js.load(ckpt, mesh=mesh, replicate=replicate)
                same = jax.tree_util.tree_all(jax.tree_util.tree_map(
                    lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                    target.params, restored.params))
                want = js.shard(target, mesh, replicate=replicate).params
                placed = jax.tree_util.tree_all(jax.tree_util.tree_map(
                    lambda a, b: bool(a.sharding.is_equivalent_to(b.sharding, a.ndim)),
                    restored.params, want))
                out[f"orbax_{data}x{m}{'_replicated' if replicate else ''}"] = {
                    "equal": bool(same), "placed": bool(placed),
                    "config_equal": restored.config == target.config}
            plain = js.load(ckpt)  # no mesh: restored onto one device
            out["orbax_no_mesh"] = {"equal": jax.tree_util.tree_all(jax.tree_util.tree_map(
                lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                target.params, plain.params)), "placed": True, "config_equal": plain.config == target.config}
    finally:
        SliceReader.read = original_read
    result["loading"] = out


SECTIONS = {"single": lambda r: _generate(r, None), "placement": section_placement,
            "errors": section_errors, "loading": section_loading,
            **{"%dx%d" % m: (lambda r, m=m: _generate(r, m)) for m in MESHES}}


def main(argv):
    out_path, names = Path(argv[1]), argv[2:] or list(SECTIONS)
    result = {"devices": len(jax.devices()), "seconds": {}}
    for name in names:
        start = time.perf_counter()
        try:
            SECTIONS[name](result)
        except Exception:  # reported to the test, which fails with the traceback
            result.setdefault("failures", {})[name] = traceback.format_exc()
        result["seconds"][name] = time.perf_counter() - start
        out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
