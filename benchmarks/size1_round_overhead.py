"""What a speculative round costs beyond the target's forward: rounds sized to one node.

Usage: python benchmarks/size1_round_overhead.py [--repeats 5] [--out benchmarks]

Each drafter gets a cost table under which size 1 always wins, so every round of its sized
program is a plain decode step inside the speculative loop (the drafter still drafts, the loop
still does its bookkeeping). ms per target step, against the autoregressive program on the same
chat prompt (SmolLM2-135M-Instruct, greedy, 64 new tokens), methods interleaved, medians. The
difference, less the drafting, is the fixed per-round overhead issue 12 bounds at 5% of a step.
Drafting is timed alone per drafter (`jaxspec.bench.profile.drafting_ms`: `drafter.propose` in a
compiled loop on the state after the prompt) and subtracted: "fixed" = over a plain step minus
drafting. Token Recycling's and prompt lookup's drafting is a table or history search; Medusa's
is its heads on the last hidden state; Eagle's is its catch-up and draft levels (Eagle with its default stop_below,
which skips the second draft level when the first node's probability is below 0.1, and with
stop_below=None, which drafts both levels every round). Eagle's whole chain of 2
(sizing=None) is the reference for a round that verifies its draft. The default js.Hybrid is
measured as is and with its Eagle run only on probe rounds (skip_below=1.0). Its drafting is
prompt lookup's search and the hybrid's records alone (the Eagle never run: skip_below=1.0 and
no probes), plus the Eagle's drafting in the rounds it runs: 1 in probe_every (8) on probe
rounds only; for the default hybrid, between none and every round (both bounds printed).
Writes size1_round_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from jaxspec.bench.report import markdown_table, write_report

PROMPT = [[{"role": "user", "content": "Write a short story about a lighthouse keeper who finds "
                                       "a message in a bottle."}]]


def size_one_table(num_nodes: int):
    """A CostModel at the sizes js.generate would compile (1, 2, 4, 8 below n, and n) pricing
    every size but 1 out of reach."""
    from jaxspec.speculative.costs import CostModel

    sizes = tuple(s for s in (1, 2, 4, 8) if s < num_nodes) + (num_nodes,)
    return CostModel(sizes=sizes, ms=(1.0,) + (100.0,) * (len(sizes) - 1))


def drafting_ms(target, methods: dict, eagle) -> dict:
    """Per method, (low, high) ms of drafting a round, timed alone (module docstring)."""
    import jaxspec as js
    from jaxspec.api import encode_prompts
    from jaxspec.bench.profile import drafting_ms as timed, state_after_prompt

    ids = encode_prompts(target, PROMPT)

    def alone(drafter) -> float:
        return timed(state_after_prompt(target, drafter, ids), reps=16)

    lookup_only = alone(js.Hybrid(eagle, sizing=None, skip_below=1.0, probe_every=10**6))
    eagle_ms = alone(eagle.replace(sizing=None))
    out = {}
    for name, drafter in methods.items():
        if name == "autoregressive":
            continue
        if isinstance(drafter, js.Hybrid):
            if drafter.skip_below == 1.0:      # the Eagle on probe rounds only
                share = lookup_only + eagle_ms / drafter.probe_every
                out[name] = (share, share)
            else:
                out[name] = (lookup_only, lookup_only + eagle_ms)
        else:
            value = alone(drafter.replace(sizing=None))
            out[name] = (value, value)
    return out


def main(argv=None) -> int:
    import jaxspec as js
    from jaxspec.speculative.default import shipped_drafter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--name", default="size1_round_overhead")
    args = parser.parse_args(argv)
    target = js.load("smollm2-135m-instruct")
    eagle = shipped_drafter(target, "eagle").with_tree(num_tokens=2)
    methods = {
        "autoregressive": None,
        "prompt lookup (8 tokens), size 1": js.PromptLookup(ngram=3, num_tokens=8,
                                                            sizing=size_one_table(9)),
        "Eagle chain of 2, size 1": eagle.replace(sizing=size_one_table(3)),
        "Eagle chain of 2, size 1, stop_below=None": eagle.replace(sizing=size_one_table(3),
                                                                   stop_below=None),
        "Medusa chain of 2, size 1": None,
        "Token Recycling (81 nodes), size 1": js.TokenRecycling(sizing=size_one_table(81)),
        "Eagle chain of 2, whole chain": eagle.replace(sizing=None),
        # The default hybrid (Eagle chain of 2 and prompt lookup of 8, 9 nodes), and the same
        # with the Eagle run only on its probe rounds (every probe_every-th): the difference is
        # what the Eagle's rounds cost, the rest the hybrid's bookkeeping and lookup's search.
        "js.Hybrid (default), size 1": js.Hybrid(eagle, sizing=size_one_table(9)),
        "js.Hybrid, size 1, Eagle on probe rounds only": js.Hybrid(
            eagle, sizing=size_one_table(9), skip_below=1.0),
    }
    from jaxspec.speculative.default import shipped_drafter

    medusa = shipped_drafter(target, "medusa")
    if medusa is None:
        methods.pop("Medusa chain of 2, size 1")
    else:
        methods["Medusa chain of 2, size 1"] = medusa.with_tree(num_tokens=2).replace(
            sizing=size_one_table(3))
    for drafter in methods.values():                    # compile every program first
        js.generate(target, PROMPT, max_new_tokens=64, drafter=drafter)
    ms = {name: [] for name in methods}
    accepted = {}
    for _ in range(args.repeats):
        for name, drafter in methods.items():
            out = js.generate(target, PROMPT, max_new_tokens=64, drafter=drafter)
            ms[name].append(1000 * out.stats["seconds"] / int(np.sum(out.stats["target_steps"])))
            accepted[name] = out.stats["mean_accepted"]
    median = {name: statistics.median(v) for name, v in ms.items()}
    step = median["autoregressive"]
    drafting = drafting_ms(target, methods, eagle)
    meta = dict(device=f"{platform.machine()} CPU x{jax.device_count()}", jax=jax.__version__,
                model="smollm2-135m-instruct", date=time.strftime("%Y-%m-%d"),
                repeats=args.repeats)
    lines = [f"# Per-round overhead of the speculative loop ({meta['device']}, jax {meta['jax']}, "
             f"{meta['date']})", "",
             "Written by `python benchmarks/size1_round_overhead.py`: ms per target step, medians "
             f"of {args.repeats} interleaved runs of 64 new tokens on one chat prompt. Drafting "
             "alone: `drafter.propose` in its own compiled loop on the state after the prompt "
             "(`jaxspec.bench.profile.drafting_ms`); fixed = over a plain step less drafting, the "
             "per-round overhead issue 12 bounds at 5% of a step. The default hybrid's drafting "
             "lies between its lookup alone and its lookup plus the Eagle's every round.", ""]
    def fixed(name, value):                  # ms over a plain step less the drafting
        return median[name] - step - value

    rows = []
    for name in methods:
        if name == "autoregressive":
            rows.append([name, f"{step:.2f}", "", "", "", "", "", f"{accepted[name]:.2f}"])
            continue
        low, high = drafting[name]
        span = (f"{fixed(name, high):+.2f}" if low == high
                else f"{fixed(name, high):+.2f} to {fixed(name, low):+.2f}")
        share = (f"{fixed(name, high) / step:+.1%}" if low == high
                 else f"{fixed(name, high) / step:+.1%} to {fixed(name, low) / step:+.1%}")
        rows.append([name, f"{median[name]:.2f}", f"{median[name] - step:+.2f}",
                     f"{(median[name] - step) / step:+.1%}",
                     f"{high:.2f}" if low == high else f"{low:.2f} to {high:.2f}", span, share,
                     f"{accepted[name]:.2f}"])
    lines += markdown_table(
        ["method", "ms per target step", "over a plain step (ms)", "share of a plain step",
         "drafting alone (ms)", "fixed: over less drafting (ms)", "fixed share of a plain step",
         "mean accepted"], rows)
    write_report(Path(args.out), args.name,
                 dict(meta=meta, ms=ms, median=median, mean_accepted=accepted,
                      drafting_ms=drafting), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
