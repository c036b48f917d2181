"""Eagle drafters' teacher-forced accuracy on seen, fresh and held-out prompts.

Usage: python benchmarks/eagle_generalisation.py [--drafter NAME=DIR ...] [--medusa] [--per-set 12]

For each prompt set the target (SmolLM2-135M-Instruct, float32) answers greedily (128 new
tokens, once, shared by every drafter); each drafter is then scored on those answers with the
training loss's metrics (`jaxspec.train.eagle.make_loss`: top-1 agreement with the target's
greedy token for the first and the second draft step, the target's true features as input):
  * seen       the first prompts of `build_prompts(seed=0)`, which every shipped Eagle trained on;
  * fresh      `build_prompts(seed=123)`: the same templates, prompts no drafter saw;
  * held-out   the chat benchmark's prompts (Spec-Bench-like chat set and the code prompts),
               never trained on.
With --medusa the shipped Medusa heads are scored on the same answers (head k's top-1 on the
target's feature at p against the target's greedy token after x_{p+k}: heads 1 and 2 are draft
steps 1 and 2, the second with the true token in between rather than a drafted one).
Deterministic (no timing): the gap between the sets measures memorisation, and the held-out
column is what acceptance in `jaxspec bench` follows. Writes eagle_generalisation.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def answers(target, convs, batch: int = 8, max_new_tokens: int = 128):
    """[(prompt + greedy answer ids, prompt length)] for conversations."""
    import jaxspec as js
    from jaxspec.api import encode_prompts

    seqs = []
    for i in range(0, len(convs), batch):
        part = convs[i:i + batch]
        out = js.generate(target, part, max_new_tokens)
        for j, prompt in enumerate(encode_prompts(target, part)):
            answer = out.tokens[j][:out.lengths[j]].tolist()
            seqs.append((np.asarray(prompt + answer, np.int32), len(prompt)))
    return seqs


def scores(target, drafter, items, seqs) -> dict:
    """Mean top-1 (steps 1 and 2) over answer positions of every sequence."""
    import jax

    from jaxspec.speculative.drafters.eagle import head_rows
    from jaxspec.train.eagle import make_loss

    ids = drafter.params["head_ids"]
    loss = jax.jit(make_loss(drafter.config, target.params["embed"], ids,
                             head=head_rows(target.params, ids)))
    top1, top2 = [], []
    for (tokens, feats, labels), (_, p) in zip(items, seqs):
        valid = np.zeros((1, len(tokens)), bool)
        valid[0, p:] = True
        _, m = loss(drafter.params, {"tokens": tokens[None], "features": feats.astype(np.float32)[None],
                                     "valid": valid, "labels": labels[None]})
        top1.append(float(m["top1_1"]))
        top2.append(float(m["top1_2"]))
    return {"top1_1": float(np.mean(top1)), "top1_2": float(np.mean(top2))}


def medusa_scores(target, drafter, items, seqs) -> dict:
    """The same scores for Medusa heads: head k's top-1 on f_p against the target's greedy token
    k positions after x_{p+1} (head 1 = draft step 1, head 2 = step 2), answer labels only."""
    import jax
    import jax.numpy as jnp

    from jaxspec.speculative.drafters.eagle import head_rows
    from jaxspec.speculative.drafters.medusa import head_logits

    params = dict(drafter.params)
    if "lm_head" not in params:   # shared head: the target's LM-head rows of the head tokens
        params["lm_head"] = head_rows(target.params, params["head_ids"])
    ids = np.asarray(drafter.params["head_ids"])
    to_head = np.full(drafter.config.vocab_size, -1)
    to_head[ids] = np.arange(len(ids))
    logits = jax.jit(lambda p, f: jnp.argmax(head_logits(p, f), -1))        # [T, K]
    hits = {1: [], 2: []}
    for (tokens, feats, labels), (_, start) in zip(items, seqs):
        best = np.asarray(logits(params, jnp.asarray(feats, jnp.float32)))
        for k in (1, 2):
            # f_p predicts x_{p+k+1} (the target's greedy token there: labels[p + k]); counted
            # when that is an answer token, p + k + 1 >= start, as Eagle's scores count them.
            for p in range(max(start - k - 1, 0), len(tokens) - k):
                hits[k].append(best[p, k - 1] == to_head[labels[p + k]])
    return {"top1_1": float(np.mean(hits[1])), "top1_2": float(np.mean(hits[2]))}


def main(argv=None) -> int:
    import jaxspec as js
    from jaxspec.bench.chat_bench import load_prompts
    from jaxspec.bench.report import markdown_table, write_report
    from jaxspec.speculative.default import shipped_drafter
    from jaxspec.train.eagle import compute_features
    from jaxspec.train.prompts import build_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", action="append", default=[],
                        help="NAME=DIR of an exported Eagle (default: the shipped one)")
    parser.add_argument("--medusa", action="store_true",
                        help="also score the shipped Medusa heads (heads 1 and 2 as steps 1 and 2)")
    parser.add_argument("--per-set", type=int, default=12, help="prompts per set")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)

    target = js.load("smollm2-135m-instruct")
    drafters = {name: js.Eagle.load(path) for name, path in (d.split("=", 1) for d in args.drafter)}
    if not drafters:
        drafters = {"shipped": shipped_drafter(target, "eagle")}
    held = load_prompts(code=True)
    held = [c for _, _, c in held[::max(1, len(held) // args.per_set)]][:args.per_set]
    sets = {"seen": build_prompts(1280, seed=0)[:args.per_set],
            "fresh": build_prompts(args.per_set, seed=123), "held-out": held}
    medusa = shipped_drafter(target, "medusa") if args.medusa else None
    results = {name: {} for name in list(drafters) + (["medusa"] if medusa is not None else [])}
    start = time.perf_counter()
    for set_name, convs in sets.items():
        seqs = answers(target, convs)
        items = compute_features(target, seqs, labels=True, log=lambda *_: None)
        for name, drafter in drafters.items():
            results[name][set_name] = scores(target, drafter, items, seqs)
            print(set_name, name, results[name][set_name], flush=True)
        if medusa is not None:
            results["medusa"][set_name] = medusa_scores(target, medusa, items, seqs)
            print(set_name, "medusa", results["medusa"][set_name], flush=True)
    cols = list(sets)
    lines = ["# Eagle drafters: teacher-forced top-1 on seen, fresh and held-out prompts", "",
             "Written by `python benchmarks/eagle_generalisation.py` (SmolLM2-135M-Instruct, "
             f"float32, greedy answers of 128 new tokens, {args.per_set} prompts per set; "
             "top-1 agreement with the target's greedy token, answer positions only).", ""]
    lines += markdown_table(
        ["drafter"] + [f"{c} step 1" for c in cols] + [f"{c} step 2" for c in cols],
        [[name] + [f"{r[c]['top1_1']:.3f}" for c in cols] + [f"{r[c]['top1_2']:.3f}" for c in cols]
         for name, r in results.items()])
    write_report(Path(args.out), "eagle_generalisation",
                 dict(results=results, per_set=args.per_set, drafters=args.drafter,
                      seconds=round(time.perf_counter() - start, 1), date=time.strftime("%Y-%m-%d")),
                 lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
