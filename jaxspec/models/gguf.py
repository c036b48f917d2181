"""GGUF files (llama.cpp's format) through the `gguf` package: config, dequantized tensors, vocab.

`read(path)` turns a GGUF file into what a Hugging Face directory would hold: a config dict
(`config.json`'s keys, built from the `{arch}.*` metadata), tensors under Hugging Face names and
layouts (dequantized to float32, llama.cpp's q/k row permutation undone, Gemma's `norm + 1`
undone) and a `transformers` fast tokenizer built from the `tokenizer.ggml.*` vocabulary with the
file's chat template. `load` builds a jaxspec Model from it with the same checks as `hf.load`
(every tensor present, none extra, every shape as the metadata says), and `convert` writes a
safetensors directory that `transformers` and `js.load` read. No torch, no pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxspec.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",          # gemma3: pre_feedforward_layernorm
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors llama.cpp writes that are not parameters of the Hugging Face model.
_IGNORED = ("rope_freqs.weight",)


def _reader(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # numpy / struct errors on a short or garbled file
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    # A wrong tensor count in the header still parses: too high reads padding as a nameless
    # tensor, too low shifts the data section (every tensor then reads its neighbours' bytes)
    # and leaves the dropped tensors' data after the last one. Writers pad only to the alignment.
    count = len(reader.tensors)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if any(not t.name for t in reader.tensors) or (count and len(reader.data) - end >= reader.alignment):
        raise ValueError(f"{path}: the GGUF header's tensor count ({count}, GGUF.tensor_count) "
                         "does not match its tensor table and data (corrupt file?)")
    return reader


def _field(reader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    value = field.contents()
    return value


def metadata(reader) -> dict[str, Any]:
    """Every metadata key except the large tokenizer arrays (their lengths instead)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "merges", "token_type", "scores"):
            out[key] = len(field.data)
        else:
            out[key] = field.contents()
    return out


def architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} (general.architecture) is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def hf_config(reader) -> dict[str, Any]:
    """The Hugging Face config.json dict this file's metadata describes."""
    arch = architecture(reader)
    key = lambda name, default=...: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("GGUF file has no tensor 'token_embd.weight' (the token embedding)")
    vocab = int(key("vocab_size", 0)) or int(embed.shape[1])
    if tokens is not None and len(tokens.data) > vocab:
        raise ValueError(f"GGUF vocabulary has {len(tokens.data)} tokens (tokenizer.ggml.tokens) but "
                         f"the embedding 'token_embd.weight' has only {vocab} rows")
    eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
    config: dict[str, Any] = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        # llama.cpp's llama converter states head_dim as the rope dimension (key_length is newer).
        "head_dim": (int(key("attention.key_length", 0)) or int(key("rope.dimension_count", 0))
                     or hidden // heads),
        "intermediate_size": int(key("feed_forward_length")),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": eos,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
    }
    if arch == "llama":
        window = key("attention.sliding_window", None)
        if window:  # llama.cpp writes Mistral models as llama with a window
            config.update(model_type="mistral", sliding_window=int(window))
        bias = "blk.0.attn_q.bias" in names
        config.update(attention_bias=bias, mlp_bias="blk.0.ffn_up.bias" in names)
    elif arch == "mistral":
        config["sliding_window"] = key("attention.sliding_window", None)
    elif arch == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    elif arch == "gemma3":
        # Only one rope base and no layer pattern are in the file: the rest are Gemma 3's
        # defaults (transformers' Gemma3TextConfig), as transformers' own GGUF reader assumes.
        config.update(hidden_act="gelu_pytorch_tanh",
                      sliding_window=int(key("attention.sliding_window", 4096)))
    kind = key("rope.scaling.type", None)
    if kind not in (None, "none"):
        if kind != "linear":
            raise ValueError(f"GGUF rope scaling {kind!r} ({arch}.rope.scaling.type) is not "
                             "supported; supported: none, linear")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF tensor 'rope_freqs.weight' (llama3-style rope frequency factors) is "
                         "not supported yet; convert the original Hugging Face checkpoint instead")
    return config


def _hf_name(name: str, arch: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None when unknown)."""
    stem, _, kind = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        sub = parts[2]
        if arch == "gemma3" and sub == "ffn_norm":
            return f"model.layers.{parts[1]}.pre_feedforward_layernorm.{kind}"
        if sub in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[sub]}.{kind}"
    return None


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of a q or k projection [H*Dh, ...].

    llama.cpp's converter reorders each head's rows from the Hugging Face (rotate-half) layout
    [2, Dh/2] to interleaved pairs [Dh/2, 2]; this is the inverse.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute_qk`; used to write test files)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def _dequantize(tensor) -> np.ndarray:
    import gguf

    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    expected = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.asarray(tensor.data).astype(np.float32)
        else:
            data = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor {tensor.name!r} uses quantization type {kind.name}, which "
                         "the gguf package cannot dequantize") from None
    except Exception as e:
        raise ValueError(f"GGUF tensor {tensor.name!r} ({kind.name}) could not be read "
                         f"(truncated file?): {type(e).__name__}: {e}") from None
    if data.size != int(np.prod(expected)):
        raise ValueError(f"GGUF tensor {tensor.name!r} holds {data.size} values but its shape "
                         f"{expected} needs {int(np.prod(expected))} (truncated file?)")
    return np.ascontiguousarray(data.reshape(expected), dtype=np.float32)


def hf_tensors(reader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor under its Hugging Face name and layout ([out, in] weights), float32."""
    arch = _field(reader, "general.architecture")
    declared = _field(reader, "GGUF.tensor_count", None)
    if declared is not None and int(declared) != len(reader.tensors):
        raise ValueError(f"GGUF header declares {declared} tensors but {len(reader.tensors)} "
                         "could be read (truncated file?)")
    out = {}
    for tensor in reader.tensors:
        if tensor.name in _IGNORED:
            continue
        name = _hf_name(tensor.name, arch)
        if name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} is not a known {arch} tensor")
        data = _dequantize(tensor)
        if arch in ("llama", "mistral") and ".attn_q." in tensor.name:
            data = unpermute_qk(data, config["num_attention_heads"])
        elif arch in ("llama", "mistral") and ".attn_k." in tensor.name:
            data = unpermute_qk(data, config["num_key_value_heads"])
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            data = data - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights as 1 + w
        out[name] = data
    return out


