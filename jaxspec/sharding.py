"""Meshes, the one table of partition rules, and sharded placement, loading and checkpoints.

Only this module knows mesh axis names and partition specs. A mesh has two axes:

  "data"   splits the batch: prompts, KV caches, output buffers (no communication);
  "model"  splits the target's weights Megatron-style (tensor parallelism): vocab-parallel
           embedding and LM head, column-parallel q/k/v and MLP gate/up, row-parallel o and
           MLP down (one all-reduce after each row-parallel matmul), norms and the biases of
           row-parallel layers replicated. The KV cache is split by batch on "data" and by KV
           head on "model", so attention needs no communication.

Drafters (draft models, heads, tables) are replicated by default: they are small, and a
replicated drafter proposes without any collective. Their KV caches are split by batch only.

Axis types. The mesh axes are `AxisType.Auto` (jax 0.10 makes `Explicit` the default of
`jax.make_mesh`, so we pass the types explicitly). The model code is plain jnp without
sharding-in-types annotations (einsums without `out_sharding`, a gather from a vocab-split
embedding), which explicit axes would reject as ambiguous; with Auto axes the compiler
propagates the parameter placements and the constraints this module adds (KV cache at
creation, prompt arrays on entry) through the whole program.

Usage:

    mesh = js.make_mesh(data=2, model=4)
    target = js.shard(js.load(path), mesh)            # or js.load(path, mesh=mesh)
    out = js.generate(target, prompts, drafter=js.DraftModel(draft), mesh=mesh)

Inside a user's own jit: `js.speculative.generate_tokens(..., mesh=mesh)` (or
`js.autoregressive_tokens(..., mesh=mesh)`) with arguments placed by `js.shard` / `put_batch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspec import placement

DATA = "data"
MODEL = "model"

# -- the partition rules ----------------------------------------------------------------------
# (regex over the parameter path "a/b/c", spec over the parameter's full shape). First match
# wins; stacked layer parameters carry the layer axis first (never split). See the parameter
# layout in jaxspec/models/transformer.py.
RULES: tuple[tuple[str, P], ...] = (
    (r"^embed$", P(MODEL, None)),                           # [V, D]     vocab-parallel
    (r"^lm_head/kernel$", P(None, MODEL)),                  # [D, V]     vocab-parallel
    (r"^pos_embed$", P()),                                  # [P, D]
    (r"^layers/(q|k|v)/kernel$", P(None, None, MODEL)),     # [L, D, H*Dh] column-parallel
    (r"^layers/(q|k|v)/bias$", P(None, MODEL)),             # [L, H*Dh]
    (r"^layers/(gate|up)/kernel$", P(None, None, MODEL)),   # [L, D, F]  column-parallel
    (r"^layers/(gate|up)/bias$", P(None, MODEL)),           # [L, F]
    (r"^layers/(o|down)/kernel$", P(None, MODEL, None)),    # [L, H*Dh | F, D] row-parallel
    (r"^layers/(o|down)/bias$", P()),                       # [L, D]     added after the reduce
    (r"(^|/)(post_)?(attn_norm|mlp_norm|final_norm|q_norm|k_norm)/(scale|bias)$", P()),
)


def partition_spec(path: str) -> P:
    """The PartitionSpec of the parameter at `path` (e.g. "layers/q/kernel")."""
    for pattern, spec in RULES:
        if re.search(pattern, path):
            return spec
    raise ValueError(f"no partition rule matches parameter {path!r}; add one to "
                     "jaxspec.sharding.RULES")


def _paths(tree) -> tuple[list[str], list, Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    paths = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
             for path, _ in leaves]
    return paths, [leaf for _, leaf in leaves], treedef


def param_specs(config) -> dict:
    """PartitionSpecs for every parameter of `config`, as the params' nested dicts."""
    from jaxspec.models.transformer import param_shapes
    paths, _, treedef = _paths(param_shapes(config))
    return jax.tree_util.tree_unflatten(treedef, [partition_spec(p) for p in paths])


# -- meshes -----------------------------------------------------------------------------------

def _auto_axis_types(n: int):
    axis_type = getattr(jax.sharding, "AxisType", None)
    return None if axis_type is None else (axis_type.Auto,) * n


