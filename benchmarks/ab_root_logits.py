"""A/B: sized rounds handing on every node's logits (before) or the root's only (after).

Usage: python benchmarks/ab_root_logits.py [--batch 8] [--prompt-set copy] [--repeats 2]

Before 2026-12-07 every branch of a sized round padded the target's logits to the draft's n
nodes ([B, n, V]: 14 MB a round at batch 8 with 9 nodes) for the drafter's commit, which for
every drafter but Token Recycling ignores them. Now a drafter says so (`reads_target_logits =
False`) and the branches keep the root's logits alone. "before" is the same drafter with the
attribute set back to True (a registered subclass, so it compiles its own program); methods
interleaved in one process, as `jaxspec bench` runs them. Writes ab_root_logits_b{B}.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import jax
from flax import struct


def before(drafter):
    """The same drafter, handing on every node's logits as before."""
    cls = type(drafter)
    old = struct.dataclass(type(f"{cls.__name__}AllLogits", (cls,), {"reads_target_logits": True}))
    return old(**{f.name: getattr(drafter, f.name) for f in dataclasses.fields(drafter)})


def main(argv=None) -> int:
    import jaxspec as js
    from jaxspec.bench import chat_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-set", default="copy")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)
    target = js.load("smollm2-135m-instruct")
    table = chat_bench.method_table(target)
    methods = {"autoregressive": None}
    for name in ("prompt_lookup", "hybrid_k2"):
        methods[f"{name}_before"] = before(table[name])
        methods[f"{name}_after"] = table[name]
    prompts = chat_bench.load_prompts(prompt_set=args.prompt_set)
    rows = chat_bench.run(target, methods, prompts, 128, batch=args.batch, repeats=args.repeats)
    summary = chat_bench.summarise(rows)
    curve = chat_bench.cost_curve(target, batch=args.batch)
    meta = dict(model="smollm2-135m-instruct", device=f"{platform.machine()} CPU x{jax.device_count()}",
                jax=jax.__version__, prompt_set=args.prompt_set, batch=args.batch,
                repeats=args.repeats, max_new_tokens=128, date=time.strftime("%Y-%m-%d"),
                script="benchmarks/ab_root_logits.py")
    chat_bench.write(summary, curve, None, meta, Path(args.out), f"ab_root_logits_b{args.batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
