"""Pallas kernels. Each file holds a kernel, its `pallas_call` wrapper, its public jitted
function and a pure-jnp `*_reference` beside it. Only `jaxspec.attention` imports this package."""

from pallas_kernels.tree_attention import (
    SHIPPED_CONFIGS,
    BlockConfig,
    tree_attention,
    tree_attention_reference,
)

__all__ = ["SHIPPED_CONFIGS", "BlockConfig", "tree_attention", "tree_attention_reference"]
