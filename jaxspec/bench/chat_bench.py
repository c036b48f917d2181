"""`jaxspec bench --model NAME`: speculative chat on a real model, baseline in the same run.

Prompts: the Spec-Bench-like held-out set (30 chat prompts in six categories, never used for
training; `prompts/specbench_like.jsonl`) plus code prompts whose tasks are not among the
training templates. Every method decodes every prompt; methods are interleaved per prompt (AR,
then each method, for prompt 1, then prompt 2, ...) so machine noise hits all alike; each prompt's
programs are compiled before its timed runs. Reported per category and overall: total generated
tokens / total decode seconds, speedup over jaxspec autoregressive, mean accepted tokens per
round, acceptance by draft position. Also: the target-forward cost curve (ms for T new tokens
against a 256-token cache), and transformers `generate` on the same dequantized weights at batch
1 and 8 against jaxspec autoregressive. Writes JSON + Markdown + PNG under --out.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts" / "specbench_like.jsonl"
# The favourable set: 16 requests whose answer copies the request's own text (fix the typos in
# a paragraph, add a docstring to a function, ...), 10 on prose ("text_edit"), 6 on code
# ("code_edit"); written for this benchmark, none of them in the drafters' training prompts.
COPY_PROMPTS_FILE = PROMPTS_FILE.with_name("copy_heavy.jsonl")
PROMPT_SETS = ("chat", "copy")
# The six Spec-Bench-like categories, gathered as "chat" in the reports.
CHAT_CATEGORIES = ("conversation", "translation", "summarization", "qa", "math", "rag")

# Code tasks that are not in jaxspec.train.prompts.CODE_TASKS (held out from drafter training).
CODE_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th row of Pascal's triangle.",
    "Write a Python class for a queue built from two stacks, with enqueue and dequeue methods.",
    "Write a Python function that groups a list of words into anagrams.",
    "Write a Python function that computes the greatest common divisor of two integers.",
    "Write a Python function that splits a list into chunks of size n.",
)


def load_prompts(code: bool = True, prompt_set: str = "chat") -> list[tuple[str, str, list]]:
    """[(id, category, conversation)]: the held-out chat set, then the code prompts; or, for
    prompt_set="copy", the copy-heavy set (its prose edits, then its code edits)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}: choose one of {', '.join(PROMPT_SETS)}")
    path = COPY_PROMPTS_FILE if prompt_set == "copy" else PROMPTS_FILE
    out = [(item["id"], item["category"], item["messages"])
           for item in map(json.loads, filter(str.strip, path.read_text().splitlines()))]
    if prompt_set == "chat" and code:
        out += [(f"code-{i + 1}", "code", [{"role": "user", "content": p}])
                for i, p in enumerate(CODE_PROMPTS)]
    return out


def cost_curve(target, sizes=(1, 2, 4, 8, 16, 32, 64), batch: int = 1) -> dict[int, float]:
    """Median ms of one target forward of T new tokens against a 256-token cache (freshly
    measured by jaxspec.speculative.costs.measure, not the on-disk calibration cache)."""
    from jaxspec.speculative.costs import measure

    model = measure(target, batch, sizes)
    return dict(zip(model.sizes, model.ms))


