"""ModelConfig from Hugging Face config.json dictionaries (pure Python, no checkpoints)."""

import pytest

from jaxspec.models import SUPPORTED_FAMILIES, ModelConfig
from jaxspec.models.config import rope_inverse_frequencies

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=96,
            max_position_embeddings=128)


def test_rope_layouts_agree():
    """rope_theta at top level + rope_scaling (old) == everything in rope_parameters (new)."""
    old = ModelConfig.from_hf_dict(dict(BASE, rope_theta=5000.0, rope_scaling=LLAMA3))
    new = ModelConfig.from_hf_dict(dict(BASE, rope_parameters=dict(LLAMA3, rope_theta=5000.0)))
    legacy_scaling = {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}
    old_type_key = ModelConfig.from_hf_dict(dict(BASE, rope_theta=5000.0,
                                                 rope_scaling=legacy_scaling))
    assert old == new == old_type_key
    assert new.rope_theta == 5000.0 and new.head_dim == 24 and new.num_kv_heads == 2
    assert new.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 32)
    default = ModelConfig.from_hf_dict(dict(BASE, rope_parameters=dict(rope_type="default",
                                                                       rope_theta=500.0)))
    assert default.rope_scaling is None and default.rope_theta == 500.0
    # The round trip through to_hf_dict is lossless.
    assert ModelConfig.from_hf_dict(new.to_hf_dict()) == new


def test_llama3_frequencies_are_scaled_in_three_bands():
    config = ModelConfig.from_hf_dict(dict(BASE, rope_parameters=dict(LLAMA3, rope_theta=5000.0)))
    plain = rope_inverse_frequencies(ModelConfig.from_hf_dict(dict(BASE, rope_theta=5000.0)))
    scaled = rope_inverse_frequencies(config)
    ratios = [s / p for s, p in zip(scaled, plain)]
    assert ratios[0] == 1.0 and ratios[-1] == pytest.approx(1 / 8)
    assert any(1 / 8 < r < 1 for r in ratios)  # the smoothed middle band


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError, match=r"unsupported model family 'bert'.*supported: "
                                         r"llama, mistral, qwen2, qwen3, gpt2"):
        ModelConfig.from_hf_dict(dict(BASE, model_type="bert"))
    assert SUPPORTED_FAMILIES == ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3")


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ModelConfig.from_hf_dict(dict(BASE, rope_scaling=dict(rope_type="yarn", factor=2.0)))
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf_dict(dict(BASE, hidden_act="gelu"))
