"""`js.default_drafter(target)`: the best shipped drafter for a known target, else prompt lookup.

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
from jaxspec.speculative.drafters.prompt_lookup import PromptLookup

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


def default_drafter(target: Model, dtype: str = "float32"):
    """The shipped drafter trained for this target (by fingerprint), else js.PromptLookup()."""
    if not isinstance(target, Model):
        raise ValueError(f"default_drafter needs a js.Model, got {type(target).__name__}")
    mine = fingerprint(target)
    for path, meta in shipped_drafters():
        if meta.get("target_fingerprint") == mine and meta.get("kind") == "eagle":
            return Eagle.load(path, dtype=dtype)
    return PromptLookup(ngram=3, num_tokens=8)
