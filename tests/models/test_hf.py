"""Hugging Face checkpoint directories: save / load round trips and refusals."""

import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxspec as js

VOCAB = 128  # the vocabulary of every conftest checkpoint

IDS = [5, 17, 99, 3, 64, 64, 120, 0, 41]


def _assert_same_params(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_save_loads_in_transformers_with_same_logits(checkpoint, tmp_path):
    js.save(checkpoint.model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(logits, checkpoint.hf_logits(IDS), atol=1e-6, rtol=0)


def test_save_load_round_trip_is_identical(checkpoint, tmp_path):
    js.save(checkpoint.model, tmp_path)
    again = js.load(tmp_path)
    assert again.config == checkpoint.model.config
    _assert_same_params(again.params, checkpoint.model.params)


def test_bfloat16_save_loads(checkpoints, tmp_path):
    ckpt = checkpoints["llama"]
    model = js.load(ckpt.path, dtype="bfloat16")
    assert model.dtype == jax.numpy.bfloat16
    js.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == ml_dtypes.bfloat16
               for v in load_file(tmp_path / "model.safetensors").values())
    _assert_same_params(js.load(tmp_path, dtype="bfloat16").params, model.params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert next(hf.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        logits = hf(torch.tensor([IDS])).logits[0].float().numpy()
    assert logits.shape == (len(IDS), VOCAB)
    np.testing.assert_allclose(logits, ckpt.hf_logits(IDS), atol=0.1, rtol=0)


# -- refusals --------------------------------------------------------------------------------

@pytest.fixture
def llama_copy(checkpoints, tmp_path):
    path = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"].path, path)
    return path


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_refuses_missing_tensor(llama_copy):
    _edit_tensors(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        js.load(llama_copy)


def test_refuses_extra_tensor(llama_copy):
    _edit_tensors(llama_copy, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight",
                                                      np.zeros((4, 4), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra"
                                         r"\.weight' for a llama config"):
        js.load(llama_copy)


def test_refuses_misshaped_tensor(llama_copy):
    name = "model.layers.0.self_attn.k_proj.weight"   # [Hkv * Dh, D] = [48, 64]
    _edit_tensors(llama_copy, lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)))
    with pytest.raises(ValueError, match=rf"tensor '{name}' in model\.safetensors has shape "
                                         r"\(32, 64\), expected \(48, 64\) from config\.json"):
        js.load(llama_copy)


def test_refuses_directory_without_config(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json: expected a Hugging Face model directory"):
        js.load(llama_copy)


def test_refuses_unknown_family(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "falcon"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model family 'falcon'.*"
                                         r"supported: llama, mistral, qwen2, qwen3, gpt2"):
        js.load(llama_copy)


def test_refuses_pickle_only_directory(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"not read: jaxspec never unpickles")
    with pytest.raises(ValueError, match=r"pickle-based weights.*safetensors only"):
        js.load(llama_copy)


def test_refuses_unknown_dtype(checkpoints):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', "
                                         r"'float32'\], got 'int8'"):
        js.load(checkpoints["llama"].path, dtype="int8")


def test_refuses_truncated_safetensors_naming_the_file(checkpoints, tmp_path):
    js.save(checkpoints["llama"].model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    message = re.escape(str(weights)) + r" is truncated or corrupt: it cannot be read as safetensors"
    with pytest.raises(ValueError, match=message):
        js.load(tmp_path)
    with pytest.raises(ValueError, match=message):  # the sharded reader too
        js.load(tmp_path, mesh=js.make_mesh(1, 1))


def test_refuses_corrupt_config_naming_the_file_and_position(llama_copy):
    config = llama_copy / "config.json"
    text = config.read_text()
    config.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(str(config)) + r" is not valid JSON: .* at "
                                         r"line \d+ column \d+ \(char \d+\); the file is corrupt"):
        js.load(llama_copy)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(config)) + " must hold a JSON object"):
        js.load(llama_copy)


def test_tokenizer_is_saved_and_loaded(checkpoints, word_tokenizer, tmp_path):
    model = checkpoints["gpt2"].model.replace(tokenizer=word_tokenizer)
    js.save(model, tmp_path)
    again = js.load(tmp_path)
    assert again.tokenizer is not None
    assert again.tokenizer("w5 w7 w100")["input_ids"] == [5, 7, 100]
    assert checkpoints["gpt2"].model.tokenizer is None  # no tokenizer files, no tokenizer
