"""GGUF files: jaxspec's reader against transformers' own GGUF loading, on tiny files written here.

Every file is written with `gguf.GGUFWriter` the way llama.cpp's `convert_hf_to_gguf.py` writes
one, from a tiny random Hugging Face model: its metadata keys (`{arch}.block_count`, ...), its
tensor names (`token_embd`, `blk.N.attn_q`, ...), q/k rows permuted for llama (llama.cpp's
`permute`, copied below), Gemma's norm weights stored as 1 + w, 1-D tensors in F32 and the
matrices in F16 / Q8_0 (quantized by `gguf.quants`) or Q4_K. `gguf.quants` cannot quantize Q4_K
in numpy, so the Q4_K tensors are random but valid Q4_K blocks written byte by byte, and their
values are checked against a reference dequantizer written here from ggml's
`dequantize_row_q4_K`.

The reference is `transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` on the
same file (prefill logits and step-by-step decode logits within 1e-4, float32); F32 files are also
checked against the original Hugging Face model they were written from.
"""

from __future__ import annotations

import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxspec as js  # noqa: E402
from jaxspec.models import commit  # noqa: E402
from jaxspec.models import gguf as jgguf  # noqa: E402
from jaxspec.models.config import SUPPORTED_FAMILIES  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = 128
MAX_POSITIONS = 128
ATOL = 1e-4
PROMPT = [5, 17, 99, 3, 64, 64, 120, 0, 41, 7, 7, 88]
DECODE = [12, 101, 33, 64, 2]
FAMILIES = ("llama", "qwen2", "gemma3")
ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}

needs_gemma3 = pytest.mark.skipif("gemma3" not in SUPPORTED_FAMILIES,
                                  reason="the Gemma 3 family is not in jaxspec yet")


def _families():
    return [pytest.param(f, marks=needs_gemma3) if f == "gemma3" else f for f in FAMILIES]


# -- llama.cpp's conventions, written out independently of jaxspec ----------------------------

def llamacpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim (numpy instead of torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_LAYER_PLAIN = {"post_attention_layernorm": "ffn_norm"}          # llama, qwen2
_HF_TO_GGUF_LAYER_GEMMA = {"post_attention_layernorm": "post_attention_norm",
                           "pre_feedforward_layernorm": "ffn_norm",
                           "post_feedforward_layernorm": "post_ffw_norm"}
_HF_TO_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                   "lm_head": "output"}