def method_table(target, eagles=(), drafts=()) -> dict:
    """Method name -> drafter (None = autoregressive) for a chat target; `eagles` / `drafts`:
    NAME=DIR of exported Eagles / distilled draft models (`jaxspec train draft`) to bench beside
    the shipped ones (a clear error when one is not a directory or was trained for another
    target)."""
    import jaxspec as js

    methods = {"autoregressive": None,
               # The same autoregressive program again, timed like any method: its slowest prompt
               # is the noise floor of the per-prompt speedups ("never slower" is per prompt).
               "autoregressive_again": None,
               "prompt_lookup": js.PromptLookup(ngram=3, num_tokens=8),
               # The whole match verified every round (its fixed-size speed, before sizing).
               "prompt_lookup_fixed": js.PromptLookup(ngram=3, num_tokens=8, sizing=None),
               "prompt_lookup_tree": js.PromptLookup(ngram=3, num_tokens=8, num_candidates=4),
               "token_recycling_80": js.TokenRecycling(k=8, tree=js.trees.TOKEN_RECYCLING_80),
               "token_recycling_80_fixed": js.TokenRecycling(k=8, tree=js.trees.TOKEN_RECYCLING_80,
                                                             sizing=None)}
    from jaxspec.speculative.default import shipped_drafter

    drafter = shipped_drafter(target, "eagle")
    if drafter is not None:
        for k in (2, 3, 5):
            methods[f"eagle_k{k}"] = drafter.with_tree(num_tokens=k)
        methods["eagle_k2_raw"] = drafter.with_tree(num_tokens=2).replace(calibrated=False)
        methods["eagle_k3_fixed"] = drafter.with_tree(num_tokens=3, sizing=None)
        methods["eagle_tree"] = drafter.with_tree(tree=js.trees.from_paths(EAGLE_TREE_PATHS))
        # EAGLE-2 dynamic trees (budget, depth, top-k), sized per round like the chains.
        methods["eagle_dyn6"] = drafter.with_tree(tree=js.trees.dynamic(6, 3, 3))
        methods["eagle_dyn10"] = drafter.with_tree(tree=js.trees.dynamic(10, 4, 3))
        # The Eagle chain and prompt lookup, the better of the two per row and round.
        for k in (2, 3):
            methods[f"hybrid_k{k}"] = js.Hybrid(drafter.with_tree(num_tokens=k))
        methods["hybrid_k2_lookup4"] = js.Hybrid(drafter.with_tree(num_tokens=2),
                                                 js.PromptLookup(ngram=3, num_tokens=4))
        # The Eagle's chain alone with the hybrid's records and skip (no prompt lookup).
        methods["eagle_k2_skip"] = js.Hybrid(drafter.with_tree(num_tokens=2), lookup=None)
        # The Eagle's rounds never skipped, and skipped below a higher record.
        methods["hybrid_k2_noskip"] = js.Hybrid(drafter.with_tree(num_tokens=2), skip_below=None)
        methods["hybrid_k2_skip45"] = js.Hybrid(drafter.with_tree(num_tokens=2), skip_below=0.45)
        methods["hybrid_k2_skip20"] = js.Hybrid(drafter.with_tree(num_tokens=2), skip_below=0.2)
        # Cautious priors: each row's records start low, so a first lookup match or Eagle chain
        # is verified only as far as it pays at those odds (short answers end before the
        # records would have fallen from the default priors).
        methods["hybrid_k2_cautious"] = js.Hybrid(drafter.with_tree(num_tokens=2),
                                                  model_prior=0.3, lookup_prior=0.2,
                                                  lookup_next_prior=0.5)
        # Only lookup's records start low (the Eagle's at the default 0.5).
        methods["hybrid_k2_lookup_cautious"] = js.Hybrid(drafter.with_tree(num_tokens=2),
                                                         lookup_prior=0.2, lookup_next_prior=0.5)
        # The chain chosen per row by expected tokens alone (before the cost curve weighed it).
        methods["hybrid_k2_by_tokens"] = js.Hybrid(drafter.with_tree(num_tokens=2),
                                                   choose_by="tokens")
        for v in (4096, 2048):  # VocabTrim: the v most frequent of the head's tokens
            methods[f"eagle_k3_v{v}"] = trimmed(drafter, v).with_tree(num_tokens=3)
    for spec in eagles:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--eagle takes NAME=DIR, got {spec!r}")
        if not Path(path, "config.json").is_file():
            raise ValueError(f"--eagle {name}: {path} is not an exported Eagle (no config.json)")
        other = js.Eagle.load(path)
        other.check_compatible(target)
        for k in (2, 3):
            methods[f"{name}_k{k}"] = other.with_tree(num_tokens=k)
        methods[f"hybrid_{name}"] = js.Hybrid(other.with_tree(num_tokens=2))
    for spec in drafts:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--draft-model takes NAME=DIR, got {spec!r}")
        draft = js.DraftModel.load(path, target)   # refuses a directory of another kind/target
        for k in (2, 3):
            methods[f"{name}_k{k}"] = draft.replace(num_tokens=k, tree=js.trees.chain(k))
        methods[f"{name}_auto"] = js.DraftModel(draft.model, num_tokens="auto", max_tokens=5,
                                                head_ids=draft.head_ids)
    shipped_draft = shipped_drafter(target, "draft_model")
    if shipped_draft is not None:
        for k in (2, 3):
            methods[f"draft_model_k{k}"] = shipped_draft.replace(num_tokens=k,
                                                                 tree=js.trees.chain(k))
    medusa = shipped_drafter(target, "medusa")
    if medusa is not None:
        methods["medusa_tree"] = medusa
        methods["medusa_k2"] = medusa.with_tree(num_tokens=2)
        methods["medusa_k2_raw"] = methods["medusa_k2"].replace(calibrated=False)
        methods["medusa_tree_fixed"] = medusa.replace(sizing=None)
    return methods


