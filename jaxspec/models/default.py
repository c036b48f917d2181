"""The default model pair shipped inside the package (jaxspec/assets), loaded offline."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TARGET_DIR = ASSETS_DIR / "default_target"
DRAFT_DIR = ASSETS_DIR / "default_draft"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def default_pair_dirs() -> tuple[Path, Path]:
    """(target dir, draft dir) of the shipped pair; raises FileNotFoundError if incomplete."""
    for d in (TARGET_DIR, DRAFT_DIR):
        missing = [f for f in _REQUIRED if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the shipped default model pair is missing: {d} lacks {', '.join(missing)}. "
                "Reinstall jaxspec, or regenerate the pair with "
                "`python -m jaxspec.train.recipes.default_pair` (or `jaxspec train default-pair`).")
    return TARGET_DIR, DRAFT_DIR


def load_default(dtype: str = "float32", attn_impl: str = "auto"):
    """The shipped (target, draft) pair: a small code model trained on the Python standard
    library and a draft distilled from it, with their shared tokenizer. No download."""
    from jaxspec.models.hf import load
    target_dir, draft_dir = default_pair_dirs()
    return (load(target_dir, dtype=dtype, attn_impl=attn_impl),
            load(draft_dir, dtype=dtype, attn_impl=attn_impl))