def gguf_name(hf_name: str, family: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in _HF_TO_GGUF_TOP:
        return f"{_HF_TO_GGUF_TOP[stem]}.{kind}"
    _, _, i, sub = stem.split(".", 3)
    table = {**_HF_TO_GGUF_LAYER,
             **(_HF_TO_GGUF_LAYER_GEMMA if family == "gemma3" else _HF_TO_GGUF_LAYER_PLAIN)}
    return f"blk.{i}.{table[sub]}.{kind}"


def q4_k_random(rows: int, cols: int, rng) -> np.ndarray:
    """Random valid Q4_K blocks [rows, cols / 256 * 144] (d, dmin f16; 12 scale bytes; 128 qs)."""
    blocks = rows * cols // 256
    raw = rng.integers(0, 256, (blocks, 144), dtype=np.uint8)
    scales = np.stack([rng.uniform(2e-4, 6e-4, blocks), rng.uniform(1e-4, 4e-4, blocks)], 1)
    raw[:, :4] = scales.astype("<f2").view(np.uint8).reshape(blocks, 4)
    return raw.reshape(rows, cols // 256 * 144)


def q4_k_reference(raw: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q4_K, block by block (float32)."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, 144)
    out = np.empty((len(blocks), 256), np.float32)
    for b, block in enumerate(blocks):
        d, dmin = (float(v) for v in block[:4].view("<f2"))
        sc_bytes, qs = block[4:16].astype(np.int64), block[16:]

        def scale_min(j):
            if j < 4:
                return sc_bytes[j] & 63, sc_bytes[j + 4] & 63
            return ((sc_bytes[j + 4] & 0xF) | ((sc_bytes[j - 4] >> 6) << 4),
                    (sc_bytes[j + 4] >> 4) | ((sc_bytes[j] >> 6) << 4))

        y = []
        for chunk in range(4):
            q = qs[chunk * 32:(chunk + 1) * 32]
            sc1, m1 = scale_min(2 * chunk)
            sc2, m2 = scale_min(2 * chunk + 1)
            y.append(np.float32(d * sc1) * (q & 0xF).astype(np.float32) - np.float32(dmin * m1))
            y.append(np.float32(d * sc2) * (q >> 4).astype(np.float32) - np.float32(dmin * m2))
        out[b] = np.concatenate(y)
    return out.reshape(rows, -1)


# -- tiny Hugging Face models and the GGUF files written from them ----------------------------

def _hf_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, max_position_embeddings=MAX_POSITIONS,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "llama":   # untied, rope base 5000
        return tf.LlamaConfig(num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                              rope_parameters=dict(rope_type="default", rope_theta=5000.0), **common)
    if family == "qwen2":   # tied, q/k/v biases
        return tf.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True,
                              use_sliding_window=False, **common)
    if family == "gemma3":  # Gemma3TextConfig defaults GGUF cannot state: 5 sliding + 1 global
        return tf.Gemma3TextConfig(num_hidden_layers=6, head_dim=32, sliding_window=4, **common)
    raise KeyError(family)


def _hf_model(family: str):
    import transformers as tf

    torch.manual_seed(FAMILIES.index(family))
    model = tf.AutoModelForCausalLM.from_config(_hf_config(family), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(50 + FAMILIES.index(family))
    with torch.no_grad():   # biases and norm scales away from their 0 / 1 init
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _rope_theta(cfg) -> float:
    rope = cfg.rope_parameters
    if "full_attention" in rope:
        rope = rope["full_attention"]
    return float(rope["rope_theta"])


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(VOCAB - 1)] + ["ab"]   # and one merge: "a b" -> "ab"


def _metadata(family: str, cfg) -> list[tuple[str, str, object]]:
    """(kind, key, value) as llama.cpp's converter writes them for this config."""
    arch = ARCH[family]
    meta = [("str", "general.name", f"tiny-{family}"),
            ("u32", f"{arch}.context_length", cfg.max_position_embeddings),
            ("u32", f"{arch}.embedding_length", cfg.hidden_size),
            ("u32", f"{arch}.feed_forward_length", cfg.intermediate_size),
            ("u32", f"{arch}.block_count", cfg.num_hidden_layers),
            ("u32", f"{arch}.attention.head_count", cfg.num_attention_heads),
            ("u32", f"{arch}.attention.head_count_kv", cfg.num_key_value_heads),
            ("f32", f"{arch}.rope.freq_base", _rope_theta(cfg)),
            ("f32", f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)]
    if family == "llama":
        meta += [("u32", "llama.vocab_size", cfg.vocab_size),
                 ("u32", "llama.rope.dimension_count",
                  getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)]
    if family == "gemma3":
        meta += [("u32", "gemma3.attention.key_length", cfg.head_dim),
                 ("u32", "gemma3.attention.value_length", cfg.head_dim),
                 ("u32", "gemma3.attention.sliding_window", cfg.sliding_window)]
    # A byte-level vocabulary (what real files carry; transformers takes vocab_size from it).
    meta += [("str", "tokenizer.ggml.model", "gpt2"),
             ("strs", "tokenizer.ggml.tokens", _byte_tokens()),
             ("i32s", "tokenizer.ggml.token_type", [1] * VOCAB),
             ("strs", "tokenizer.ggml.merges", ["a b"])]
    return meta


def _default_qtype(name: str, array: np.ndarray, quantized: bool):
    if array.ndim == 1 or not quantized:
        return Q.F32
    if ".ffn_down." in name:
        return Q.Q4_K
    if ".attn_v." in name or name == "token_embd.weight":
        return Q.F16
    if ".attn_output." in name:
        return Q.F32
    return Q.Q8_0


def gguf_arrays(family: str, model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in GGUF layout) for every parameter, as llama.cpp writes them."""
    cfg = model.config
    out = []
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = p.detach().float().numpy().copy()
        g = gguf_name(name, family)
        if family == "llama" and ".attn_q." in g:
            x = llamacpp_permute(x, cfg.num_attention_heads, cfg.num_attention_heads)
        elif family == "llama" and ".attn_k." in g:
            x = llamacpp_permute(x, cfg.num_attention_heads, cfg.num_key_value_heads)
        if family == "gemma3" and g.endswith("norm.weight"):
            x = x + 1.0
        out.append((g, x))
    return out


def write_gguf(path, arch: str, metadata, arrays, qtype=None, rng=None) -> dict[str, np.ndarray]:
    """Write a GGUF file; returns the values of the Q4_K tensors (random blocks) by GGUF name."""
    rng = np.random.default_rng(0) if rng is None else rng
    qtype = qtype or (lambda name, x: Q.F32)
    writer = gguf.GGUFWriter(str(path), arch)
    for kind, key, value in metadata:
        {"str": writer.add_string, "u32": writer.add_uint32, "f32": writer.add_float32,
         "strs": lambda k, v: writer.add_array(k, v),
         "i32s": lambda k, v: writer.add_array(k, v)}[kind](key, value)
    q4k = {}
    for name, x in arrays:
        kind = qtype(name, x)
        if kind == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(x, np.float32))
        elif kind == Q.F16:
            writer.add_tensor(name, np.ascontiguousarray(x, np.float16))
        elif kind == Q.Q4_K:
            raw = q4_k_random(x.shape[0], x.shape[1], rng)
            q4k[name] = q4_k_reference(raw)
            writer.add_tensor(name, raw, raw_dtype=Q.Q4_K)
        else:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x, np.float32), kind),
                              raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return q4k


class GGUFCase:
    """A family's F32 and mixed-quantization files, the HF model they came from, references."""

    def __init__(self, family: str, root):
        self.family = family
        self.hf = _hf_model(family)
        self.dir = root / family
        self.dir.mkdir()
        (self.dir / "f32").mkdir()
        meta = _metadata(family, self.hf.config)
        arrays = gguf_arrays(family, self.hf)
        self.f32_file = self.dir / "f32" / f"tiny-{family}-f32.gguf"
        write_gguf(self.f32_file, ARCH[family], meta, arrays)
        self.file = self.dir / f"tiny-{family}-mixed.gguf"
        self.qtypes = {n: _default_qtype(n, x, True) for n, x in arrays}
        self.q4k = write_gguf(self.file, ARCH[family], meta, arrays,
                              qtype=lambda n, x: self.qtypes[n],
                              rng=np.random.default_rng(FAMILIES.index(family)))
        self._tf_gguf = None

    @property
    def tf_gguf(self):
        """transformers' own model from the mixed file (its GGUF loader)."""
        if self._tf_gguf is None:
            self._tf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
                self.dir, gguf_file=self.file.name, dtype=torch.float32,
                attn_implementation="eager").eval()
        return self._tf_gguf


def torch_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf")
    built = {}

    def get(family):
        if family not in built:
            built[family] = GGUFCase(family, root)
        return built[family]
    return get


_forward = jax.jit(js.forward)


def jaxspec_logits(model, prompt, decode) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits [T, V], step-by-step decode logits [S, V]) through js.forward + commit."""
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    cache = js.KVCache.create(model.config, 1, 32)
    logits, _, cache = _forward(model, tokens, cache, positions)
    prefill = np.asarray(logits[0])
    cache = commit(cache, jnp.asarray([len(prompt)], jnp.int32))
    steps = [np.zeros((0, model.config.vocab_size), np.float32)]
    for t in decode:
        logits, _, cache = _forward(model, jnp.asarray([[t]], jnp.int32), cache,
                                    cache.lengths[:, None])
        cache = commit(cache, jnp.ones((1,), jnp.int32))
        steps.append(np.asarray(logits[0, :1]))
    return prefill, np.concatenate(steps)


# -- parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", _families())
def test_quantized_file_matches_transformers_gguf_loading(cases, family):
    """Mixed F32/F16/Q8_0/Q4_K file: prefill + decode logits = transformers' GGUF model's."""
    case = cases(family)
    used = set(case.qtypes.values())
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_K} <= used, used
    model = js.load(case.file)
    assert model.config.family == family and model.config.vocab_size == VOCAB
    reference = torch_logits(case.tf_gguf, PROMPT + DECODE)
    prefill, steps = jaxspec_logits(model, PROMPT, DECODE)
    np.testing.assert_allclose(prefill, reference[:len(PROMPT)], atol=ATOL, rtol=0,
                               err_msg=f"{family} prefill")
    np.testing.assert_allclose(steps, reference[len(PROMPT):], atol=ATOL, rtol=0,
                               err_msg=f"{family} decode")
    # The Q4_K tensors hold what ggml's own dequantizer makes of the blocks.
    _, tensors, _ = jgguf.read(case.file)
    for i in range(model.config.num_layers):
        np.testing.assert_allclose(tensors[f"model.layers.{i}.mlp.down_proj.weight"],
                                   case.q4k[f"blk.{i}.ffn_down.weight"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", _families())
def test_f32_file_matches_the_original_model(cases, family):
    """The permutation and the norm shift are undone: same logits as the model the file came from."""
    case = cases(family)
    model = js.load(case.f32_file)
    prefill, _ = jaxspec_logits(model, PROMPT, [])
    np.testing.assert_allclose(prefill, torch_logits(case.hf, PROMPT), atol=ATOL, rtol=0)


def test_llama_head_dim_from_rope_dimension_count(tmp_path):
    """head_dim != hidden / heads, stated only as llama.rope.dimension_count (no key_length)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(7)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    meta = _metadata("llama", hf.config)
    assert not any(key.endswith("key_length") for _, key, _ in meta)
    write_gguf(tmp_path / "hd.gguf", "llama", meta, gguf_arrays("llama", hf))
    model = js.load(tmp_path / "hd.gguf")
    assert model.config.head_dim == 24
    prefill, _ = jaxspec_logits(model, PROMPT, [])
    np.testing.assert_allclose(prefill, torch_logits(hf, PROMPT), atol=ATOL, rtol=0)