def trimmed(drafter, num_tokens: int):
    """The drafter with its head cut to the num_tokens most frequent of its head tokens
    (`head_frequency_order` saved with the drafter; else the lowest ids, which BPE vocabularies
    order roughly by frequency)."""
    import jax.numpy as jnp

    ids = np.asarray(drafter.params["head_ids"])
    order = drafter.params.get("head_order")
    keep = np.sort(ids[np.asarray(order)[:num_tokens]] if order is not None else ids[:num_tokens])
    return drafter.replace(params=dict(drafter.params, head_ids=jnp.asarray(keep, jnp.int32)))


# A small static tree for Eagle on a CPU (verify cost grows quickly with nodes here): a top-1
# spine of depth 5 with second choices at the first two levels.
EAGLE_TREE_PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0),
                    (0, 0, 0, 0, 0)]


def run(target, methods, prompts, max_new_tokens: int, progress=None, batch: int = 1,
        repeats: int = 1) -> dict:
    """Per method and prompt: tokens, seconds, stats (interleaved by prompt). batch > 1: groups
    of `batch` consecutive prompts decoded together (ragged), one row per group (category
    "batch{B}"), each group's tokens compared row by row with autoregressive's. repeats > 1:
    every method decodes each prompt (group) `repeats` times, the methods interleaved in each
    pass, and the fastest run is kept ("seconds"; "seconds_all" lists them)."""
    if batch > 1:
        return _run_batched(target, methods, prompts, max_new_tokens, progress, batch, repeats)
    import jaxspec as js

    from jaxspec.chat import encode_conversation
    from jaxspec.decoding import bucket

    rows = {name: [] for name in methods}
    base_tokens = {}
    warmed = set()
    for pid, category, conv in prompts:
        size = bucket(len(encode_conversation(target.tokenizer, conv)))
        outs = {}
        for name, drafter in methods.items():
            if (name, size) not in warmed:  # compile this prompt bucket's programs, warm up
                for new_tokens in (max_new_tokens, 1):
                    js.generate(target, [conv], new_tokens, drafter=drafter)
                warmed.add((name, size))
        firsts = {}
        for _ in range(repeats):            # interleaved: a burst of load hits every method
            for name, drafter in methods.items():
                outs.setdefault(name, []).append(
                    js.generate(target, [conv], max_new_tokens, drafter=drafter))
                firsts.setdefault(name, []).append(_prefill_seconds(target, [conv], drafter))
        for name in methods:
            out = min(outs[name], key=lambda o: o.stats["seconds"])
            tokens = out.tokens[0, :out.lengths[0]].tolist()
            if name == "autoregressive":
                base_tokens[pid] = tokens
            rows[name].append(dict(id=pid, category=category, tokens=int(out.lengths[0]),
                                   seconds=out.stats["seconds"], prefill_seconds=min(firsts[name]),
                                   seconds_all=[o.stats["seconds"] for o in outs[name]],
                                   mean_accepted=out.stats["mean_accepted"],
                                   rounds=int(np.sum(out.stats["target_steps"])) - 1,
                                   accepted=int(np.sum(out.stats["accepted"])),
                                   by_position=np.asarray(out.stats["accepted_by_position"]).sum(0).tolist(),
                                   identical=tokens == base_tokens[pid]))
            if progress is not None:
                progress()
    return rows


def _prefill_seconds(target, prompts, drafter) -> float:
    """Seconds of what a call does before its first round: the same call with max_new_tokens=1
    (the prefill, which gives the first token, and the drafter's setup, e.g. an Eagle's pass
    over the prompt's features)."""
    import jaxspec as js

    return js.generate(target, prompts, 1, drafter=drafter).stats["seconds"]


