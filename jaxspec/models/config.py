"""ModelConfig: the static, hashable description of a decoder-only transformer.

Built from (and written back to) a Hugging Face `config.json` for the llama, mistral, qwen2,
qwen3 and gpt2 families. Everything here is a Python scalar or tuple so the config can be a
static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    # or ("linear", factor) or None.
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False           # qwen2, llama attention_bias
    o_bias: bool = False             # llama attention_bias
    mlp_bias: bool = False           # llama mlp_bias
    qk_norm: bool = False            # qwen3
    sliding_window: int | None = None  # mistral
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None

    # -- derived, family-level facts ------------------------------------------------------
    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.q_size * 2 + d * self.kv_size * 2
        mlp = d * f * (2 if self.is_gpt2 else 3)
        total = l * (attn + mlp + 2 * d) + self.vocab_size * d + d
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        if self.is_gpt2:
            total += self.max_position_embeddings * d
        return total

    # -- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        family = hf.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"unsupported model family {family!r} (config.json model_type); "
                f"supported: {', '.join(SUPPORTED_FAMILIES)}")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        common = dict(bos_token_id=hf.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids),
                      pad_token_id=hf.get("pad_token_id"))
        if family == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise ValueError("gpt2 options scale_attn_by_inverse_layer_idx / "
                                 "reorder_and_upcast_attn are not supported")
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"gpt2 activation_function {hf.get('activation_function')!r} "
                                 "is not supported; supported: gelu_new")
            d, heads = hf["n_embd"], hf["n_head"]
            return cls(family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d,
                       num_layers=hf["n_layer"], num_heads=heads, num_kv_heads=heads,
                       head_dim=d // heads, intermediate_size=hf.get("n_inner") or 4 * d,
                       max_position_embeddings=hf["n_positions"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=hf.get("tie_word_embeddings", True),
                       qkv_bias=True, o_bias=True, mlp_bias=True, **common)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        if hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        if family == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        sliding = None
        if family == "mistral" or (family in ("qwen2", "qwen3") and hf.get("use_sliding_window")):
            sliding = hf.get("sliding_window")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported; supported: silu")
        return cls(family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 2048),
                   norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                   rope_scaling=_parse_rope_scaling(scaling),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                   qk_norm=family == "qwen3", sliding_window=sliding, **common)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        eos = list(self.eos_token_ids)
        common = dict(bos_token_id=self.bos_token_id,
                      eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                      pad_token_id=self.pad_token_id, vocab_size=self.vocab_size,
                      tie_word_embeddings=self.tie_word_embeddings)
        if self.is_gpt2:
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                        n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
                        n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                        layer_norm_epsilon=self.norm_eps, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.family]
        out = dict(model_type=self.family, architectures=[arch], hidden_size=self.hidden_size,
                   num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                   num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                   intermediate_size=self.intermediate_size,
                   max_position_embeddings=self.max_position_embeddings,
                   rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, hidden_act="silu",
                   rope_scaling=_rope_scaling_dict(self.rope_scaling), **common)
        if self.family == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.family == "mistral":
            out.update(sliding_window=self.sliding_window)
        if self.family in ("qwen2", "qwen3"):
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window)
        if self.family == "qwen3":
            out.update(attention_bias=self.qkv_bias)
        return out


def _parse_rope_scaling(scaling: dict | None) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        return ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    if kind == "linear":
        return ("linear", float(scaling["factor"]))
    raise ValueError(f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


def _rope_scaling_dict(scaling: tuple | None) -> dict | None:
    if scaling is None:
        return None
    if scaling[0] == "llama3":
        return dict(rope_type="llama3", factor=scaling[1], low_freq_factor=scaling[2],
                    high_freq_factor=scaling[3], original_max_position_embeddings=scaling[4])
    return dict(rope_type="linear", factor=scaling[1])


def rope_inverse_frequencies(config: ModelConfig) -> list[float]:
    """Per-pair inverse frequencies [Dh/2], with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    if scaling[0] == "linear":
        return [f / scaling[1] for f in inv]
    _, factor, low, high, original = scaling
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
