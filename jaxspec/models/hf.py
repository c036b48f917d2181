"""Read and write Hugging Face checkpoint directories (safetensors only, never pickle).

`load(path)` checks every tensor against the config before reading any data: a missing, extra
or mis-shaped tensor is refused with its name. `save(model, path)` writes config.json,
model.safetensors and the tokenizer files so `transformers` loads the directory unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import Model, param_shapes

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Buffers some checkpoints carry that are not parameters.
_IGNORABLE_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _layer_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our stacked-layer parameter path -> (HF name template with {i}, transpose?)."""
    if config.is_gpt2:
        base = "transformer.h.{i}."
        names = {"attn_norm/scale": ("ln_1.weight", False), "attn_norm/bias": ("ln_1.bias", False),
                 "mlp_norm/scale": ("ln_2.weight", False), "mlp_norm/bias": ("ln_2.bias", False),
                 "o/kernel": ("attn.c_proj.weight", False), "o/bias": ("attn.c_proj.bias", False),
                 "up/kernel": ("mlp.c_fc.weight", False), "up/bias": ("mlp.c_fc.bias", False),
                 "down/kernel": ("mlp.c_proj.weight", False), "down/bias": ("mlp.c_proj.bias", False)}
        return {k: (base + v, t) for k, (v, t) in names.items() if _exists(config, k)}
    base = "model.layers.{i}."
    names = {"attn_norm/scale": "input_layernorm.weight",
             "mlp_norm/scale": "post_attention_layernorm.weight",
             "q_norm/scale": "self_attn.q_norm.weight", "k_norm/scale": "self_attn.k_norm.weight"}
    if config.is_gemma:   # four norms per layer: around attention and around the MLP
        names.update({"post_attn_norm/scale": "post_attention_layernorm.weight",
                      "mlp_norm/scale": "pre_feedforward_layernorm.weight",
                      "post_mlp_norm/scale": "post_feedforward_layernorm.weight"})
    out = {k: (base + v, False) for k, v in names.items()}
    for ours, theirs in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"),
                         ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
                         ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj")):
        out[f"{ours}/kernel"] = (base + theirs + ".weight", True)
        out[f"{ours}/bias"] = (base + theirs + ".bias", False)
    return {k: v for k, v in out.items() if _exists(config, k)}


def _top_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    if config.is_gpt2:
        out = {"embed": ("transformer.wte.weight", False), "pos_embed": ("transformer.wpe.weight", False),
               "final_norm/scale": ("transformer.ln_f.weight", False),
               "final_norm/bias": ("transformer.ln_f.bias", False)}
    else:
        out = {"embed": ("model.embed_tokens.weight", False), "final_norm/scale": ("model.norm.weight", False)}
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = ("lm_head.weight", True)
    return out


def _flat_shapes(config: ModelConfig) -> dict[str, tuple]:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else k
            if isinstance(v, dict):
                walk(path, v)
            else:
                flat[path] = v
    walk("", param_shapes(config))
    return flat


def _exists(config: ModelConfig, layer_path: str) -> bool:
    return f"layers/{layer_path}" in _flat_shapes(config)


def _expected_tensors(config: ModelConfig) -> dict[str, tuple]:
    """HF tensor name -> HF shape, for every tensor the checkpoint must hold."""
    shapes = _flat_shapes(config)
    expected = {}
    for ours, (name, transpose) in _top_names(config).items():
        shape = shapes[ours]
        expected[name] = tuple(reversed(shape)) if transpose else shape
    if config.is_gpt2:
        d = config.hidden_size
        for i in range(config.num_layers):
            expected[f"transformer.h.{i}.attn.c_attn.weight"] = (d, 3 * d)
            expected[f"transformer.h.{i}.attn.c_attn.bias"] = (3 * d,)
    for ours, (template, transpose) in _layer_names(config).items():
        shape = shapes[f"layers/{ours}"][1:]
        for i in range(config.num_layers):
            expected[template.format(i=i)] = tuple(reversed(shape)) if transpose else shape
    return expected


def _read_json(file: Path):
    """The JSON value in `file`; a damaged file is refused with its path and the error position."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                         f"(char {e.pos}); the file is corrupt or truncated, restore it from the "
                         "original checkpoint") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: byte {e.start} is not UTF-8 text; the file is "
                         "corrupt, restore it from the original checkpoint") from e


def read_config(file: str | os.PathLike) -> ModelConfig:
    """A checkpoint's config.json -> ModelConfig (a corrupt file is refused with its path)."""
    file = Path(file)
    hf = _read_json(file)
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object (a Hugging Face model config), "
                         f"got a JSON {type(hf).__name__}")
    return ModelConfig.from_hf_dict(hf)


