"""Orbax checkpoints of a training run, with integrity and compatibility checks.

A checkpoint step holds two items: `state` (params, optimizer state, step) and `meta`
(data position, model config, run settings, as JSON). After each save we write a manifest of
every file's size and SHA-256 next to the step; restoring verifies the manifest and the
model config first, so a truncated checkpoint or one from another model is refused with a
message that says which, instead of an obscure orbax/tensorstore error or silently wrong
parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_MANIFEST = "jaxspec_manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (corrupt, truncated or incompatible)."""


def _hash_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: Path) -> dict[str, Path]:
    return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != _MANIFEST}


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (state, meta) pairs."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        self.manager.reload()
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        step_dir = self.step_dir(step)
        manifest = {name: {"size": p.stat().st_size, "sha256": _hash_file(p)}
                    for name, p in _step_files(step_dir).items()}
        tmp = step_dir / (_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, step_dir / _MANIFEST)

    def verify(self, step: int) -> None:
        """Raise CheckpointError unless every file of the step is present and intact."""
        step_dir = self.step_dir(step)
        where = f"checkpoint step {step} in {self.directory}"
        if not (step_dir / _MANIFEST).is_file():
            raise CheckpointError(f"{where} is incomplete: its manifest {_MANIFEST} is missing "
                                  "(the save was interrupted or the directory was edited); delete "
                                  f"{step_dir} to resume from an earlier step, or start afresh")
        try:
            manifest = json.loads((step_dir / _MANIFEST).read_text())
        except ValueError as e:
            raise CheckpointError(f"{where} is corrupt: unreadable manifest ({e})") from None
        files = _step_files(step_dir)
        for name, info in sorted(manifest.items()):
            if name not in files:
                raise CheckpointError(f"{where} is truncated: file {name!r} is missing; delete "
                                      f"{step_dir} to resume from an earlier step, or start afresh")
            size = files[name].stat().st_size
            if size != info["size"]:
                raise CheckpointError(f"{where} is corrupt: file {name!r} has {size} bytes, "
                                      f"expected {info['size']}")
            if _hash_file(files[name]) != info["sha256"]:
                raise CheckpointError(f"{where} is corrupt: file {name!r} does not match its "
                                      "recorded SHA-256")

    def restore_meta(self, step: int) -> dict:
        self.verify(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, step: int, abstract_state: Any, expect: dict | None = None) -> tuple[Any, dict]:
        """Restore (state, meta) at `step` onto the structure of `abstract_state`.

        `expect`: meta entries (e.g. the model config) that must equal the stored ones.
        """
        meta = self.restore_meta(step)
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if _canon(have) != _canon(want):
                diff = _first_difference(have, want)
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was written for a different "
                    f"{key}{diff}; use another --out/checkpoint directory or the matching settings")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # orbax / tensorstore errors are not uniform across versions
            raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be "
                                  f"restored: {type(e).__name__}: {str(e)[:500]}") from e
        return out["state"], meta

    def close(self) -> None:
        self.manager.close()


def _canon(x):
    return json.loads(json.dumps(x, sort_keys=True, default=list))


def _first_difference(have, want) -> str:
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            if _canon(have.get(k)) != _canon(want.get(k)):
                return f" ({k}: checkpoint has {have.get(k)!r}, this run has {want.get(k)!r})"
    return f" (checkpoint has {have!r}, this run has {want!r})"