def _tokenizer_dict(reader) -> dict[str, Any]:
    """The tokenizer fields under the names transformers' GGUF tokenizer builders expect."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    out = {}
    for suffix, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        field = reader.fields.get(f"tokenizer.{suffix}")
        if field is not None:
            out[name] = field.contents()
    return out


def tokenizer(reader):
    """A transformers fast tokenizer built from the file's vocabulary (None if it has none).

    Uses transformers' GGUF tokenizer conversion (pure `tokenizers`, no torch), so token ids are
    the ones `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives; the chat template and
    the special tokens come from the file's metadata.
    """
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    arch = _field(reader, "general.architecture")
    tok_dict = _tokenizer_dict(reader)
    try:
        backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    except BaseException as e:  # also a `tokenizers` Rust panic (a BaseException) on a bad vocab
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"the GGUF vocabulary (tokenizer.ggml.*, model "
                         f"{tok_dict.get('tokenizer_type')!r}) cannot be built into a tokenizer: "
                         f"{type(e).__name__}: {e}") from None
    tokens = tok_dict["tokens"]
    special = {}
    for name, suffix in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                         ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{suffix}", None)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special[name] = tokens[int(token_id)]
    kwargs = dict(special)
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        kwargs["chat_template"] = template
    for flag in ("add_bos_token", "add_eos_token"):
        value = _field(reader, f"tokenizer.ggml.{flag}", None)
        if value is None and flag == "add_bos_token" and tok_dict.get("tokenizer_type") == "llama":
            value = True  # llama.cpp and transformers add BOS to a sentencepiece vocab that is silent
        if value is not None:
            kwargs[flag] = bool(value)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def find_file(path: str | os.PathLike) -> Path:
    """A .gguf file, or the single .gguf file inside a directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(f"{path} holds {len(found)} .gguf files; pass the file itself"
                             + (f" (one of {', '.join(p.name for p in found)})" if found else ""))
        return found[0]
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    return path


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a .gguf file or a directory holding .gguf files and no config.json."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return True
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def read(path: str | os.PathLike):
    """(HF config dict, HF-named float32 tensors, tokenizer or None) of a GGUF file."""
    file = find_file(path)
    reader = _reader(file)
    config = hf_config(reader)
    tensors = hf_tensors(reader, config)
    return config, tensors, tokenizer(reader)


def load(path: str | os.PathLike, dtype: str = "float32", attn_impl: str = "auto"):
    """A jaxspec Model from a GGUF file (or a directory holding one), dequantized to dtype."""
    from jaxspec.models import hf
    from jaxspec.models.transformer import Model

    if dtype not in hf._DTYPES:
        raise ValueError(f"dtype must be one of {sorted(hf._DTYPES)}, got {dtype!r}")
    hf_dict, tensors, tok = read(path)
    config = ModelConfig.from_hf_dict(hf_dict)
    tensors = _checked(tensors, config)
    params = hf._to_params(tensors, config, hf._DTYPES[dtype])
    return Model(config=config, params=params, tokenizer=tok, attn_impl=attn_impl)


def _checked(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Refuse missing, extra or mis-shaped tensors, naming them by their GGUF names."""
    from jaxspec.models import hf

    expected = hf._expected_tensors(config)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    gguf_name = {v: k for k, v in _reverse_names(config).items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"GGUF file is missing tensor {gguf_name.get(missing[0], missing[0])!r} "
                         f"(Hugging Face {missing[0]!r}) for a {config.family} model"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"GGUF file has unexpected tensor {gguf_name.get(extra[0], extra[0])!r} "
                         f"for a {config.family} model with this metadata")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"GGUF tensor {gguf_name.get(name, name)!r} has shape "
                             f"{tuple(reversed(tensors[name].shape))} (GGUF order), but the "
                             f"metadata implies {tuple(reversed(shape))}")
    return tensors


def _reverse_names(config: ModelConfig) -> dict[str, str]:
    """GGUF name -> HF name for every tensor of this config (error messages)."""
    arch = "gemma3" if config.family.startswith("gemma3") else config.family
    out = {f"{g}.weight": f"{h}.weight" for g, h in _TOP_NAMES.items()}
    for i in range(config.num_layers):
        for g in _LAYER_NAMES:
            for kind in ("weight", "bias"):
                gname = f"blk.{i}.{g}.{kind}"
                hname = _hf_name(gname, arch)
                if hname:
                    out.setdefault(gname, hname)
    return out


def convert(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a GGUF file as a Hugging Face safetensors directory (config, weights, tokenizer)."""
    from jaxspec.models import hf

    model = load(path, dtype=dtype)
    hf.save(model, out_dir)
    return Path(out_dir)