def _run_batched(target, methods, prompts, max_new_tokens, progress, batch, repeats=1):
    import jaxspec as js

    rows = {name: [] for name in methods}
    warmed = set()
    for g in range(0, len(prompts), batch):
        group = [conv for _, _, conv in prompts[g:g + batch]]
        base = None
        outs = {}
        for name, drafter in methods.items():
            if (name, len(group)) not in warmed:
                for new_tokens in (max_new_tokens, 1):
                    js.generate(target, group, new_tokens, drafter=drafter)
                warmed.add((name, len(group)))
        firsts = {}
        for _ in range(repeats):            # interleaved, as at batch 1
            for name, drafter in methods.items():
                outs.setdefault(name, []).append(
                    js.generate(target, group, max_new_tokens, drafter=drafter))
                firsts.setdefault(name, []).append(_prefill_seconds(target, group, drafter))
        for name in methods:
            out = min(outs[name], key=lambda o: o.stats["seconds"])
            tokens = [out.tokens[i, :out.lengths[i]].tolist() for i in range(len(group))]
            if name == "autoregressive":
                base = tokens
            rows[name].append(dict(id=f"group-{g // batch + 1}", category=f"batch{batch}",
                                   tokens=int(out.lengths.sum()), seconds=out.stats["seconds"],
                                   prefill_seconds=min(firsts[name]),
                                   seconds_all=[o.stats["seconds"] for o in outs[name]],
                                   rounds=int(np.max(out.stats["target_steps"])) - 1,
                                   accepted=int(np.sum(out.stats["accepted"])) / len(group),
                                   by_position=(np.asarray(out.stats["accepted_by_position"]).sum(0)
                                                / len(group)).tolist(),
                                   identical=tokens == base))
            if progress is not None:
                progress()
    return rows


def _in_category(row: dict, category: str) -> bool:
    """"chat" gathers the six Spec-Bench-like categories (not code, not the copy-heavy set, not
    batch groups)."""
    if category == "chat":
        return row["category"] in CHAT_CATEGORIES
    return row["category"] == category


def summarise(rows: dict) -> dict:
    """Per method: per category and overall tokens/s, speedup, mean accepted."""
    categories = sorted({r["category"] for r in rows["autoregressive"]})
    base = rows["autoregressive"]

    def agg(items):
        tokens = sum(r["tokens"] for r in items)
        seconds = sum(r["seconds"] for r in items)
        rounds = sum(max(r["rounds"], 1) for r in items)
        out = dict(tokens_per_s=tokens / seconds, tokens=tokens, seconds=seconds,
                   mean_accepted=sum(r["accepted"] for r in items) / rounds)
        if all("prefill_seconds" in r for r in items):
            prefill = sum(r["prefill_seconds"] for r in items)
            out["prefill_seconds"] = prefill
            out["decode_tokens_per_s"] = tokens / max(seconds - prefill, 1e-9)
        return out

    out = {}
    for name, items in rows.items():
        entry = {"overall": agg(items), "identical": all(r["identical"] for r in items)}
        for c in categories + ["chat"]:
            pick = [r for r in items if _in_category(r, c)]
            ref = [r for r in base if _in_category(r, c)]
            if pick:
                entry[c] = agg(pick)
                entry[c]["speedup"] = entry[c]["tokens_per_s"] / agg(ref)["tokens_per_s"]
        entry["overall"]["speedup"] = entry["overall"]["tokens_per_s"] / agg(base)["tokens_per_s"]
        if "decode_tokens_per_s" in entry["overall"] and "decode_tokens_per_s" in agg(base):
            entry["overall"]["decode_speedup"] = (entry["overall"]["decode_tokens_per_s"]
                                                  / agg(base)["decode_tokens_per_s"])
        depth = max(len(r["by_position"]) for r in items)
        by_pos = np.zeros(depth)
        for r in items:
            by_pos[:len(r["by_position"])] += r["by_position"]
        rounds = sum(max(r["rounds"], 1) for r in items)
        entry["acceptance_by_position"] = (by_pos / rounds).round(3).tolist()
        # The slowest prompt (its own speedup): "never slower" is a per-prompt property.
        per_prompt = [(r["tokens"] / r["seconds"]) / (b["tokens"] / b["seconds"])
                      for r, b in zip(items, base)]
        worst = int(np.argmin(per_prompt))
        entry["slowest_prompt"] = dict(id=items[worst]["id"], speedup=per_prompt[worst])
        out[name] = entry
    return out