def make_mesh(data: int | None = None, model: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices of all processes).

    data=None takes every device not used by `model`. Axes are Auto (see module docstring).
    Across hosts, jax.devices() lists each process's devices together, so "data" (the outer
    axis) splits across hosts first and "model" stays within a host where it fits.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("data", data), ("model", model)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer))
                                 or size < 1):
            raise ValueError(f"mesh axis {name!r} size must be an integer >= 1, got {size!r}")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(f"a data={data} x model={model} mesh needs {data * model} devices, "
                         f"but only {len(devices)} are available")
    devices = devices[:data * model]
    types = _auto_axis_types(2)
    try:
        kwargs = {} if types is None else {"axis_types": types}
        return jax.make_mesh((data, model), (DATA, MODEL), devices=devices, **kwargs)
    except (TypeError, ValueError):
        # Older jax without devices= / axis_types=, or a topology make_mesh refuses.
        grid = np.asarray(devices, dtype=object).reshape(data, model)
        return Mesh(grid, (DATA, MODEL)) if types is None else Mesh(grid, (DATA, MODEL), axis_types=types)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


def axis_sizes(mesh: Mesh) -> tuple[int, int]:
    """(data, model) sizes of a jaxspec mesh."""
    return _axis_size(mesh, DATA), _axis_size(mesh, MODEL)


def _check_axes(mesh: Mesh):
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh from js.make_mesh, got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in (DATA, MODEL)]
    if unknown:
        raise ValueError(f"mesh axis {unknown[0]!r} is not one jaxspec uses; build the mesh with "
                         f"js.make_mesh(data=..., model=...) (axes {DATA!r}, {MODEL!r})")


def check_mesh(config, mesh: Mesh, batch: int | None = None, replicate: bool = False) -> None:
    """Refuse a mesh that does not divide what it splits (a ValueError naming both)."""
    _check_axes(mesh)
    m = _axis_size(mesh, MODEL)
    if not replicate and m > 1:
        dims = (("num_heads", config.num_heads, "attention heads (q, o)"),
                ("num_kv_heads", config.num_kv_heads, "KV heads (k, v, KV cache)"),
                ("vocab_size", config.vocab_size, "vocabulary (embedding, LM head)"),
                ("intermediate_size", config.intermediate_size, "MLP width (gate, up, down)"))
        for name, size, what in dims:
            if size % m:
                ok = [d for d in range(1, m + 1) if size % d == 0 and m % d == 0]
                raise ValueError(
                    f"mesh axis {MODEL!r} has size {m}, which does not divide {name}={size} of "
                    f"the model: jaxspec splits the {what} across {MODEL!r}. Use a {MODEL!r} size "
                    f"that divides {size} (e.g. {ok[-1]}) and put the other devices on {DATA!r}, "
                    f"or replicate the model (replicate=True)")
    if batch is not None:
        d = _axis_size(mesh, DATA)
        if batch % d:
            raise ValueError(f"mesh axis {DATA!r} has size {d}, which does not divide the batch "
                             f"of {batch} rows: rows are split across {DATA!r}. Pass a multiple "
                             f"of {d} prompts (pad with copies) or use a smaller {DATA!r} axis")


def param_shardings(config, mesh: Mesh, replicate: bool = False) -> dict:
    """NamedShardings for every parameter (all replicated with replicate=True)."""
    check_mesh(config, mesh, replicate=replicate)
    specs = param_specs(config)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, P() if replicate else s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def abstract_params(config, mesh: Mesh | None, dtype=jnp.float32, replicate: bool = False) -> dict:
    """ShapeDtypeStructs of the parameters, with their shardings (no memory is touched)."""
    from jaxspec.models.transformer import init_params
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype))
    if mesh is None:
        return shapes
    shardings = param_shardings(config, mesh, replicate)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


# -- placement --------------------------------------------------------------------------------

