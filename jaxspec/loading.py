"""`js.load`: the one entry point that turns a checkpoint on disk into a js.Model.

It sits above both `jaxspec.models` (which reads Hugging Face safetensors directories onto one
device and knows nothing of meshes) and `jaxspec.sharding` (which loads straight into a sharded
layout and restores jaxspec orbax checkpoints), and picks between them. New checkpoint kinds
(GGUF files, named registry models) are dispatched here too.
"""

from __future__ import annotations

import os

from jaxspec import sharding
from jaxspec.models import gguf, hf, registry
from jaxspec.models.transformer import Model


def load(path: str | os.PathLike, dtype: str = "float32", attn_impl: str = "auto",
         mesh=None, replicate: bool = False) -> Model:
    """Load a local checkpoint into a jaxspec Model.

    path: a named offline model (jaxspec.models.registry: "smollm2-135m-instruct", "gemma-3-270m",
    "jaxspec-tiny-code", "jaxspec-tiny-code-draft"), a .gguf file (or a directory holding one;
    dequantized to dtype), a Hugging Face directory (config.json + safetensors [+ tokenizer
    files]) or a jaxspec sharded checkpoint (jaxspec.sharding.save_checkpoint; restored onto one device without a mesh).
    dtype: "float32", "bfloat16" or "float16". attn_impl: see jaxspec.attention.
    mesh: a js.make_mesh mesh to load straight into the sharded layout (each process reads only
    its slices; see jaxspec.sharding.load_sharded); replicate=True copies it whole to every device.
    """
    if registry.is_name(path):                            # "smollm2-135m-instruct", ...
        model = registry.load(path, dtype=dtype, attn_impl=attn_impl)
        return sharding.shard(model, mesh) if mesh is not None else model
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"js.load takes a path or a model name ({', '.join(registry.names())}), "
                         f"got {type(path).__name__}")
    if not os.path.exists(path):
        raise ValueError(f"{path!r} is neither an existing path nor a known model name "
                         f"({', '.join(registry.names())})")
    if gguf.is_gguf(path):                                # a .gguf file or a directory holding one
        model = gguf.load(path, dtype=dtype, attn_impl=attn_impl)
        return sharding.shard(model, mesh) if mesh is not None else model
    if mesh is not None or sharding.is_checkpoint(path):  # orbax checkpoints restore onto a mesh
        mesh = sharding.make_mesh(1, 1) if mesh is None else mesh
        return sharding.load_sharded(path, mesh, dtype=dtype, attn_impl=attn_impl, replicate=replicate)
    return hf.load(path, dtype=dtype, attn_impl=attn_impl)


__all__ = ["load"]