def hf_baseline(target, model_path, prompts, max_new_tokens: int, batch_sizes=(1, 8)) -> dict:
    """transformers `generate` (greedy, same dequantized weights) vs jaxspec autoregressive."""
    import torch
    import jaxspec as js
    from jaxspec.chat import encode_conversation
    from transformers import AutoModelForCausalLM

    import tempfile

    path = Path(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        if path.is_file():
            # The same dequantized float32 weights as a safetensors directory: transformers' own
            # GGUF path keeps GGUF modules that dequantize on the fly, which is not its fast path.
            js.save(target, tmp)
            path = Path(tmp)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf.eval()
    ids = [encode_conversation(target.tokenizer, conv) for _, _, conv in prompts]
    out = {}
    for b in batch_sizes:
        group = (ids * b)[:b] if len(ids) < b else ids[:b]
        width = max(len(x) for x in group)
        pad = target.config.pad_token_id or 0
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in group])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in group])
        with torch.no_grad():
            hf.generate(inp, attention_mask=mask, max_new_tokens=8, do_sample=False,
                        min_new_tokens=8, pad_token_id=pad)
            start = time.perf_counter()
            hf.generate(inp, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                        min_new_tokens=max_new_tokens, pad_token_id=pad)
            hf_s = time.perf_counter() - start
        # jaxspec with the same fixed length (no stop tokens: every row generates max_new_tokens)
        # (jaxspec rows stop at the end-of-turn token: tokens/s counts only what they generated)
        js.generate(target, group, max_new_tokens)
        res = js.generate(target, group, max_new_tokens)
        full = int(res.lengths.sum())
        out[f"batch{b}"] = dict(hf_tokens_per_s=b * max_new_tokens / hf_s,
                                jaxspec_tokens_per_s=full / res.stats["seconds"],
                                jaxspec_tokens=full)
        out[f"batch{b}"]["ratio"] = out[f"batch{b}"]["jaxspec_tokens_per_s"] / out[f"batch{b}"]["hf_tokens_per_s"]
    return out


def write(summary: dict, curve: dict, hf: dict | None, meta: dict, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(
        {"meta": meta, "cost_curve_ms": curve, "methods": summary, "hf": hf}, indent=1))
    cats = [c for c in CHAT_CATEGORIES + ("chat", "code", "text_edit", "code_edit",
                                          f"batch{meta.get('batch', 1)}")
            if c in summary["autoregressive"]]
    lines = [f"# {meta['model']} on {meta['device']}", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "Speedup over jaxspec autoregressive (same run, greedy; tokens/s = total tokens / "
             "total seconds of the js.generate calls, prefill included; \"prefill excluded\": "
             "each call's seconds less those of the same call with max_new_tokens=1, the prefill "
             "and the drafter's setup):", "",
             "| method | " + " | ".join(cats) + " | overall | overall, prefill excluded | "
             "slowest prompt | tokens/s | mean accepted | identical |",
             "|---" * (len(cats) + 7) + "|"]
    for m, e in summary.items():
        slow = e.get("slowest_prompt")
        slow = f"{slow['speedup']:.2f}x ({slow['id']})" if slow else "-"
        decode = e["overall"].get("decode_speedup")
        decode = f"{decode:.2f}x" if decode is not None else "-"
        lines.append(f"| {m} | " + " | ".join(f"{e[c]['speedup']:.2f}x" for c in cats)
                     + f" | {e['overall']['speedup']:.2f}x | {decode} | {slow} | "
                     f"{e['overall']['tokens_per_s']:.1f} | "
                     f"{e['overall']['mean_accepted']:.2f} | {'yes' if e['identical'] else 'NO'} |")
    lines += ["", "Acceptance by draft position (accepted per round):", ""]
    for m, e in summary.items():
        if m != "autoregressive":
            lines.append(f"- {m}: {e['acceptance_by_position']}")
    lines += ["", f"Target forward cost, ms for T new tokens (256-token cache, batch {meta.get('batch', 1)}):", "",
              "| T | " + " | ".join(str(t) for t in curve) + " |", "|---" * (len(curve) + 1) + "|",
              "| ms | " + " | ".join(f"{v:.1f}" for v in curve.values()) + " |",
              "| x T=1 | " + " | ".join(f"{v / curve[min(curve)]:.2f}" for v in curve.values()) + " |"]
    if hf:
        lines += ["", "Autoregressive jaxspec vs transformers `generate` (same weights, float32, "
                  f"greedy, {meta['max_new_tokens']} new tokens, no early stop):", "",
                  "| batch | transformers tokens/s | jaxspec tokens/s | ratio |", "|---|---|---|---|"]
        for b, e in hf.items():
            lines.append(f"| {b[5:]} | {e['hf_tokens_per_s']:.1f} | {e['jaxspec_tokens_per_s']:.1f} | "
                         f"{e['ratio']:.2f}x |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
        names = list(summary)
        a1.bar(names, [summary[m]["overall"]["speedup"] for m in names])
        a1.axhline(1.0, color="k", lw=0.8)
        a1.set_ylabel("speedup vs jaxspec AR")
        a1.tick_params(axis="x", rotation=45)
        a2.plot(list(curve), list(curve.values()), "o-")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("new tokens per forward")
        a2.set_ylabel("ms")
        a2.set_title("target forward cost")
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=100)
    except Exception as e:  # plotting is optional
        print(f"plot skipped: {e}")
    return md


