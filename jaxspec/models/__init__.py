"""Pure-JAX functional transformers: config, forward, KV cache, Hugging Face checkpoints."""

from jaxspec.models.cache import KVCache, commit, compact
from jaxspec.models.config import SUPPORTED_FAMILIES, ModelConfig
from jaxspec.models.hf import load, save
from jaxspec.models.transformer import Model, create, forward, forward_train, init_params

__all__ = ["KVCache", "Model", "ModelConfig", "SUPPORTED_FAMILIES", "commit", "compact", "create",
           "forward", "forward_train", "init_params", "load", "save"]
