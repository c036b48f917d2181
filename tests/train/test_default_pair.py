"""The shipped default pair: loads offline, with jaxspec and with transformers, same greedy text."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models import default
from jaxspec.models.transformer import forward_train

def test_missing_assets_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(default, "TARGET_DIR", tmp_path / "default_target")
    with pytest.raises(FileNotFoundError, match=r"shipped default model pair is missing: .*default_target "
                                                 r"lacks config.json, model.safetensors, tokenizer.json.*"
                                                 r"jaxspec.train.recipes.default_pair"):
        default.load_default()


@pytest.fixture(scope="module")
def pair():
    return default.load_default()


def _greedy(model, ids: list[int], n: int) -> list[int]:
    seq = jnp.asarray([ids], jnp.int32)
    for _ in range(n):
        logits, _ = forward_train(model.params, model.config, seq)
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)], 1)
    return np.asarray(seq[0, len(ids):]).tolist()


def test_shipped_pair_is_small_bfloat16_and_documented():
    total = sum(f.stat().st_size for d in (default.TARGET_DIR, default.DRAFT_DIR) for f in d.iterdir())
    assert total < 80e6
    for d in (default.TARGET_DIR, default.DRAFT_DIR):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "llama"
        assert (d / "tokenizer_config.json").is_file()
    assert (default.ASSETS_DIR / "MODEL_CARD.md").is_file()


def test_shipped_pair_loads_and_matches_transformers(pair):
    import torch
    from transformers import AutoModelForCausalLM
    target, draft = pair
    assert target.config.vocab_size == draft.config.vocab_size == 8192
    assert target.tokenizer is not None and draft.tokenizer is not None
    assert target.dtype == jnp.float32
    assert draft.config.num_params() < target.config.num_params() / 4
    prompt = target.tokenizer("def fibonacci(n):\n    ", add_special_tokens=False)["input_ids"]
    for model, d in ((target, default.TARGET_DIR), (draft, default.DRAFT_DIR)):
        ours = _greedy(model, prompt, 16)
        hf = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                              min_new_tokens=16, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              pad_token_id=model.config.pad_token_id)
        assert out[0, len(prompt):].tolist() == ours, d.name
        text = model.tokenizer.decode(ours)
        assert isinstance(text, str) and text