def test_config_from_metadata(cases):
    config = js.load(cases("llama").file).config
    hf = cases("llama").hf.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.intermediate_size, config.max_position_embeddings) == (
        2, 64, 4, 2, 16, 256, MAX_POSITIONS)
    assert config.rope_theta == pytest.approx(5000.0)
    assert config.norm_eps == pytest.approx(hf.rms_norm_eps)
    assert not config.tie_word_embeddings
    assert js.load(cases("qwen2").file).config.tie_word_embeddings


def test_tokenizer_matches_transformers_gguf_tokenizer(cases):
    case = cases("qwen2")
    ours = js.load(case.file).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(case.dir, gguf_file=case.file.name)
    for text in ("hello world", "x = 1 + 2\n", "abc!"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text


def _sentencepiece_file(path, arch: str, add_bos):
    """A llama-type (sentencepiece) vocabulary, as llama.cpp writes Llama 2 / Gemma files."""
    pieces = ["▁", "▁h", "▁he", "▁hello", "e", "l", "o", "h", "w", "r", "d", "▁w", "▁world", "t"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_array("tokenizer.ggml.token_type", [2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    if add_bos is not None:
        writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("add_bos", [None, False, True])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, add_bos):
    """A file that does not say add_bos_token gets BOS, as in llama.cpp and transformers."""
    _sentencepiece_file(tmp_path / "sp.gguf", "llama", add_bos)
    ours = jgguf.tokenizer(gguf.GGUFReader(str(tmp_path / "sp.gguf")))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    for text in ("hello world", " the  world\n"):
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert (ids[0] == 1) == (add_bos is not False)
        assert ours.decode(ids) == theirs.decode(ids)


def test_refuses_broken_vocabulary(cases, tmp_path):
    """A merge whose result is not a token makes `tokenizers` panic: a ValueError instead."""
    case = cases("llama")
    path = _rewrite(case, tmp_path / "bad-vocab.gguf", edit_meta=lambda meta: [
        (k, key, ["Ġ t"] if key == "tokenizer.ggml.merges" else v) for k, key, v in meta])
    with pytest.raises(ValueError, match=r"GGUF vocabulary \(tokenizer\.ggml\.\*, model 'gpt2'\)"):
        js.load(path)


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, head_dim, cols", [(4, 4, 16, 8), (4, 2, 8, 3), (9, 3, 64, 5)])
def test_permute_and_unpermute_are_inverse(heads, kv_heads, head_dim, cols):
    rng = np.random.default_rng(heads)
    for n in (heads, kv_heads):
        w = rng.standard_normal((n * head_dim, cols)).astype(np.float32)
        permuted = jgguf.permute_qk(w, n)
        np.testing.assert_array_equal(permuted, llamacpp_permute(w, heads, n))
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(jgguf.unpermute_qk(permuted, n), w)
        np.testing.assert_array_equal(jgguf.permute_qk(jgguf.unpermute_qk(w, n), n), w)
        bias = rng.standard_normal(n * head_dim).astype(np.float32)   # 1-D (q/k biases)
        np.testing.assert_array_equal(jgguf.unpermute_qk(llamacpp_permute(bias, heads, n), n), bias)


def test_convert_writes_a_directory_transformers_loads(cases, tmp_path, capsys):
    from jaxspec.cli import main

    case = cases("llama")
    out = tmp_path / "converted"
    assert main(["convert", str(case.file), str(out)]) == 0, capsys.readouterr().err
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = PROMPT + DECODE
    np.testing.assert_allclose(torch_logits(hf, ids), torch_logits(case.tf_gguf, ids),
                               atol=ATOL, rtol=0)
    again = js.load(out)
    direct = js.load(case.file)
    assert again.config == direct.config
    text = "hello abc world"
    assert (again.tokenizer(text)["input_ids"] == direct.tokenizer(text)["input_ids"]
            == transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"])
    for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(direct.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- refusals ---------------------------------------------------------------------------------

def _rewrite(case, path, edit_arrays=None, edit_meta=None, qtype=None):
    meta = _metadata(case.family, case.hf.config)
    arrays = gguf_arrays(case.family, case.hf)
    if edit_meta:
        meta = edit_meta(meta)
    if edit_arrays:
        arrays = edit_arrays(arrays)
    write_gguf(path, ARCH[case.family], meta, arrays, qtype=qtype)
    return path


def test_refuses_unsupported_architecture(cases, tmp_path):
    case = cases("llama")
    meta = [(k, key.replace("llama.", "falcon."), v) for k, key, v in _metadata("llama", case.hf.config)]
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "falcon", meta, gguf_arrays("llama", case.hf))
    with pytest.raises(ValueError, match=r"architecture 'falcon'.*not supported.*llama"):
        js.load(path)


def test_refuses_truncated_file(cases, tmp_path):
    data = cases("llama").file.read_bytes()
    for name, size in (("half.gguf", len(data) // 2), ("short.gguf", len(data) - 100),
                       ("header.gguf", 40)):
        path = tmp_path / name
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"truncated"):
            js.load(path)


def test_refuses_tensor_count_disagreeing_with_header(cases, tmp_path):
    data = bytearray(cases("llama").file.read_bytes())
    (count,) = struct.unpack_from("<Q", data, 8)       # magic u32, version u32, tensor_count u64
    for wrong in (count + 1, count - 1):
        struct.pack_into("<Q", data, 8, wrong)
        path = tmp_path / f"count{wrong}.gguf"
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=rf"tensor count \({wrong}, GGUF\.tensor_count\)"):
            js.load(path)


def test_refuses_wrong_shape_naming_the_tensor(cases, tmp_path):
    case = cases("llama")

    def shrink(name):
        def edit(arrays):
            return [(n, x[:-16] if n == name else x) for n, x in arrays]
        return edit

    for name in ("blk.1.ffn_up.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        path = _rewrite(case, tmp_path / f"{name}.gguf", edit_arrays=shrink(name))
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            js.load(path)


def test_refuses_missing_tensor_naming_it(cases, tmp_path):
    case = cases("llama")
    for name in ("blk.1.ffn_down.weight", "output_norm.weight", "token_embd.weight"):
        path = _rewrite(case, tmp_path / f"no-{name}.gguf",
                        edit_arrays=lambda arrays: [(n, x) for n, x in arrays if n != name])
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            js.load(path)


def test_refuses_unknown_tensor_naming_it(cases, tmp_path):
    case = cases("llama")
    path = _rewrite(case, tmp_path / "extra.gguf",
                    edit_arrays=lambda a: a + [("blk.0.ffn_mystery.weight", np.zeros((4, 32), np.float32))])
    with pytest.raises(ValueError, match=re.escape("'blk.0.ffn_mystery.weight'")):
        js.load(path)


def test_refuses_unsupported_quantization_type(cases, tmp_path):
    """Q8_1 has no dequantizer in the gguf package: the message names the tensor and the type."""
    case = cases("llama")
    path = tmp_path / "q8_1.gguf"
    meta = _metadata("llama", case.hf.config)
    writer_arrays = gguf_arrays("llama", case.hf)
    writer = gguf.GGUFWriter(str(path), "llama")
    for kind, key, value in meta:
        {"str": writer.add_string, "u32": writer.add_uint32, "f32": writer.add_float32,
         "strs": writer.add_array, "i32s": writer.add_array}[kind](key, value)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    for name, x in writer_arrays:
        if name == "blk.0.ffn_gate.weight":
            raw = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
            writer.add_tensor(name, raw, raw_dtype=Q.Q8_1)
        else:
            writer.add_tensor(name, np.ascontiguousarray(x, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_gate\.weight'.*Q8_1"):
        js.load(path)


def test_refuses_directory_with_two_gguf_files(cases, tmp_path):
    import shutil

    case = cases("llama")
    shutil.copy(case.file, tmp_path / "a.gguf")
    shutil.copy(case.file, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files.*a\.gguf, b\.gguf"):
        js.load(tmp_path)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(case.file, single / "only.gguf")
    assert js.load(single).config == js.load(case.file).config
