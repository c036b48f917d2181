"""Export trained parameters as a Hugging Face directory (via `jaxspec.models.hf.save`)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from jaxspec.models.config import ModelConfig
from jaxspec.models.hf import save
from jaxspec.models.transformer import Model
from jaxspec.train.trainer import cast_params

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def export(params, config: ModelConfig, path: str | os.PathLike, tokenizer=None,
           dtype: str = "bfloat16") -> Model:
    """Write config.json, model.safetensors (in `dtype`) and tokenizer files to `path`;
    returns the exported Model."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    model = Model(config=config, params=cast_params(params, _DTYPES[dtype]), tokenizer=tokenizer)
    save(model, path)
    return model
