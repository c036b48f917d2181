"""Gemma 3 (text) end to end against Hugging Face transformers, on tiny random checkpoints.

The target is a 4-layer `Gemma3TextConfig` (layer_types sliding, sliding, full, sliding from
`sliding_window_pattern=3`; window 5, shorter than the prompts; head_dim 32 != hidden / heads;
query_pre_attn_scalar 20 != head_dim; linear rope scaling on the global layer and a different
rope base on the local ones; final logit soft-capping), created and saved with transformers.
Its draft is a second Gemma 3 checkpoint: the target's first two layers (a layer-skip draft,
so that it agrees with the target part of the time). Checked: config parsing and round trip,
prefill / step-by-step decode logits (1e-4), greedy generation vs HF `generate` per row, chain
(draft model, prompt lookup) and tree speculation vs the target's own greedy output, and
`js.save` -> transformers. The 2-layer gemma2 / gemma3 checkpoints of tests/conftest.py run
through test_parity, test_hf and test_generate as well.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jaxspec as js
from jaxspec.models import commit
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward_train, num_params, unstack_layers

VOCAB = 128
ATOL = 1e-4
NEW = 32
PROMPT_LENGTHS = (14, 9, 3)
PADDED = 16
DECODE_STEPS = 6
CACHE_LEN = 24
SLIDING_WINDOW = 5

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
               query_pre_attn_scalar=20, sliding_window=SLIDING_WINDOW,
               final_logit_softcapping=0.5, eos_token_id=None, bos_token_id=None,
               pad_token_id=None)
_ROPE = dict(full_attention=dict(rope_type="linear", factor=2.0, rope_theta=20000.0),
             sliding_attention=dict(rope_type="default", rope_theta=1000.0))
_rng = np.random.default_rng(5)
PROMPTS = [_rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENGTHS]
CONTINUATIONS = _rng.integers(0, VOCAB, (len(PROMPTS), DECODE_STEPS))

_forward = jax.jit(js.forward)


def _target_config():
    return tf.Gemma3TextConfig(num_hidden_layers=4, sliding_window_pattern=3,
                               rope_parameters=json.loads(json.dumps(_ROPE)), **_COMMON)


def _reference(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                   attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(HF target, js target, HF draft dir, js draft, target dir)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = _target_config()
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                                  "sliding_attention"]
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # norm weights away from their 0 init (the norm scales by 1 + w)
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    root = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(root / "target", safe_serialization=True)

    draft_config = tf.Gemma3TextConfig(num_hidden_layers=2, layer_types=config.layer_types[:2],
                                       rope_parameters=json.loads(json.dumps(_ROPE)), **_COMMON)
    draft = tf.AutoModelForCausalLM.from_config(draft_config, dtype=torch.float32)
    missing, _ = draft.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    draft.save_pretrained(root / "draft", safe_serialization=True)
    return (_reference(root / "target"), js.load(root / "target"), js.load(root / "draft"),
            root / "target")


def _hf_logits(hf, ids):
    with torch.inference_mode():
        return hf(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()


def _hf_greedy(hf, prompt, new=NEW):
    # An explicit attention mask: without one, generate masks every prompt token equal to
    # pad_token_id (and PROMPTS hold a 0).
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          num_beams=1, max_new_tokens=new, min_new_tokens=new,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# -- config -----------------------------------------------------------------------------------

def test_config_fields_and_round_trip(gemma):
    hf, model, _, path = gemma
    c = model.config
    assert c.family == "gemma3" and c.num_layers == 4 and c.head_dim == 32
    assert c.layer_types == ("sliding_attention", "sliding_attention", "full_attention",
                             "sliding_attention")
    assert c.sliding_layers == (True, True, False, True) and c.sliding_window == SLIDING_WINDOW
    assert c.rope_theta == 20000.0 and c.rope_scaling == ("linear", 2.0)
    assert c.rope_local_theta == 1000.0 and c.query_pre_attn_scalar == 20
    assert c.attn_scale == 20 ** -0.5 and c.final_logit_softcap == 0.5
    assert c.attn_logit_softcap is None and c.activation == "gelu_pytorch_tanh"
    assert c.qk_norm and c.tie_word_embeddings and c.is_gemma
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    # num_params counts exactly the parameter tree, and what transformers counts.
    assert c.num_params() == num_params(model.params) == hf.num_parameters()

    # The pre-transformers-5 layout (gemma-3-270m's config.json): top-level rope_theta,
    # rope_local_base_freq, rope_scaling, sliding_window_pattern and no layer_types.
    hf_dict = json.loads((path / "config.json").read_text())
    legacy = {k: v for k, v in hf_dict.items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=20000.0, rope_local_base_freq=1000.0, sliding_window_pattern=3,
                  rope_scaling=dict(rope_type="linear", factor=2.0))
    assert ModelConfig.from_hf_dict(legacy) == c
    # The multimodal wrapper (model_type gemma3): its text_config.
    wrapper = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                   text_config=dict(hf_dict, model_type="gemma3_text"), vision_config={})
    assert ModelConfig.from_hf_dict(wrapper) == c


def test_gemma_config_defaults_and_refusals():
    """Absent keys take transformers' defaults: 270M-like gemma3_text, gemma2's soft-caps."""
    g3 = ModelConfig.from_hf_dict(dict(model_type="gemma3_text", vocab_size=262144,
                                       hidden_size=640, intermediate_size=2048,
                                       num_hidden_layers=18, num_attention_heads=4,
                                       num_key_value_heads=1, sliding_window=512))
    assert g3.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 3
    assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling) == (1e6, 1e4, None)
    assert g3.head_dim == 256 and g3.query_pre_attn_scalar == 256 and g3.final_logit_softcap is None
    assert g3.num_params() == 268_098_176          # google/gemma-3-270m
    g2 = ModelConfig.from_hf_dict(dict(model_type="gemma2", vocab_size=128, hidden_size=64,
                                       intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16))
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (50.0, 30.0)
    assert g2.rope_local_theta is None and not g2.qk_norm
    assert ModelConfig.from_hf_dict(g2.to_hf_dict()) == g2
    with pytest.raises(ValueError, match="use_bidirectional_attention is not supported"):
        ModelConfig.from_hf_dict(dict(model_type="gemma3_text", use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="hidden_activation 'gelu' is not supported"):
        ModelConfig.from_hf_dict(dict(model_type="gemma3_text", hidden_activation="gelu"))
    with pytest.raises(ValueError, match="layer_types must be 2 entries"):
        ModelConfig(family="gemma3", vocab_size=8, hidden_size=8, num_layers=2, num_heads=1,
                    num_kv_heads=1, head_dim=8, intermediate_size=8, max_position_embeddings=8,
                    layer_types=("sliding_attention",))


# -- logits -----------------------------------------------------------------------------------

def test_prefill_and_decode_logits_match_transformers(gemma):
    hf, model, _, _ = gemma
    batch = len(PROMPTS)
    tokens = np.zeros((batch, PADDED), np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    positions = jnp.broadcast_to(jnp.arange(PADDED, dtype=jnp.int32), (batch, PADDED))
    references = [_hf_logits(hf, p + CONTINUATIONS[b].tolist()) for b, p in enumerate(PROMPTS)]

    cache = js.KVCache.create(model.config, batch, CACHE_LEN)
    logits, hidden, cache = _forward(model, jnp.asarray(tokens), cache, positions)
    assert hidden.shape == (batch, PADDED, 64)
    for b, n in enumerate(PROMPT_LENGTHS):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), references[b][:n], atol=ATOL,
                                   rtol=0, err_msg=f"prefill row {b}")
    cache = commit(cache, jnp.asarray(PROMPT_LENGTHS, jnp.int32))
    for step in range(DECODE_STEPS):
        token = jnp.asarray(CONTINUATIONS[:, step:step + 1], jnp.int32)      # [B, 1]
        logits, _, cache = _forward(model, token, cache, cache.lengths[:, None])
        cache = commit(cache, jnp.ones((batch,), jnp.int32))
        for b, n in enumerate(PROMPT_LENGTHS):
            np.testing.assert_allclose(np.asarray(logits[b, 0]), references[b][n + step],
                                       atol=ATOL, rtol=0, err_msg=f"decode step {step} row {b}")

    # The unrolled layer loop (static layer kinds) and the training forward agree.
    unstacked = model.replace(params=unstack_layers(model.params))
    logits_u, _, _ = _forward(unstacked, jnp.asarray(tokens), js.KVCache.create(
        model.config, batch, CACHE_LEN), positions)
    full = jnp.asarray(tokens[:1, :PROMPT_LENGTHS[0]])
    logits_t, _ = jax.jit(forward_train, static_argnums=1)(model.params, model.config, full)
    for b, n in enumerate(PROMPT_LENGTHS):
        np.testing.assert_allclose(np.asarray(logits_u[b, :n]), references[b][:n], atol=ATOL,
                                   rtol=0, err_msg=f"unstacked row {b}")
    np.testing.assert_allclose(np.asarray(logits_t[0]), references[0][:PROMPT_LENGTHS[0]],
                               atol=ATOL, rtol=0, err_msg="forward_train")


def test_window_rope_bases_and_softcap_each_matter(gemma):
    """Guard: dropping any one Gemma 3 feature moves the logits far beyond ATOL."""
    hf, model, _, _ = gemma
    ids = PROMPTS[0] + CONTINUATIONS[0].tolist()
    reference = _hf_logits(hf, ids)
    c = model.config
    variants = dict(no_window=c.__class__(**{**c.__dict__, "sliding_window": None}),
                    one_rope_base=c.__class__(**{**c.__dict__, "rope_local_theta": None}),
                    head_dim_scale=c.__class__(**{**c.__dict__, "query_pre_attn_scalar": None}),
                    no_softcap=c.__class__(**{**c.__dict__, "final_logit_softcap": None}))
    for name, config in variants.items():
        logits, _ = forward_train(model.params, config, jnp.asarray([ids], jnp.int32))
        assert np.abs(np.asarray(logits[0]) - reference).max() > 100 * ATOL, name


def test_gemma2_training_forward_matches_transformers(checkpoints):
    """gemma2 (attention soft-cap, untied head) through the cache-free forward."""
    ckpt = checkpoints["gemma2"]
    assert ckpt.model.config.attn_logit_softcap == 0.5
    ids = np.random.default_rng(8).integers(0, VOCAB, (1, 10))
    logits, _ = forward_train(ckpt.model.params, ckpt.model.config, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[0]), ckpt.hf_logits(ids[0].tolist()),
                               atol=ATOL, rtol=0)


# -- generation -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy(gemma):
    out = js.generate(gemma[1], PROMPTS, max_new_tokens=NEW)
    assert out.tokens.shape == (len(PROMPTS), NEW)
    np.testing.assert_array_equal(out.lengths, [NEW] * len(PROMPTS))
    return out


def test_greedy_matches_transformers_generate(gemma, greedy):
    hf = gemma[0]
    for b, prompt in enumerate(PROMPTS):   # HF per row: no left padding to reconcile
        assert greedy.tokens[b].tolist() == _hf_greedy(hf, prompt), f"row {b}"
    assert len(set(greedy.tokens.ravel().tolist())) > 10   # not a degenerate repetition


@pytest.mark.parametrize("kind", ["draft_chain", "prompt_lookup", "draft_tree"])
def test_speculation_reproduces_greedy(gemma, greedy, kind):
    _, target, draft, _ = gemma
    drafter = {"draft_chain": lambda: js.DraftModel(draft, num_tokens=4),
               "prompt_lookup": lambda: js.PromptLookup(ngram=2, num_tokens=4),
               "draft_tree": lambda: js.DraftModel(draft, tree=js.trees.kary(2, 3))}[kind]()
    out = js.generate(target, PROMPTS, max_new_tokens=NEW, drafter=drafter)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)
    assert sum(out.stats["accepted"]) > 0          # drafts were accepted, not only corrected
    assert max(out.stats["target_steps"]) < NEW


# -- save -------------------------------------------------------------------------------------

def test_save_loads_in_transformers_with_same_logits(gemma, tmp_path):
    hf, model, _, _ = gemma
    js.save(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text" and saved["architectures"] == ["Gemma3ForCausalLM"]
    again = _reference(tmp_path)
    assert again.config.layer_types == hf.config.layer_types
    ids = PROMPTS[0] + CONTINUATIONS[0].tolist()
    np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(hf, ids), atol=1e-6, rtol=0)
    reloaded = js.load(tmp_path)
    assert reloaded.config == model.config
    for a, b in zip(jax.tree_util.tree_leaves(reloaded.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
