"""What makes SmolLM2's float32 cost curve rise on XLA:CPU: the layers or the LM head, and can an
XLA option or another formulation of the products flatten it?

Usage: python benchmarks/cpu_cost_curve_anatomy.py [--out benchmarks] [--model smollm2-135m-instruct]

One process, every variant compiled first, then timed in interleaved rounds (medians), batch 1,
a 256-token cache, T = 1 .. 16 new tokens:

- "logits for every token": what a speculative verify needs (the LM head over all T rows);
- "hidden states only": the decoder layers alone (XLA drops the head), so the difference is
  the head's cost;
- the same two with `xla_cpu_experimental_ynn_fusion_type=""` (YNNPACK off: XLA:CPU's Eigen
  dot for every row count), passed per compilation through `jax.jit(compiler_options=...)`;
- the memory floor: the bytes of float32 weights one forward reads, over a measured streaming
  bandwidth (a jitted sum over a 440 MB array).
Writes cpu_cost_curve_anatomy.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.bench.report import write_report

SIZES = (1, 2, 4, 8, 16)
YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return 1000 * (time.perf_counter() - start)


def streaming_bandwidth_gb_s(repeats: int = 7) -> float:
    data = jnp.ones((110_000_000,), jnp.float32)  # 440 MB
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = min(_timed(total, data) for _ in range(repeats))
    return data.nbytes / 1e9 / (best / 1000)


def curves(model_name: str, rounds: int) -> dict:
    import jaxspec as js
    from jaxspec.models.cache import KVCache
    from jaxspec.models.transformer import forward, unstack_layers

    model = js.load(model_name).replace(tokenizer=None)
    model = model.replace(params=unstack_layers(model.params))   # as the CPU loops run it
    cache = KVCache.create(model.config, 1, 256 + max(SIZES), model.dtype)
    cache = cache.replace(lengths=jnp.full((1,), 256, jnp.int32))
    reads = {"logits for every token": lambda out: out[0].sum(),
             "hidden states only": lambda out: out[1].sum()}
    options = {"default": None, "YNNPACK off": YNN_OFF}
    fns, tokens = {}, {t: jnp.ones((1, t), jnp.int32) for t in SIZES}
    for opt_name, opts in options.items():
        for read_name, read in reads.items():
            for t in SIZES:
                positions = 256 + jnp.arange(t, dtype=jnp.int32)[None]

                def step(m, tok, c, positions=positions, read=read):
                    return read(forward(m, tok, c, positions))
                fn = jax.jit(step, compiler_options=opts)
                jax.block_until_ready(fn(model, tokens[t], cache))
                fns[(opt_name, read_name, t)] = fn
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            times[key].append(_timed(fn, model, tokens[key[2]], cache))
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(model.params))
    head_bytes = model.params["embed"].nbytes
    out = {}
    for (opt_name, read_name, t), values in times.items():
        out.setdefault(opt_name, {}).setdefault(read_name, {})[t] = statistics.median(values)
    return dict(ms=out, weight_bytes=weight_bytes, head_bytes=head_bytes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    bandwidth = streaming_bandwidth_gb_s()
    result = curves(args.model, args.rounds)
    meta = dict(device=f"{platform.machine()} CPU x{jax.device_count()}", jax=jax.__version__,
                model=args.model, date=time.strftime("%Y-%m-%d"), rounds=args.rounds)
    floor_ms = result["weight_bytes"] / 1e9 / bandwidth * 1000
    result.update(meta=meta, bandwidth_gb_s=bandwidth, memory_floor_ms=floor_ms)

    lines = [f"# What makes the float32 cost curve rise ({meta['device']}, jax {meta['jax']}, "
             f"{meta['date']})", "",
             "Written by `python benchmarks/cpu_cost_curve_anatomy.py` (medians of "
             f"{args.rounds} interleaved rounds; batch 1, 256-token cache).", "",
             "| XLA option | what the program returns | " + " | ".join(f"T={t}" for t in SIZES)
             + " | T=8 / T=1 |", "|---|---|" + "---|" * (len(SIZES) + 1)]
    for opt_name, by_read in result["ms"].items():
        for read_name, by_t in by_read.items():
            cells = " | ".join(f"{by_t[t]:.1f}" for t in SIZES)
            lines.append(f"| {opt_name} | {read_name} | {cells} | {by_t[8] / by_t[1]:.2f} |")
    for opt_name, by_read in result["ms"].items():
        head = {t: by_read["logits for every token"][t] - by_read["hidden states only"][t]
                for t in SIZES}
        cells = " | ".join(f"{head[t]:.1f}" for t in SIZES)
        lines.append(f"| {opt_name} | the head's share (difference) | {cells} | |")
    lines += ["", f"Weights read per forward: {result['weight_bytes'] / 1e6:.0f} MB "
              f"(the tied head {result['head_bytes'] / 1e6:.0f} MB); streaming bandwidth "
              f"{bandwidth:.1f} GB/s (a jitted sum over 440 MB); memory floor of one forward "
              f"{floor_ms:.1f} ms.", ""]
    write_report(Path(args.out), "cpu_cost_curve_anatomy", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
