"""`js.default_drafter(target)`: the best shipped drafter for a known target, else prompt lookup.

For a target with a shipped Eagle drafter that is js.Hybrid(eagle): the Eagle chain and prompt
lookup, the better of the two per row and round, which measured faster than either alone on
SmolLM2 (benchmarks/bench_smollm2_cpu_chat18_repeats3.md: 1.16x against 1.03x and 1.13x, on a
stale cost curve; 1.25x on a fresh one, bench_smollm2_cpu_chat18_hybrid_sizes.md). The
Eagle itself is `shipped_drafter(target, "eagle")`.

Shipped drafters live in `jaxspec/assets/drafters/<name>/` (config.json + model.safetensors +
README.md). A drafter is matched to a target by the fingerprint of the target's config and
weights recorded when it was trained (`eagle.fingerprint`), never by a file or model name, so a
renamed copy of SmolLM2 still finds its drafter and a fine-tuned one does not get a stale one.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxspec.models.transformer import Model
from jaxspec.speculative.drafters.eagle import Eagle, fingerprint
from jaxspec.speculative.drafters.hybrid import Hybrid
from jaxspec.speculative.drafters.prompt_lookup import PromptLookup
from jaxspec.speculative.trees import DynamicTree

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters"


def shipped_drafters() -> list[tuple[Path, dict]]:
    """(directory, config.json) of every shipped drafter, sorted by directory name."""
    out = []
    if SHIPPED_DIR.is_dir():
        for d in sorted(SHIPPED_DIR.iterdir()):
            cfg = d / "config.json"
            if cfg.is_file() and (d / "model.safetensors").is_file():
                out.append((d, json.loads(cfg.read_text())))
    return out


def shipped_drafter(target: Model, kind: str, dtype: str = "float32"):
    """The shipped drafter of `kind` ("eagle", "medusa" or "draft_model") trained for this
    target (matched by fingerprint), or None."""
    from jaxspec.speculative.drafters.draft_model import DraftModel
    from jaxspec.speculative.drafters.medusa import Medusa

    loaders = {"eagle": Eagle.load, "medusa": Medusa.load,
               "draft_model": lambda path, dtype: DraftModel.load(path, target, dtype=dtype)}
    if kind not in loaders:
        raise ValueError(f"kind must be one of {sorted(loaders)}, got {kind!r}")
    mine = fingerprint(target)
    for path, meta in shipped_drafters():
        if meta.get("target_fingerprint") == mine and meta.get("kind") == kind:
            return loaders[kind](path, dtype=dtype)
    return None


def default_drafter(target: Model, dtype: str = "float32"):
    """js.Hybrid over the shipped Eagle drafter trained for this target (by fingerprint), else its
    shipped Medusa heads, else js.PromptLookup()."""
    if not isinstance(target, Model):
        raise ValueError(f"default_drafter needs a js.Model, got {type(target).__name__}")
    eagle = shipped_drafter(target, "eagle", dtype)
    if eagle is not None:
        if isinstance(eagle.tree, DynamicTree) or eagle.tree.max_children != 1:
            return eagle   # the hybrid combines chains only
        return Hybrid(eagle)
    medusa = shipped_drafter(target, "medusa", dtype)
    return medusa if medusa is not None else PromptLookup(ngram=3, num_tokens=8)