def main(args) -> int:
    import jaxspec as js
    from jaxspec.bench.report import selected_methods
    from jaxspec.models import registry
    from rich.progress import Progress

    target = js.load(args.model)
    methods = method_table(target, getattr(args, "eagle", ()) or (),
                           getattr(args, "draft_model", ()) or ())
    if "hybrid_k2_pow2" in (args.methods or "").split(",") and "hybrid_k2" in methods:
        # The hybrid with its cost curve measured at 1, 2, 4, 8, 9 only, as before
        # Hybrid.verify_sizes added 3 (a round verifying the whole Eagle chain of 2 then ran a
        # padded 4-token forward). Built only when asked for: it measures a curve, afresh (a
        # cached one may have been measured on a busy machine).
        from jaxspec.speculative.costs import calibrate

        methods["hybrid_k2_pow2"] = methods["hybrid_k2"].replace(
            sizing=calibrate(target, 1, (1, 2, 4, 8, 9), refresh=True))
    methods = selected_methods(methods, args.methods)
    prompt_set = getattr(args, "prompt_set", None) or "chat"
    prompts = load_prompts(prompt_set=prompt_set)
    batch = getattr(args, "batch", 1) or 1
    if args.chat_prompts:
        step = max(1, len(prompts) // args.chat_prompts)
        prompts = prompts[::step][:args.chat_prompts]
    curve = cost_curve(target, batch=batch)
    print("cost curve (ms):", {k: round(v, 1) for k, v in curve.items()}, flush=True)
    with Progress() as progress:
        task = progress.add_task("benchmarking",
                                 total=-(-len(prompts) // batch) * len(methods))
        rows = run(target, methods, prompts, args.max_new_tokens,
                   progress=lambda: progress.advance(task), batch=batch,
                   repeats=getattr(args, "repeats", None) or 1)
    summary = summarise(rows)
    hf = None
    if not args.no_hf:
        path = registry.resolve(args.model) if registry.is_name(args.model) else args.model
        hf = hf_baseline(target, path, prompts, args.max_new_tokens)
    meta = dict(model=args.model, device=f"{platform.machine()} CPU x{jax.device_count()}"
                if jax.default_backend() == "cpu" else str(jax.devices()[0].device_kind),
                backend=jax.default_backend(), jax=jax.__version__,
                target_params=target.config.num_params(), prompt_set=prompt_set,
                prompts=len(prompts),
                max_new_tokens=args.max_new_tokens, batch=batch, temperature=0.0,
                repeats=getattr(args, "repeats", None) or 1,
                date=time.strftime("%Y-%m-%d"))
    name = args.name or f"bench_{args.model}_{jax.default_backend()}"
    md = write(summary, curve, hf, meta, Path(args.out), name)
    print(md.read_text())
    with open(Path(args.out) / f"{name}.rows.json", "w") as f:
        json.dump(rows, f)
    return 0