def _put(x, sharding: NamedSharding):
    """Place a host or device array; works across processes when every process holds x whole."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _on_mesh(x, mesh: Mesh) -> bool:
    s = getattr(x, "sharding", None)
    return isinstance(s, NamedSharding) and s.mesh == mesh


def replicate_tree(tree, mesh: Mesh):
    """Every array leaf of `tree` replicated over `mesh` (leaves already on it stay put)."""
    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray)) or _on_mesh(x, mesh):
            return x
        return _put(x, NamedSharding(mesh, P()))
    return jax.tree_util.tree_map(put, tree)


def shard(x, mesh: Mesh, replicate: bool = False):
    """Place a Model (or a drafter / any pytree holding Models) on `mesh`.

    A Model's params follow RULES (all replicated with replicate=True); other array leaves (a
    drafter's heads or tables) are replicated. Raises ValueError if the mesh does not divide the
    model (heads, KV heads, vocabulary, MLP width).
    """
    from jaxspec.models.transformer import Model
    _check_axes(mesh)

    def place(node):
        if isinstance(node, Model):
            shardings = param_shardings(node.config, mesh, replicate)
            return node.replace(params=jax.tree_util.tree_map(_put, node.params, shardings))
        if isinstance(node, (jax.Array, np.ndarray)):
            return _put(node, NamedSharding(mesh, P()))
        return node
    return jax.tree_util.tree_map(place, x, is_leaf=lambda n: isinstance(n, Model))


def batch_spec(ndim: int) -> P:
    """Batch-major arrays ([B, ...]): rows on "data"."""
    return P(DATA, *([None] * (ndim - 1)))


def put_batch(mesh: Mesh, *arrays):
    """Host arrays [B, ...] placed with rows split on "data" (every process holds them whole)."""
    out = tuple(_put(a, NamedSharding(mesh, batch_spec(np.ndim(a)))) for a in arrays)
    return out if len(out) != 1 else out[0]


def _is_placed(model, mesh: Mesh) -> bool:
    return all(_on_mesh(x, mesh) for x in jax.tree_util.tree_leaves(model.params))


def prepare_generate(mesh: Mesh, model, drafter, drafter_state, batch_arrays: tuple):
    """What `js.generate(..., mesh=)` does before running: validate the mesh against the target
    and the batch, shard the target (unless already on this mesh), replicate the drafter and
    its state, split the batch arrays on "data"."""
    _check_axes(mesh)
    placed = _is_placed(model, mesh)  # e.g. js.load(path, mesh=mesh), or replicated on purpose
    check_mesh(model.config, mesh, batch=int(np.shape(batch_arrays[0])[0]), replicate=placed)
    if not placed:
        model = shard(model, mesh)
    if drafter is not None:
        drafter = replicate_tree(drafter, mesh)
    if drafter_state is not None:
        drafter_state = replicate_tree(drafter_state, mesh)
    return model, drafter, drafter_state, put_batch(mesh, *batch_arrays)


# -- constraints inside traced programs -------------------------------------------------------
# The active mesh lives in jaxspec.placement (below the models, which constrain the caches they
# create); this module supplies the placement object that knows the axes and specs.

@dataclasses.dataclass(frozen=True)
class _Active:
    """The placement `use_mesh` installs: caches and batch arrays constrained to `mesh`."""

    mesh: Mesh
    target: Any = None  # the target's ModelConfig: its cache is split by KV head

    def _check_rows(self, rows: int):
        if rows % _axis_size(self.mesh, DATA):
            raise ValueError(f"mesh axis {DATA!r} has size {_axis_size(self.mesh, DATA)}, which "
                             f"does not divide the batch of {rows} rows")

    def constrain_cache(self, cache, config):
        self._check_rows(cache.lengths.shape[0])
        spec = cache_spec(config, self.mesh, self.target)
        if cache.per_layer:                  # L buffers [B, Hkv, S, Dh]: the spec without L
            spec = P(*spec[1:])
        kv = NamedSharding(self.mesh, spec)
        rows = NamedSharding(self.mesh, P(DATA))
        wsc = jax.lax.with_sharding_constraint
        return cache.replace(k=jax.tree_util.tree_map(lambda b: wsc(b, kv), cache.k),
                             v=jax.tree_util.tree_map(lambda b: wsc(b, kv), cache.v),
                             lengths=wsc(cache.lengths, rows))

    def constrain_batch(self, arrays: tuple) -> tuple:
        for a in arrays:
            self._check_rows(a.shape[0])
        return tuple(jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, batch_spec(a.ndim)))
                     for a in arrays)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, target_config=None):
    """Make `mesh` the one that caches and batch arrays created inside are constrained to.

    target_config: the target model's config; caches of that config are split by KV head on
    "model", caches of any other config (replicated drafters) by batch only. None = split every
    cache whose KV heads the "model" axis divides.
    """
    _check_axes(mesh)
    with placement.placed(_Active(mesh, target_config)):
        yield mesh


def active_mesh() -> Mesh | None:
    a = placement.active()
    return a.mesh if isinstance(a, _Active) else None


def cache_spec(config, mesh: Mesh, target_config=None) -> P:
    """KV cache [L, B, Hkv, S, Dh]: batch on "data", KV heads on "model" (the target's only)."""
    heads = (target_config is None or config == target_config) and \
        config.num_kv_heads % _axis_size(mesh, MODEL) == 0
    return P(None, DATA, MODEL if heads else None, None, None)


# with_sharding_constraint on a KVCache / on batch-major arrays [B, ...] when a mesh is active
# (else unchanged); the same functions the models and loops call.
constrain_cache = placement.constrain_cache
constrain_batch = placement.constrain_batch


# -- memory accounting ------------------------------------------------------------------------

def per_device_bytes(config, mesh: Mesh | None, batch: int, max_len: int, dtype=jnp.bfloat16,
                     replicate: bool = False) -> dict:
    """Bytes of parameters and of the target KV cache held by one device (abstract: shapes
    from jax.eval_shape, splits from RULES and cache_spec; nothing is allocated)."""
    from jaxspec.models.cache import KVCache
    params = abstract_params(config, mesh, dtype, replicate)
    cache = jax.eval_shape(lambda: KVCache.create(config, batch, max_len, dtype))
    if mesh is not None:
        check_mesh(config, mesh, batch=batch, replicate=replicate)
        kv, rows = NamedSharding(mesh, cache_spec(config, mesh)), NamedSharding(mesh, P(DATA))
        cache = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
                 for x, sh in ((cache.k, kv), (cache.v, kv), (cache.lengths, rows))]

    def nbytes(s):
        shape = s.shape if getattr(s, "sharding", None) is None else s.sharding.shard_shape(s.shape)
        return int(np.prod(shape)) * np.dtype(s.dtype).itemsize
    return {"params": sum(map(nbytes, jax.tree_util.tree_leaves(params))),
            "cache": sum(map(nbytes, jax.tree_util.tree_leaves(cache)))}


