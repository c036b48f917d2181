"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session.

Every checkpoint is created here with `transformers` (PyTorch, float32) from a tiny random
config, perturbed so that biases and norm scales are not at their trivial init values, saved
with `save_pretrained` into a temporary directory and reloaded with `from_pretrained`, so the
reference model is exactly what Hugging Face makes of the files jaxspec reads.

`eos_token_id`, `bos_token_id` and `pad_token_id` are None in every config: no generation stops
early on either side, and prompts are token-id lists (the checkpoints have no tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

VOCAB = 128
MAX_POSITIONS = 128
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3")  # = SUPPORTED_FAMILIES

_NO_SPECIAL = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _hf_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=MAX_POSITIONS,
                  **_NO_SPECIAL)
    if family == "llama":
        # GQA, untied, explicit head_dim != hidden / heads, llama3 rope scaling with
        # rope_theta inside rope_parameters (the transformers 5 layout).
        return tf.LlamaConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            intermediate_size=96, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="llama3", rope_theta=5000.0, factor=8.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=32), **common)
    if family == "mistral":
        # MQA and a sliding window shorter than the test sequences.
        return tf.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                intermediate_size=96, sliding_window=8, rope_theta=20000.0,
                                tie_word_embeddings=False, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=96, tie_word_embeddings=True,
                              use_sliding_window=False, **common)
    if family == "qwen3":
        return tf.Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, intermediate_size=96, tie_word_embeddings=False,
                              use_sliding_window=False, **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                             n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, **_NO_SPECIAL)
    if family == "gemma2":
        # Untied; both soft-caps small enough to bend these tiny models' scores and logits.
        return tf.Gemma2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=32, intermediate_size=96, query_pre_attn_scalar=20,
                               sliding_window=4, attn_logit_softcapping=0.5,
                               final_logit_softcapping=1.0, tie_word_embeddings=False, **common)
    if family == "gemma3":
        # model_type gemma3_text: a sliding layer (window 4) then a global one, head_dim != D / H.
        return tf.Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=32, intermediate_size=96, query_pre_attn_scalar=20,
                                   sliding_window=4, final_logit_softcapping=1.0,
                                   layer_types=["sliding_attention", "full_attention"], **common)
    raise KeyError(family)


def _perturb(model, seed: int) -> None:
    """Move every 1-D parameter (biases, norm scales) away from its 0 / 1 init."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _legacy_rope_layout(path: Path) -> None:
    """Rewrite config.json the pre-transformers-5 way: rope_theta at top level."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


@dataclasses.dataclass
class Checkpoint:
    family: str
    path: Path
    hf: object          # transformers model, float32, eval mode, loaded from `path`
    model: object       # js.Model loaded from `path`

    def hf_logits(self, ids) -> np.ndarray:
        """Reference logits [T, V] for one unpadded sequence of token ids."""
        import torch

        with torch.inference_mode():
            out = self.hf(torch.tensor([list(ids)], dtype=torch.long))
        return out.logits[0].float().numpy()


class _Checkpoints:
    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Checkpoint] = {}

    def __getitem__(self, family: str) -> Checkpoint:
        if family not in self._built:
            self._built[family] = self._build(family)
        return self._built[family]

    def _build(self, family: str) -> Checkpoint:
        import torch
        import transformers as tf

        import jaxspec as js

        torch.manual_seed(FAMILIES.index(family))
        model = tf.AutoModelForCausalLM.from_config(_hf_config(family), dtype=torch.float32)
        _perturb(model, seed=100 + FAMILIES.index(family))
        path = self.root / family
        model.save_pretrained(path)
        if family == "mistral":
            _legacy_rope_layout(path)
        hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        model = js.load(path)
        assert model.config.vocab_size == VOCAB
        return Checkpoint(family=family, path=path, hf=hf, model=model)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints[family] -> Checkpoint, each built on first use and kept for the session."""
    import torch

    # One thread: on a loaded 2-core machine torch's spinning worker threads make tiny-model
    # generate ~15x slower.
    torch.set_num_threads(1)
    return _Checkpoints(tmp_path_factory.mktemp("hf_checkpoints"))


@pytest.fixture(scope="session", params=FAMILIES)
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


@pytest.fixture(scope="session")
def word_tokenizer():
    """A tiny whitespace tokenizer over the test vocabulary: 'w0' .. 'w127' <-> 0 .. 127."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok)  # no special tokens: decode keeps all


def pytest_configure(config):
    """One persistent XLA compilation cache per test session (a fresh temporary directory, also
    used by the subprocesses the tests start: notebooks, CLI, multi-process runs). Modules drop
    their compiled programs when they end (below), and many compile the same programs again
    (SmolLM2's autoregressive and speculative programs, the tiny pair's): those become loads."""
    import os
    import tempfile

    import jax

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxspec-tests-xla-")
        config._jaxspec_xla_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]   # removed at the end
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
    import shutil

    cache = getattr(config, "_jaxspec_xla_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs and jax caches when it ends, so a full run's
    memory does not grow with every module (several compile programs for SmolLM2-135M)."""
    yield
    import gc

    import jax

    from jaxspec import decoding

    decoding.PROGRAMS._programs.clear()
    jax.clear_caches()
    gc.collect()