@contextlib.contextmanager
def _reading(file: Path):
    """Turn safetensors' errors while opening or reading `file` into a ValueError naming it."""
    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{file} is truncated or corrupt: it cannot be read as safetensors ({e}). "
                         "Re-download or re-save the checkpoint") from e


def _tensor_files(path: Path) -> dict[str, Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise ValueError(f"{index} has no \"weight_map\" object (tensor name -> file)")
        files = {name: path / file for name, file in weight_map["weight_map"].items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{index} lists {file.name}, which is not in {path}")
        return files
    if single.exists():
        with _reading(single), safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    found = sorted(p.name for p in path.iterdir())
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
        raise ValueError(f"{path} holds only pickle-based weights ({', '.join(found)}); jaxspec reads "
                         "safetensors only (model.safetensors or model.safetensors.index.json) and "
                         "never unpickles. Convert with transformers: "
                         "model.save_pretrained(dir, safe_serialization=True)")
    if (path / "params").is_dir():  # jaxspec.sharding.save_checkpoint's orbax item
        raise ValueError(f"{path} is a jaxspec sharded (orbax) checkpoint, not a safetensors "
                         "directory: load it with js.load(path) (or js.load(path, mesh=...))")
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _normalize_name(name: str, config: ModelConfig) -> str:
    """Accept GPT-2 checkpoints saved without the 'transformer.' prefix."""
    if config.is_gpt2 and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def _check_checkpoint(path: Path, dtype: str):
    """Validate a checkpoint directory against its config.json before reading any data.

    Returns (config, {tensor name: (stored name, file)}, {tensor name: expected HF shape}).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: expected a Hugging Face model directory "
                         "(config.json + model.safetensors [+ tokenizer files])")
    config = read_config(path / "config.json")
    files = {_normalize_name(n, config): (n, f) for n, f in _tensor_files(path).items()}
    expected = _expected_tensors(config)
    files = {n: v for n, v in files.items() if not n.endswith(_IGNORABLE_SUFFIXES)}
    if config.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    missing = sorted(set(expected) - set(files))
    extra = sorted(set(files) - set(expected))
    if missing:
        raise ValueError(f"checkpoint {path} is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ValueError(f"checkpoint {path} has unexpected tensor {extra[0]!r} for a "
                         f"{config.family} config" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return config, files, expected


def load(path: str | os.PathLike, dtype: str = "float32", attn_impl: str = "auto") -> Model:
    """Load a local Hugging Face checkpoint directory into a jaxspec Model (on one device).

    The public `js.load` (jaxspec.loading.load) is the entry point; it also loads onto a mesh
    and restores jaxspec orbax checkpoints, through jaxspec.sharding.
    """
    path = Path(path)
    config, files, expected = _check_checkpoint(path, dtype)
    target = _DTYPES[dtype]
    by_file: dict[Path, list[str]] = {}
    for name, (stored, file) in files.items():
        by_file.setdefault(file, []).append(name)
    tensors = {}
    for file, names in by_file.items():
        with _reading(file), safe_open(file, framework="numpy") as f:
            for name in names:
                stored = files[name][0]
                shape = tuple(f.get_slice(stored).get_shape())
                if shape != expected[name]:
                    raise ValueError(f"tensor {name!r} in {file.name} has shape {shape}, "
                                     f"expected {expected[name]} from config.json")
                tensors[name] = f.get_tensor(stored)
    params = _to_params(tensors, config, target)
    return Model(config=config, params=params, tokenizer=_load_tokenizer(path), attn_impl=attn_impl)


def _to_params(tensors: dict[str, np.ndarray], config: ModelConfig, dtype) -> dict:
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)

    def conv(x, transpose=False):
        x = np.asarray(x)
        x = x.T if transpose else x
        return jnp.asarray(x.astype(np.float32).astype(np_dtype) if x.dtype != np_dtype else x)

    flat = {}
    for ours, (name, transpose) in _top_names(config).items():
        flat[ours] = conv(tensors[name], transpose)
    stacks: dict[str, list] = {}
    if config.is_gpt2:
        d = config.hidden_size
        for i in range(config.num_layers):
            w = tensors[f"transformer.h.{i}.attn.c_attn.weight"]
            b = tensors[f"transformer.h.{i}.attn.c_attn.bias"]
            for j, part in enumerate("qkv"):
                stacks.setdefault(f"{part}/kernel", []).append(w[:, j * d:(j + 1) * d])
                stacks.setdefault(f"{part}/bias", []).append(b[j * d:(j + 1) * d])
    for ours, (template, transpose) in _layer_names(config).items():
        for i in range(config.num_layers):
            x = tensors[template.format(i=i)]
            stacks.setdefault(ours, []).append(x.T if transpose else x)
    for ours, xs in stacks.items():
        flat[f"layers/{ours}"] = conv(np.stack(xs))
    return _unflatten(flat)


class SliceReader:
    """Reads blocks of jaxspec parameters from a checkpoint without reading whole tensors.

    `read("layers/q/kernel", (layers, rows, cols))` returns that block of the stacked, transposed
    jaxspec parameter, reading from each HF tensor only the matching slice (safetensors
    `get_slice`). Used by sharded loading, where each process reads only what its devices hold.
    A context manager: the files stay open inside `with`.
    """

    def __init__(self, path: Path, config: ModelConfig, files: dict, expected: dict, dtype):
        self.path, self.config, self.files, self.expected = path, config, files, expected
        self.np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        try:
            for name, (stored, file) in sorted(self.files.items()):
                with _reading(file):
                    if file not in self._handles:
                        self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
                    shape = tuple(self._handles[file].get_slice(stored).get_shape())
                if shape != self.expected[name]:
                    raise ValueError(f"tensor {name!r} in {file.name} has shape {shape}, "
                                     f"expected {self.expected[name]} from config.json")
        except BaseException:
            self.__exit__()  # `with` does not call __exit__ when __enter__ raises
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._handles.clear()

    def _slice(self, name: str, index: tuple) -> np.ndarray:
        stored, file = self.files[name]
        with _reading(file):
            return np.asarray(self._handles[file].get_slice(stored)[index])

    def read(self, ours: str, index: tuple) -> np.ndarray:
        """Block `index` (a tuple of slices with concrete bounds) of our parameter `ours`."""
        c = self.config
        if not ours.startswith("layers/"):
            name, transpose = _top_names(c)[ours]
            block = self._slice(name, index[::-1] if transpose else index)
            return self._convert(block.T if transpose else block)
        sub, (layers, *rest) = ours[len("layers/"):], index
        rest = tuple(rest)
        blocks = []
        for i in range(layers.start, layers.stop):
            if c.is_gpt2 and sub.split("/")[0] in ("q", "k", "v"):
                # q, k, v are column blocks of the fused c_attn weight [D, 3D] / bias [3D].
                off = "qkv".index(sub[0]) * c.hidden_size
                kind = "weight" if sub.endswith("kernel") else "bias"
                last = slice(rest[-1].start + off, rest[-1].stop + off)
                blocks.append(self._slice(f"transformer.h.{i}.attn.c_attn.{kind}", rest[:-1] + (last,)))
                continue
            template, transpose = _layer_names(c)[sub]
            block = self._slice(template.format(i=i), rest[::-1] if transpose else rest)
            blocks.append(block.T if transpose else block)
        return self._convert(np.stack(blocks))

    def _convert(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        return x if x.dtype == self.np_dtype else x.astype(np.float32).astype(self.np_dtype)

    def tokenizer(self):
        return _load_tokenizer(self.path)


def open_checkpoint(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, SliceReader]:
    """Validate a checkpoint directory and return (config, a SliceReader over its tensors)."""
    path = Path(path)
    config, files, expected = _check_checkpoint(path, dtype)
    return config, SliceReader(path, config, files, expected, _DTYPES[dtype])


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _load_tokenizer(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def to_hf_tensors(model: Model) -> dict[str, np.ndarray]:
    """The model's parameters under Hugging Face names and layouts (numpy, model dtype)."""
    config = model.config
    params = jax.device_get(model.params)
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            p = f"{prefix}/{k}" if prefix else k
            walk(p, v) if isinstance(v, dict) else flat.__setitem__(p, np.asarray(v))
    walk("", params)
    out = {}
    for ours, (name, transpose) in _top_names(config).items():
        out[name] = flat[ours].T if transpose else flat[ours]
    if config.is_gpt2:
        for i in range(config.num_layers):
            out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
                [flat[f"layers/{p}/kernel"][i] for p in "qkv"], axis=1)
            out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
                [flat[f"layers/{p}/bias"][i] for p in "qkv"])
    for ours, (template, transpose) in _layer_names(config).items():
        for i in range(config.num_layers):
            x = flat[f"layers/{ours}"][i]
            out[template.format(i=i)] = x.T if transpose else x
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save(model: Model, path: str | os.PathLike) -> None:
    """Write a Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf_dict()
    dtype = np.dtype(model.dtype)
    hf_config["torch_dtype"] = hf_config["dtype"] = {
        "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
    with open(path / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    save_file(to_hf_tensors(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))
