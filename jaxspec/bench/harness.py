"""`jaxspec bench`: every method against jaxspec autoregressive and Hugging Face, in one run.

Each method decodes the same prompts (held-out standard-library files cut at function
boundaries, plus a few natural-language prompts) after a warm-up call that compiles its program.
Reports tokens/s, speedup over jaxspec autoregressive (measured in the same process), mean
accepted tokens per step, acceptance rate, the share of time spent drafting, compile time and
the compiled program's memory. Writes JSON, a Markdown table and a PNG bar chart.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.bench.report import selected_methods

NATURAL_LANGUAGE_PROMPTS = (
    "# Return the list of prime numbers below n.\ndef primes_below(n):\n",
    "# A small command line tool that counts words in a file.\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    \"\"\"A last-in first-out stack backed by a Python list.\"\"\"\n\n    def __init__(self):\n",
)


def heldout_prompts(count: int, min_chars: int = 300, max_chars: int = 1200) -> list[str]:
    """Prompts cut from held-out stdlib files, each ending right after a `def ...:` line."""
    from jaxspec.train.data import read_texts, split_files, stdlib_files, stdlib_root

    root = stdlib_root()
    _, heldout = split_files(stdlib_files(root), root)
    prompts = []
    for text in read_texts(heldout):
        for match in re.finditer(r"\n(    )?def [^\n]*:\n", text):
            end = match.end()
            if end < min_chars:
                continue
            prompts.append(text[max(0, end - max_chars):end])
            break
        if len(prompts) >= count:
            break
    return prompts


def method_table(draft, tree_methods: bool = True) -> dict:
    """Method name -> drafter (None = autoregressive). Tree methods join when they exist."""
    import jaxspec as js

    methods = {"autoregressive": None}
    if draft is not None:
        for k in (3, 5):
            methods[f"draft_model_k{k}"] = js.DraftModel(draft, num_tokens=k)
        methods["draft_model_auto"] = js.DraftModel(draft, num_tokens="auto", max_tokens=8)
        # the same chain and adaptive chain verified whole every round (no per-round sizing)
        methods["draft_model_k5_fixed"] = js.DraftModel(draft, num_tokens=5, sizing=None)
        methods["draft_model_auto_fixed"] = js.DraftModel(draft, num_tokens="auto", max_tokens=8,
                                                          sizing=None)
    methods["prompt_lookup"] = js.PromptLookup(ngram=3, num_tokens=8)
    if tree_methods:
        try:
            from jaxspec.bench.tree_methods import tree_method_table
        except ImportError:
            pass
        else:
            methods.update(tree_method_table(draft))
    return methods


def _drafting_seconds(target, drafter, prompt_tokens, prompt_lengths, sampling, rounds: int) -> float:
    """Seconds spent in `drafter.propose` over `rounds` rounds, timed in isolation."""
    from jaxspec.speculative.draft import Context

    batch, tp = prompt_tokens.shape
    max_len = tp + 512

    def run(reps):
        state = drafter.init(target, prompt_tokens, prompt_lengths, max_len, None)
        history = jnp.zeros((batch, max_len), jnp.int32).at[:, :tp].set(prompt_tokens)
        ctx = Context(history=history, length=prompt_lengths,
                      cache_lengths=prompt_lengths - 1, active=jnp.ones((batch,), bool))

        def body(i, carry):
            state, acc = carry
            draft, state = drafter.propose(state, ctx, sampling, jax.random.PRNGKey(i),
                                           target.config.vocab_size)
            return state, acc + draft.tokens.sum()
        return jax.lax.fori_loop(0, reps, body, (state, jnp.int32(0)))[1]

    timings = []
    for reps in (1, 1 + rounds):
        fn = jax.jit(run, static_argnums=0)
        jax.block_until_ready(fn(reps))
        start = time.perf_counter()
        jax.block_until_ready(fn(reps))
        timings.append(time.perf_counter() - start)
    return max(timings[1] - timings[0], 0.0)


def run_jaxspec(name, target, drafter, prompts, args, sampling) -> dict:
    import jaxspec as js
    from jaxspec import decoding
    from jaxspec.api import encode_prompts
    from jaxspec.decoding import bucket

    tokens = seconds = compile_s = steps = drafted = accepted = rounds = 0
    by_position = None
    for prompt in prompts:
        first = js.generate(target, [prompt], args.max_new_tokens, sampling=sampling, drafter=drafter)
        compile_s += first.stats["compile_seconds"]
        best = None
        for _ in range(args.repeats):
            out = js.generate(target, [prompt], args.max_new_tokens, sampling=sampling, drafter=drafter)
            if best is None or out.stats["seconds"] < best.stats["seconds"]:
                best = out
        s = best.stats
        tokens += s["generated_tokens"]
        seconds += s["seconds"]
        steps += sum(s["target_steps"])
        drafted += sum(s["drafted"])
        accepted += sum(s["accepted"])
        rounds += sum(max(t - 1, 0) for t in s["target_steps"])
        pos = np.asarray(s["accepted_by_position"]).sum(0)
        by_position = pos if by_position is None else by_position + pos
    result = dict(method=name, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                  compile_seconds=compile_s, target_steps=steps,
                  mean_accepted=accepted / max(rounds, 1) if drafter is not None else 0.0,
                  acceptance_rate=accepted / drafted if drafted else 0.0,
                  acceptance_by_position=(by_position / max(rounds, 1)).round(3).tolist()
                  if drafter is not None else [],
                  tree_nodes=drafter.tree.num_nodes - 1 if drafter is not None else 0)
    if drafter is not None and rounds:
        encoded = encode_prompts(target, prompts[:1])
        tp = bucket(len(encoded[0]))
        ptoks = np.zeros((1, tp), np.int32)
        ptoks[0, :len(encoded[0])] = encoded[0]
        per_round = _drafting_seconds(target, drafter, jnp.asarray(ptoks),
                                      jnp.asarray([len(encoded[0])], jnp.int32), sampling, 8) / 8
        result["drafting_share"] = min(per_round * rounds / seconds, 1.0)
    else:
        result["drafting_share"] = 0.0
    result["program_memory_mb"] = round(decoding.PROGRAMS.last_memory_bytes / 2**20, 2)
    return result


def run_hf(name, target_dir, draft_dir, prompts, args, hf_kwargs) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    kwargs = dict(hf_kwargs)
    if kwargs.pop("assistant", False):
        kwargs["assistant_model"] = transformers.AutoModelForCausalLM.from_pretrained(
            draft_dir, dtype=torch.float32).eval()
    tokens = seconds = 0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False,
                   pad_token_id=tok.eos_token_id, **kwargs)
        with torch.inference_mode():
            model.generate(**ids, **gen)  # warm-up
            best = None
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = model.generate(**ids, **gen)
                elapsed = time.perf_counter() - start
                best = elapsed if best is None else min(best, elapsed)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        seconds += best
    return dict(method=name, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                compile_seconds=0.0, mean_accepted=None, acceptance_rate=None, drafting_share=None,
                program_memory_mb=None, tree_nodes=None)


def write_results(results: list[dict], meta: dict, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = next(r for r in results if r["method"] == "autoregressive")["tokens_per_s"]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base
    (out_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    lines = [f"# {name}", "", ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| method | tree nodes | tokens/s | speedup vs jaxspec AR | mean accepted | "
             "acceptance rate | drafting share | compile s | program MB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    for r in results:
        lines.append(f"| {r['method']} | {fmt(r.get('tree_nodes'), 'd')} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {fmt(r['mean_accepted'], '.2f')} | "
                     f"{fmt(r['acceptance_rate'], '.2f')} | {fmt(r['drafting_share'], '.2f')} | "
                     f"{r['compile_seconds']:.1f} | {fmt(r['program_memory_mb'], '.1f')} |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(results) + 1.2))
    names = [r["method"] for r in results]
    speed = [r["speedup"] for r in results]
    ax.barh(names, speed, color=["#888" if n.startswith("hf_") else "#3a7" for n in names])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over jaxspec autoregressive (tokens/s ratio)")
    ax.invert_yaxis()
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    return md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a chat model name or path (e.g. smollm2-135m-instruct): "
                                        "benchmark speculative chat on it (jaxspec.bench.chat_bench)")
    parser.add_argument("--batch", type=int, default=1,
                        help="with --model: decode the chat prompts in ragged batches of this "
                             "size; with --profile: profile rounds of this many prompts at once")
    parser.add_argument("--chat-prompts", type=int, default=0,
                        help="with --model: use this many of the held-out chat+code prompts (0: all)")
    parser.add_argument("--prompt-set", default="chat",
                        help="with --model: 'chat' (the held-out Spec-Bench-like chat prompts and "
                             "code prompts) or 'copy' (16 requests whose answers copy their own "
                             "text: prose and code edits, where prompt lookup finds a lot)")
    parser.add_argument("--target", help="HF target directory (default: the shipped pair)")
    parser.add_argument("--draft", help="HF draft directory (default: the shipped pair)")
    parser.add_argument("--eagle", action="append", default=[], metavar="NAME=DIR",
                        help="with --model: also bench this exported Eagle (NAME_k2, NAME_k3 and "
                             "hybrid_NAME over its chain of 2), e.g. one just trained")
    parser.add_argument("--draft-model", action="append", default=[], metavar="NAME=DIR",
                        help="with --model: also bench this distilled draft model (`jaxspec train "
                             "draft`: NAME_k2, NAME_k3, NAME_auto)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated method names, or 'all' (autoregressive always runs)")
    parser.add_argument("--prompts", type=int, default=6, help="held-out code prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per prompt, best kept (default 2; with --model 1, "
                             "interleaved across the methods)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--name", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="time one round's parts (draft / target / verify / rest) and count "
                             "the program's HLO instructions, per method (jaxspec/bench/profile.py)")


def main(args) -> int:
    import jaxspec as js
    from rich.progress import Progress

    if getattr(args, "repeats", None) is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if getattr(args, "model", None):
        from jaxspec.bench.chat_bench import main as chat_main
        return chat_main(args)
    args.repeats = args.repeats or 2

    if args.target:
        target_dir, draft_dir = args.target, args.draft
    else:
        from jaxspec.models.default import default_pair_dirs

        target_dir, draft_dir = (str(p) for p in default_pair_dirs())
    target = js.load(target_dir)
    draft = js.load(draft_dir) if draft_dir else None
    sampling = js.Sampling(temperature=args.temperature)
    prompts = heldout_prompts(args.prompts) + list(NATURAL_LANGUAGE_PROMPTS)
    methods = method_table(draft)
    methods = selected_methods(methods, args.methods, also=("hf_generate", "hf_assisted", "hf_prompt_lookup"))
    hf = {} if args.no_hf else {"hf_generate": {}, "hf_assisted": {"assistant": True},
                                "hf_prompt_lookup": {"prompt_lookup_num_tokens": 8}}
    if args.methods != "all":
        hf = {k: v for k, v in hf.items() if k in set(args.methods.split(","))}
    if draft_dir is None:
        hf.pop("hf_assisted", None)
    results = []
    with Progress() as progress:
        task = progress.add_task("benchmarking", total=len(methods) + len(hf))
        for name, drafter in methods.items():
            progress.update(task, description=f"jaxspec {name}")
            results.append(run_jaxspec(name, target, drafter, prompts, args, sampling))
            progress.advance(task)
        for name, kwargs in hf.items():
            progress.update(task, description=name)
            results.append(run_hf(name, target_dir, draft_dir, prompts, args, kwargs))
            progress.advance(task)
    meta = dict(device=f"{platform.processor() or platform.machine()} CPU x{jax.device_count()}"
                if jax.default_backend() == "cpu" else str(jax.devices()[0].device_kind),
                backend=jax.default_backend(), jax=jax.__version__,
                target=Path(target_dir).name, draft=Path(draft_dir).name if draft_dir else None,
                target_params=target.config.num_params(),
                draft_params=draft.config.num_params() if draft else None,
                prompts=len(prompts), max_new_tokens=args.max_new_tokens, batch=1,
                temperature=args.temperature, date=time.strftime("%Y-%m-%d"))
    name = args.name or f"bench_{jax.default_backend()}_b1_t{args.temperature:g}"
    md = write_results(results, meta, Path(args.out), name)
    print(md.read_text())
    return 0
