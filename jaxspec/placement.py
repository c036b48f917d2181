"""The active placement: where arrays created inside a traced program are constrained to go.

The models (`KVCache.create`) and the decode loops call `constrain_cache` / `constrain_batch`
on what they create; outside a placement both are the identity. This module sits below
`jaxspec.models` and knows nothing of meshes, axis names or partition specs: those stay in
`jaxspec.sharding`, whose `use_mesh` installs a placement object here (`placed`) that does the
constraining. Any object with these two methods is a placement:

  constrain_cache(cache, config) -> cache     a KVCache [L, B, Hkv, S, Dh] (or L per-layer
                                              buffers) of model `config`
  constrain_batch(arrays: tuple) -> tuple     batch-major arrays [B, ...]
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("jaxspec_placement", default=None)


@contextlib.contextmanager
def placed(placement):
    """Make `placement` the active one inside the block (nested blocks restore the outer one)."""
    token = _ACTIVE.set(placement)
    try:
        yield placement
    finally:
        _ACTIVE.reset(token)


def active():
    """The active placement object, or None."""
    return _ACTIVE.get()


def constrain_cache(cache, config):
    """The KVCache `cache` of model `config`, constrained by the active placement (else unchanged)."""
    placement = _ACTIVE.get()
    return cache if placement is None else placement.constrain_cache(cache, config)


def constrain_batch(*arrays):
    """Batch-major arrays [B, ...] constrained by the active placement (else unchanged)."""
    placement = _ACTIVE.get()
    if placement is not None:
        arrays = tuple(placement.constrain_batch(arrays))
    return arrays if len(arrays) != 1 else arrays[0]
