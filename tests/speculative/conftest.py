"""Shared fixtures for the speculative-loop and drafter tests: one tiny target, its drafts.

Every model here has the same config (vocabulary 32, hidden 32, 2 layers), so a drafter built
on any of them compiles to the same program as on the others: the params are pytree leaves.
Compilation dominates the runtime of these tests on CPU, so the tests reuse a handful of
program shapes: batch 3, prompt bucket 16, max_new_tokens bucket 16.

At the default init (std 0.02) such a model is nearly a bigram model: attention is almost
uniform, so a wrong KV cache slot or a position off by one rarely changes its output, and
exactness tests would not see such bugs. `make_model` therefore scales the attention
projections (q, k by 12: sharp, position-sensitive attention; v, o by 4) and the LM head (by 12:
logit std ~1.3, so at temperature 0.8 top-k / top-p actually remove tokens). Then the argmax
after a token changes with the earlier context for ~90% of random contexts, and moving only
the last token's position by one changes it for ~35%.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

VOCAB = 32
MAX_POSITIONS = 64
MAX_NEW = 16          # = the smallest max_new_tokens bucket, so every greedy run shares one
LM_HEAD_SCALE = 12.0
QK_SCALE, VO_SCALE = 12.0, 4.0

# Ragged prompts (lengths 1, 6 and 13: one prompt bucket of 16), the second repetitive.
PROMPTS = [[5], [3, 9, 3, 9, 3, 9], list(range(1, 14))]


def _config(vocab: int = VOCAB):
    from jaxspec.models.config import ModelConfig

    return ModelConfig(family="llama", vocab_size=vocab, hidden_size=32, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                       max_position_embeddings=MAX_POSITIONS)


def _with_lm_head(model, kernel):
    params = dict(model.params)
    params["lm_head"] = {"kernel": kernel}
    return model.replace(params=params)


def make_model(seed: int, vocab: int = VOCAB):
    """A random tiny llama: context-sensitive, with a peaked next-token distribution."""
    from jaxspec.models import create

    model = create(_config(vocab), seed)
    params = dict(model.params)
    layers = dict(params["layers"])
    for name, scale in (("q", QK_SCALE), ("k", QK_SCALE), ("v", VO_SCALE), ("o", VO_SCALE)):
        layers[name] = {"kernel": layers[name]["kernel"] * scale}
    params["layers"] = layers
    params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * LM_HEAD_SCALE}
    return model.replace(params=params)


def make_tokenizer(words):
    """A whitespace word-level PreTrainedTokenizerFast whose token i is words[i]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[-1])


@pytest.fixture(scope="session")
def tiny():
    """The constants and builders above, for test modules (they cannot import a conftest)."""
    return types.SimpleNamespace(vocab=VOCAB, max_positions=MAX_POSITIONS, max_new=MAX_NEW,
                                 prompts=PROMPTS, make_model=make_model,
                                 make_tokenizer=make_tokenizer)


@pytest.fixture(scope="session")
def target():
    return make_model(0)


@pytest.fixture(scope="session")
def unrelated_draft():
    """Independent random weights: it (almost) never agrees with the target."""
    return make_model(1)


@pytest.fixture(scope="session")
def related_draft(target):
    """The target with a perturbed LM head: it agrees with the target part of the time
    (about 1/3 of its drafts accepted at temperature 0, 0.6 at temperature 0.8)."""
    noise = make_model(7).params["lm_head"]["kernel"]
    return _with_lm_head(target, target.params["lm_head"]["kernel"] + 0.3 * noise)


@pytest.fixture(scope="session")
def greedy_ref(target):
    """The target's own greedy output for PROMPTS (autoregressive, no drafter)."""
    import jaxspec as js

    out = js.generate(target, PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens.shape == (len(PROMPTS), MAX_NEW)
    assert np.all(out.lengths == MAX_NEW)
    return out
