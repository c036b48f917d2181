"""ModelConfig: the static, hashable description of a decoder-only transformer.

Built from (and written back to) a Hugging Face `config.json` for the llama, mistral, qwen2,
qwen3, gpt2, gemma2 and gemma3 (text: model_type "gemma3_text") families. Everything here is a
Python scalar or tuple so the config can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3")
GEMMA_FAMILIES = ("gemma2", "gemma3")
# config.json model_type -> family ("gemma3" is the multimodal wrapper; its text_config is read).
_MODEL_TYPES = {**{f: f for f in SUPPORTED_FAMILIES}, "gemma3_text": "gemma3"}
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # of the gated MLP (gpt2 always uses gelu_new)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A transformer's architecture: frozen and hashable, so it is static in compiled programs.

    Built from a Hugging Face config.json (`ModelConfig.from_hf_dict`) or GGUF metadata by
    `js.load`; `family` is one of SUPPORTED_FAMILIES (llama, mistral, qwen2, qwen3, gpt2, gemma2,
    gemma3 variants). Two models with equal configs share compiled programs.
    """

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
    sliding_window: int | None = None  # mistral; gemma's sliding layers. Key k is visible from
    #                                    query q when pos_q - pos_k < sliding_window.
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    # Per-layer attention kind, each "sliding_attention" or "full_attention" (gemma2/3); None =
    # every layer alike (windowed iff sliding_window is set).
    layer_types: tuple | None = None
    # Rope base of the sliding layers, which take no rope scaling (gemma3); None = every layer
    # uses rope_theta and rope_scaling.
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5; None = head_dim
    attn_logit_softcap: float | None = None     # scores -> cap * tanh(scores / cap) (gemma2)
    final_logit_softcap: float | None = None    # logits -> cap * tanh(logits / cap) (gemma2/3)
    hidden_act: str | None = None               # gated MLP activation; None = the family's

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable
            if len(self.layer_types) != self.num_layers or any(
                    t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"layer_types must be {self.num_layers} entries of "
                                 f"{' / '.join(LAYER_TYPES)}, got {self.layer_types}")
        if self.hidden_act is not None and self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")

    # -- derived, family-level facts ------------------------------------------------------
    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def is_gemma(self) -> bool:
        """Gemma layout: embeddings x sqrt(hidden), RMSNorm x (1 + w), a norm after attention
        and after the MLP as well as before each."""
        return self.family in GEMMA_FAMILIES

    @property
    def activation(self) -> str:
        """The gated MLP's activation (hidden_act, or the family's default)."""
        if self.hidden_act is not None:
            return self.hidden_act
        return {"gpt2": "gelu_new"}.get(self.family, "gelu_pytorch_tanh" if self.is_gemma else "silu")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> tuple:
        """Per layer: does it attend through the sliding window? [L] bools."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied) = that of `param_shapes`."""
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.q_size * 2 + d * self.kv_size * 2
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = d * f * (2 if self.is_gpt2 else 3) + (f * (1 if self.is_gpt2 else 2) + d) * self.mlp_bias
        norms = (4 if self.is_gemma else 2) * d * (2 if self.is_gpt2 else 1)
        total = l * (attn + mlp + norms) + self.vocab_size * d + d * (2 if self.is_gpt2 else 1)
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        if self.is_gpt2:
            total += self.max_position_embeddings * d
        return total

    # -- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"unsupported model family {model_type!r} (config.json model_type); "
                f"supported: {', '.join(SUPPORTED_FAMILIES)} (gemma3: gemma3_text)")
        family = _MODEL_TYPES[model_type]
        if family in GEMMA_FAMILIES:
            return cls._from_gemma_dict(hf, family)
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
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        return cls(family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 2048),
                   norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                   rope_scaling=_parse_rope_scaling(scaling),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                   qk_norm=family == "qwen3", sliding_window=sliding,
                   hidden_act=None if act == "silu" else act, **common)

    @classmethod
    def _from_gemma_dict(cls, hf: dict[str, Any], family: str) -> "ModelConfig":
        """gemma2 / gemma3_text config.json (or the text_config of a multimodal gemma3), with
        transformers' Gemma2Config / Gemma3TextConfig defaults for absent keys."""
        if hf.get("model_type") == "gemma3":
            text = dict(hf.get("text_config") or {})
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
                if key not in text and key in hf:
                    text[key] = hf[key]
            hf = text
        g3 = family == "gemma3"
        get = lambda key, default: default if hf.get(key) is None else hf[key]  # noqa: E731
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{family} use_bidirectional_attention is not supported")
        act = get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {act!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        layers = get("num_hidden_layers", 26)
        layer_types = hf.get("layer_types")
        if layer_types is None:   # transformers' default patterns: sliding except every n-th
            every = get("sliding_window_pattern", get("_sliding_window_pattern", 6)) if g3 else 2
            layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                           for i in range(layers)]
        rope = hf.get("rope_parameters") or {}
        if g3:
            if "full_attention" in rope or "sliding_attention" in rope:   # transformers >= 5
                full = dict(rope.get("full_attention") or {})
                local = dict(rope.get("sliding_attention") or {})
            else:                                                            # rope_theta & co.
                full = dict(hf.get("rope_scaling") or {})
                local = {}
                if hf.get("rope_local_base_freq") is not None:
                    local["rope_theta"] = hf["rope_local_base_freq"]
            full.setdefault("rope_theta", get("rope_theta", 1_000_000.0))
            local.setdefault("rope_theta", 10_000.0)
            if local.get("rope_type", local.get("type", "default")) != "default":
                raise ValueError("gemma3 rope scaling of the sliding layers is not supported")
            rope_theta, rope_local = float(full["rope_theta"]), float(local["rope_theta"])
            scaling = full
        else:
            rope_theta = float(get("rope_theta", rope.get("rope_theta", 10000.0)))
            rope_local, scaling = None, hf.get("rope_scaling") or rope
        if get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        eos = hf.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        heads = get("num_attention_heads", 8)
        bias = bool(hf.get("attention_bias", False))
        # transformers' Gemma3Attention never applies attn_logit_softcapping (Gemma2's does).
        attn_cap = None if g3 else hf.get("attn_logit_softcapping", 50.0)
        final_cap = hf.get("final_logit_softcapping", None if g3 else 30.0)
        return cls(family=family, vocab_size=get("vocab_size", 262_208 if g3 else 256_000),
                   hidden_size=get("hidden_size", 2304), num_layers=layers, num_heads=heads,
                   num_kv_heads=get("num_key_value_heads", 4), head_dim=get("head_dim", 256),
                   intermediate_size=get("intermediate_size", 9216),
                   max_position_embeddings=get("max_position_embeddings", 131_072 if g3 else 8192),
                   norm_eps=get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
                   rope_scaling=_parse_rope_scaling(scaling),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                   qkv_bias=bias, o_bias=bias, qk_norm=g3,
                   sliding_window=hf.get("sliding_window", 4096),
                   bos_token_id=hf.get("bos_token_id", 2),
                   eos_token_ids=tuple(int(e) for e in eos_ids),
                   pad_token_id=hf.get("pad_token_id", 0), layer_types=tuple(layer_types),
                   rope_local_theta=rope_local,
                   query_pre_attn_scalar=get("query_pre_attn_scalar", 256),
                   attn_logit_softcap=None if attn_cap is None else float(attn_cap),
                   final_logit_softcap=None if final_cap is None else float(final_cap),
                   hidden_act=None if act == "gelu_pytorch_tanh" else act)

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
        if self.is_gemma:
            return self._to_gemma_dict(common)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.family]
        out = dict(model_type=self.family, architectures=[arch], hidden_size=self.hidden_size,
                   num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                   num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                   intermediate_size=self.intermediate_size,
                   max_position_embeddings=self.max_position_embeddings,
                   rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, hidden_act=self.activation,
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

    def _to_gemma_dict(self, common: dict) -> dict[str, Any]:
        """transformers 5 layout (rope_parameters; per layer type for gemma3)."""
        g3 = self.family == "gemma3"
        if self.qkv_bias != self.o_bias or self.mlp_bias or self.qk_norm != g3:
            raise ValueError(f"{self.family} configs take attention_bias on q, k, v and o alike, "
                             "no mlp_bias, and q/k norms exactly for gemma3")
        full = {"rope_type": "default", **(_rope_scaling_dict(self.rope_scaling) or {}),
                "rope_theta": self.rope_theta}
        if g3:
            rope = dict(full_attention=full, sliding_attention=dict(
                rope_type="default", rope_theta=self.rope_local_theta
                if self.rope_local_theta is not None else self.rope_theta))
        else:
            if self.rope_local_theta not in (None, self.rope_theta):
                raise ValueError("gemma2 has one rope base: rope_local_theta must be None")
            rope = full
        scalar = self.query_pre_attn_scalar or self.head_dim
        cap = lambda c: None if c is None else float(c)  # noqa: E731
        return dict(model_type="gemma3_text" if g3 else "gemma2",
                    architectures=["Gemma3ForCausalLM" if g3 else "Gemma2ForCausalLM"],
                    hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                    head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                    max_position_embeddings=self.max_position_embeddings,
                    rms_norm_eps=self.norm_eps, hidden_activation=self.activation,
                    rope_parameters=rope, attention_bias=self.qkv_bias, attention_dropout=0.0,
                    query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                    sliding_window=self.sliding_window,
                    layer_types=list(self.layer_types or (
                        ("sliding_attention" if self.sliding_window is not None
                         else "full_attention",) * self.num_layers)),
                    final_logit_softcapping=cap(self.final_logit_softcap),
                    attn_logit_softcapping=cap(self.attn_logit_softcap),
                    use_bidirectional_attention=False, **common)


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


def rope_inverse_frequencies(config: ModelConfig, sliding: bool = False) -> list[float]:
    """Per-pair inverse frequencies [Dh/2], with linear or llama3 scaling applied.

    sliding=True: those of a sliding-window layer (rope_local_theta, unscaled, when set).
    """
    dim = config.head_dim
    local = sliding and config.rope_local_theta is not None
    base = config.rope_local_theta if local else config.rope_theta
    inv = [1.0 / (base ** (2 * i / dim)) for i in range(dim // 2)]
    scaling = None if local else config.rope_scaling
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
