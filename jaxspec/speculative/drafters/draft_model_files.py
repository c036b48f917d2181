"""Files of a distilled draft model that shares its target's embedding and LM head rows.

A draft distilled for one target (jaxspec.train.recipes.draft, the FastDraft recipe) keeps only
its own decoder layers and final norm; its token embedding is the target's, and its head is
VocabTrim's: the target's LM-head rows of the V' token ids it was trained to predict. Storing
the 49152 x 576 embedding of SmolLM2 again would cost 57 MB (bfloat16) per draft, the layers
cost 14 MB for two.

  save(drafter, path)        config.json (kind "draft_model": layer config, head size, the
                             target's fingerprint, the chain length) + model.safetensors (layers,
                             final norm, head_ids)
  load(path, target) -> DraftModel with the target's embedding and head rows attached; a
                             draft distilled for another target (hidden size, vocabulary or
                             weight fingerprint) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import Model
from jaxspec.speculative.drafters.eagle import fingerprint, head_rows

KIND = "draft_model"
_SHARED = ("embed", "lm_head")   # the target's: not stored


def _stacked_layers(layers):
    """Per-layer params (a list, after transformer.unstack_layers) -> stacked [L, ...] arrays."""
    if isinstance(layers, (list, tuple)):
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return layers


def save(drafter, path: str | os.PathLike, dtype: str = "bfloat16", extra: dict | None = None,
         target_fingerprint: str | None = None) -> None:
    from safetensors.numpy import save_file
    import ml_dtypes

    if drafter.head_ids is None:
        raise ValueError("only a draft sharing its target's embedding and VocabTrim head rows is "
                         "saved this way (DraftModel(..., head_ids=...)); save a whole draft model "
                         "with jaxspec.models.hf.save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    own = {k: v for k, v in drafter.model.params.items() if k not in _SHARED}
    own["layers"] = _stacked_layers(own["layers"])
    flat = {"head_ids": np.asarray(jax.device_get(drafter.head_ids), np.int32)}
    for keypath, value in jax.tree_util.tree_flatten_with_path(own)[0]:
        name = ".".join(str(getattr(k, "key", k)) for k in keypath)
        flat[name] = np.asarray(jax.device_get(value), np.float32).astype(np_dtype)
    save_file(flat, str(path / "model.safetensors"))
    meta = {"kind": KIND, "config": dataclasses.asdict(drafter.model.config),
            "head_tokens": int(flat["head_ids"].shape[0]), "num_tokens": drafter.num_tokens,
            "target_fingerprint": target_fingerprint, **(extra or {})}
    (path / "config.json").write_text(json.dumps(meta, indent=1))


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ValueError(f"{path} is not a draft model directory (needs config.json and "
                         "model.safetensors, as written by DraftModel.save)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{cfg_file} describes a {meta.get('kind')!r} drafter, not a draft model")
    return meta


def load(cls, path: str | os.PathLike, target: Model, dtype: str = "float32", **fields):
    """A `cls` (DraftModel) over the stored layers with `target`'s embedding and head rows.
    fields: DraftModel settings (num_tokens, sizing, ...); num_tokens defaults to the stored one."""
    from safetensors import safe_open

    meta = read_meta(path)
    layer = dict(meta["config"])
    for key in ("rope_scaling", "eos_token_ids", "layer_types"):
        if isinstance(layer.get(key), list):
            layer[key] = tuple(layer[key])
    config = ModelConfig(**layer)
    t = target.config
    if config.hidden_size != t.hidden_size or config.vocab_size != t.vocab_size:
        raise ValueError(f"this draft model was distilled for a target of hidden size "
                         f"{config.hidden_size} and vocabulary {config.vocab_size}, but the target "
                         f"has {t.hidden_size} and {t.vocab_size}")
    expected = meta.get("target_fingerprint")
    if expected is not None and expected != fingerprint(target):
        raise ValueError(f"this draft model was distilled for another target (fingerprint "
                         f"{expected}, this target's is {fingerprint(target)}); it shares its "
                         "target's embedding and head, so it cannot serve another")
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    params: dict = {}
    with safe_open(str(Path(path) / "model.safetensors"), framework="numpy") as f:
        head_ids = jnp.asarray(f.get_tensor("head_ids"), jnp.int32)
        for name in f.keys():
            if name == "head_ids":
                continue
            node = params
            *parents, leaf = name.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(f.get_tensor(name).astype(np.float32)).astype(jdtype)
    params["embed"] = target.params["embed"].astype(jdtype)
    params["lm_head"] = {"kernel": head_rows(target.params, head_ids).T.astype(jdtype)}  # [D, V']
    model = Model(config=config, params=params, tokenizer=target.tokenizer)
    if "num_tokens" not in fields and "tree" not in fields:
        fields["num_tokens"] = meta.get("num_tokens")
    return cls(model, head_ids=head_ids, **fields)