# -- sharded loading --------------------------------------------------------------------------

_CKPT_PARAMS = "params"  # orbax item inside a jaxspec sharded checkpoint directory


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Is `path` a `save_checkpoint` directory (config.json + orbax params/, no safetensors)?"""
    path = Path(path)
    return (path / _CKPT_PARAMS).is_dir() and (path / "config.json").is_file() and \
        not any(path.glob("*.safetensors*"))


def save_checkpoint(model, path: str | os.PathLike) -> None:
    """Write `model` as a sharded checkpoint: config.json (+ tokenizer files) and an orbax
    `params/` item. Every process must call it (each writes the shards it holds)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "config.json", "w") as f:
            json.dump(model.config.to_hf_dict(), f, indent=2, sort_keys=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(path))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / _CKPT_PARAMS, model.params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def restore_checkpoint(path: str | os.PathLike, mesh: Mesh, dtype: str = "float32",
                       attn_impl: str = "auto", replicate: bool = False):
    """Restore a `save_checkpoint` directory straight into the sharded layout: every process
    reads only the array slices its devices hold (orbax StandardRestore with target shardings)."""
    import orbax.checkpoint as ocp
    from jaxspec.models.hf import _DTYPES, _load_tokenizer, read_config
    from jaxspec.models.transformer import Model
    path = Path(path).absolute()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config = read_config(path / "config.json")
    abstract = abstract_params(config, mesh, _DTYPES[dtype], replicate)
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    params = checkpointer.restore(path / _CKPT_PARAMS, args=ocp.args.StandardRestore(abstract))
    checkpointer.close()
    return Model(config=config, params=params, tokenizer=_load_tokenizer(path), attn_impl=attn_impl)


def load_sharded(path: str | os.PathLike, mesh: Mesh, dtype: str = "float32",
                 attn_impl: str = "auto", replicate: bool = False):
    """Load a checkpoint directly into the sharded layout, never materialising the whole model
    on one device: each process reads (and each device receives) only its own slices.

    `path`: a Hugging Face directory (safetensors, read slice by slice with `get_slice`) or a
    `save_checkpoint` directory (orbax). replicate=True places every parameter whole on every
    device (drafters).
    """
    path = Path(path)
    if is_checkpoint(path):
        return restore_checkpoint(path, mesh, dtype, attn_impl, replicate)
    from jaxspec.models import hf
    from jaxspec.models.transformer import Model, param_shapes
    config, reader = hf.open_checkpoint(path, dtype)
    paths, leaves, treedef = _paths(param_shardings(config, mesh, replicate))
    shapes = dict(zip(*_paths(param_shapes(config))[:2]))
    with reader:
        arrays = []
        for name, sharding in zip(paths, leaves):
            shape, blocks = shapes[name], {}

            def read(index, name=name, shape=shape, blocks=blocks):
                key = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
                k = tuple((s.start, s.stop) for s in key)
                if k not in blocks:  # replicated params: read once per process, not per device
                    blocks[k] = reader.read(name, key)
                return blocks[k]
            arrays.append(jax.make_array_from_callback(shape, sharding, read))
    params = jax.tree_util.tree_unflatten(treedef, arrays)
    return Model(config=config, params=params, tokenizer=reader.tokenizer(), attn_impl=attn_impl)


__all__ = ["DATA", "MODEL", "RULES", "abstract_params", "active_mesh", "axis_sizes", "batch_spec", "cache_spec",
           "check_mesh", "constrain_batch", "constrain_cache", "is_checkpoint", "load_sharded", "make_mesh",
           "param_shardings", "param_specs", "partition_spec", "per_device_bytes",
           "prepare_generate", "put_batch", "replicate_tree", "restore_checkpoint",
           "save_checkpoint", "shard", "use_mesh"]
