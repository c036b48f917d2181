"""What a decode step and a sized round's one-token branch cost on XLA:CPU, by cache layout.

Usage: python benchmarks/batch8_step_anatomy.py [--batches 1,8] [--capacities 170,320] [--out benchmarks]

SmolLM2-135M-Instruct (float32, layers unstacked as the CPU loops run them), one-token steps in a
compiled fori_loop, ms per step (a 17-step loop minus a 1-step loop, medians of 5 interleaved
repetitions), for four ways of running the step:
  * forward, stacked cache: `forward` writes each layer's new K/V into the carried
    [L, B, Hkv, S, Dh] cache, then attends (the loops' step until 2026-12-06);
  * forward_step, per-layer cache: `transformer.forward_step` on L buffers [B, Hkv, S, Dh]
    (`forward_pending`, an optimization barrier, `cache.write_new`; the loops' step now);
  * sized branch, stacked / per-layer cache: a `lax.switch` over verify sizes 1, 2, 4 whose
    branches run `forward_pending` (size 1 taken), the K/V written after it (a sized round).
Writes batch8_step_anatomy.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

VARIANTS = ("forward, stacked cache", "forward_step, per-layer cache",
            "sized branch, stacked cache", "sized branch, per-layer cache")


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    import jaxspec as js
    from jaxspec.bench.report import markdown_table, write_report
    from jaxspec.models.cache import KVCache, commit, write_new
    from jaxspec.models.transformer import forward, forward_pending, forward_step, unstack_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--capacities", default="170,320", help="cache slots")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)

    target = js.load("smollm2-135m-instruct")
    model = target.replace(tokenizer=None, params=unstack_layers(target.params))
    sizes = (1, 2, 4)

    def loop(variant: str, steps: int):
        def run(model, cache):
            def body(i, carry):
                cache, acc = carry
                batch = cache.lengths.shape[0]
                tokens = jnp.ones((batch, max(sizes)), jnp.int32)                  # [B, 4]
                positions = cache.lengths[:, None] + jnp.arange(max(sizes))[None, :]
                if variant.startswith("forward,"):
                    logits, _, cache = forward(model, tokens[:, :1], cache, positions[:, :1])
                    score = logits[:, 0, 0].sum()
                elif variant.startswith("forward_step"):
                    logits, _, cache = forward_step(model, tokens[:, :1], cache, positions[:, :1])
                    score = logits[:, 0, 0].sum()
                else:
                    def branch(size):
                        logits, _, new_k, new_v = forward_pending(model, tokens[:, :size], cache,
                                                                  positions[:, :size])
                        pad = [(0, 0), (0, 0), (0, max(sizes) - size), (0, 0), (0, 0)]
                        return logits[:, 0, 0].sum(), jnp.pad(new_k, pad), jnp.pad(new_v, pad)
                    index = jnp.where(acc > 1e30, 1, 0)     # always size 1, decided at run time
                    score, new_k, new_v = jax.lax.switch(
                        index, [functools.partial(branch, size) for size in sizes])
                    cache = write_new(cache, new_k, new_v)
                cache = commit(cache, jnp.ones_like(cache.lengths))
                return cache, acc + score
            return jax.lax.fori_loop(0, steps, body, (cache, jnp.float32(0)))[1]
        return jax.jit(run)

    rows = []
    for batch in map(int, args.batches.split(",")):
        for capacity in map(int, args.capacities.split(",")):
            caches = {}
            for variant in VARIANTS:
                cache = KVCache.create(model.config, batch, capacity,
                                       per_layer=variant.endswith("per-layer cache"))
                caches[variant] = cache.replace(lengths=jnp.full((batch,), 40, jnp.int32))
            fns = {v: (loop(v, 1), loop(v, 17)) for v in VARIANTS}
            for v in VARIANTS:
                for fn in fns[v]:
                    jax.block_until_ready(fn(model, caches[v]))
            samples = {v: [] for v in VARIANTS}
            for _ in range(5):
                for v in VARIANTS:
                    one, many = fns[v]
                    start = time.perf_counter()
                    jax.block_until_ready(one(model, caches[v]))
                    middle = time.perf_counter()
                    jax.block_until_ready(many(model, caches[v]))
                    end = time.perf_counter()
                    samples[v].append(1000 * ((end - middle) - (middle - start)) / 16)
            row = dict(batch=batch, capacity=capacity,
                       **{v: round(statistics.median(samples[v]), 2) for v in VARIANTS})
            rows.append(row)
            print(row, flush=True)
    cols = ["batch", "capacity", *VARIANTS]
    table = markdown_table(cols, [[r[c] for c in cols] for r in rows])
    lines = [f"# A one-token decode step and a sized round's size-1 branch by cache layout "
             f"(XLA:CPU, {time.strftime('%Y-%m-%d')})", "",
             "Written by `python benchmarks/batch8_step_anatomy.py` (SmolLM2-135M-Instruct, "
             "float32, layers unstacked; ms per step, medians of 5 interleaved repetitions; "
             "capacity = cache slots, 40 of them committed). See the script's docstring for "
             "what each column runs.", "", *table]
    write_report(Path(args.out), "batch8_step_anatomy", dict(rows=rows), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
