"""Benchmark the Pallas tree-attention kernel against the XLA attention path on one GPU.

    PYTHONPATH=. python benchmarks/gpu_tree_attention.py            # on a GPU machine
    PYTHONPATH=. python benchmarks/gpu_tree_attention.py --sweep    # also try other tilings
    PYTHONPATH=. python benchmarks/gpu_tree_attention.py --smoke --out-dir /tmp   # CPU check

First the correctness cases (`CHECK_CASES`, below); then, for every shape (committed context
1k/4k/16k/32k, T new tokens in {1, 8, 64}, batch 1 and 8; bfloat16, head dim 128, 32 query heads
over 8 kv heads) it compiles both paths, checks the kernel against the XLA path and the pure-jnp
reference, and times both in the same process. The cache
capacity is the context plus T rounded up to 256 slots, so the XLA path (which reads the whole
buffer) is not penalized by a loose cache. Results go to
benchmarks/gpu_tree_attention_<device>.json and .md.

--smoke runs tiny shapes with the kernel in interpret mode (any machine, CPU included); its
timings mean nothing, it only checks that the script and the kernel run end to end.

`CHECK_CASES` / `check_case` are the correctness half on their own (T in {1, 4, 16, 64}, ragged
lengths including 0 and S - T, several GQA groupings, bfloat16 and float32, chain and tree masks,
the shipped tiling and forced split-K choices): `benchmarks/device_suite.py` runs them before it
times `bench_shape`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.attention import xla_attention
from pallas_kernels.tree_attention import SHIPPED_CONFIGS, tree_attention, tree_attention_reference

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CONTEXTS = (1024, 4096, 16384, 32768)
NEW_TOKENS = (1, 8, 64)
BATCHES = (1, 8)
TOLERANCE = 2e-2  # bfloat16 inputs; the kernel and XLA round the softmax weights differently
# Max abs error allowed per dtype in the correctness cases. float32 allows for TF32 dots (the
# GPU's default matmul precision for float32 may use them, in XLA's and in Triton's dots).
CHECK_TOLERANCE = {"bfloat16": 3e-2, "float32": 5e-3}

# Correctness cases, (T, Hq, Hkv, D, S, B, dtype, mask, kernel kwargs): every T the speculative
# loop uses (1 = decode, 4 and 16 = chains and small trees, 64 = big trees), ragged lengths from 0
# to S - T, GQA groups of 4 (Llama 3), 3 (SmolLM2), 8, 1 (MHA) and 32 (MQA-like), both dtypes,
# the shipped tiling ({}), a single split, forced split-K, a narrower KV block, a capacity that
# is not a multiple of the KV block (padding path) and one long-context row set (split-K).
CHECK_CASES = (
    (1, 32, 8, 128, 1024, 4, "bfloat16", "chain", {}),
    (1, 8, 1, 64, 520, 3, "float32", "chain", {}),
    (4, 32, 8, 128, 1024, 4, "bfloat16", "tree", {}),
    (4, 4, 4, 64, 256, 3, "float32", "tree", {}),
    (16, 9, 3, 64, 1024, 3, "bfloat16", "tree", {}),
    (16, 8, 2, 128, 512, 2, "float32", "chain", dict(num_splits=1)),
    (64, 32, 8, 128, 2048, 2, "bfloat16", "tree", {}),
    (64, 32, 8, 64, 1024, 3, "float32", "tree", dict(num_splits=4)),
    (64, 8, 8, 128, 600, 2, "bfloat16", "chain", dict(block_k=32)),
    (1, 32, 8, 128, 32768, 2, "bfloat16", "chain", {}),
)
# The same features at sizes interpret mode runs in seconds on a CPU.
SMOKE_CHECK_CASES = (
    (1, 4, 1, 64, 64, 3, "float32", "chain", {}),
    (16, 6, 2, 32, 100, 2, "bfloat16", "tree", dict(num_splits=2)),
)

# Tilings tried by --sweep on top of the shipped GPU configuration (block_k, block_q, num_warps),
# each with every split-K choice (None = the kernel's occupancy heuristic), on the
# (batch, context, T) shapes of SWEEP_SHAPES only: a compile per pair, kept to a few minutes.
SWEEP = ((32, 16, 4), (128, 16, 4), (64, 32, 4), (128, 64, 8), (64, 64, 8))
SWEEP_SPLITS = (None, 1, 8)
SWEEP_SHAPES = ((1, 32768, 1), (8, 32768, 1), (1, 16384, 64), (8, 4096, 8))


@dataclasses.dataclass
class Result:
    batch: int
    context: int
    new_tokens: int
    capacity: int
    impl: str              # "xla" or "pallas"
    config: dict           # kernel tiling (empty for xla)
    compile_s: float
    ms: float              # mean time per call
    kv_gb_per_s: float     # committed K/V bytes read per second
    max_err_vs_xla: float
    max_err_vs_reference: float
    ok: bool


def tree_mask(rng, batch, t):
    """[B, T, T] ancestor masks (self included) of random trees."""
    masks = np.zeros((batch, t, t), bool)
    for b in range(batch):
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
        for i in range(t):
            node = i
            while node >= 0:
                masks[b, i, node] = True
                node = parents[node]
    return jnp.asarray(masks)


def ragged_inputs(seed, *, t, q_heads, kv_heads, head_dim, slots, batch, dtype, mask_kind):
    """Random q, k, v [B, *, H, D] in dtype, lengths [B] from 0 to S - T (0 and S - T always
    among them) and [B, T, T] masks (chains or random trees)."""
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, t, q_heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_heads, slots, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_heads, slots, head_dim), dtype)
    lengths = [0, slots - t] + [int(rng.integers(0, slots - t + 1)) for _ in range(batch - 2)]
    lengths = jnp.asarray(lengths[:batch], jnp.int32)
    if mask_kind == "chain":
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
    else:
        mask = tree_mask(rng, batch, t)
    return q, k, v, lengths, mask


def check_case(case, *, interpret=False, seed=0) -> dict:
    """Compile the kernel for one CHECK_CASES entry; its max abs error against
    `tree_attention_reference` and against the XLA path (and theirs against each other)."""
    t, q_heads, kv_heads, head_dim, slots, batch, dtype, mask_kind, kwargs = case
    args = ragged_inputs(seed, t=t, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                         slots=slots, batch=batch, dtype=jnp.dtype(dtype), mask_kind=mask_kind)
    scale = 1.0 / math.sqrt(head_dim)
    row = dict(T=t, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, slots=slots,
               batch=batch, dtype=dtype, mask=mask_kind, kwargs=dict(kwargs),
               lengths=[int(x) for x in args[3]], tolerance=CHECK_TOLERANCE[dtype])
    reference = jax.jit(lambda *a: tree_attention_reference(*a, scale=scale))(*args)
    expected = jax.jit(lambda *a: xla_attention(*a, scale=scale))(*args)
    start = time.perf_counter()
    compiled = jax.jit(lambda *a: tree_attention(*a, scale=scale, interpret=interpret,
                                                 backend="gpu", **kwargs)).lower(*args).compile()
    row["compile_s"] = round(time.perf_counter() - start, 3)
    out = jax.block_until_ready(compiled(*args))
    finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    row.update(err_vs_reference=max_err(out, reference), err_vs_xla=max_err(out, expected),
               xla_vs_reference=max_err(expected, reference), finite=finite)
    row["ok"] = finite and max(row["err_vs_reference"], row["err_vs_xla"]) <= row["tolerance"]
    return row


def lower_case_for_cuda(case) -> dict:
    """Lower (not compile) the GPU kernel for one CHECK_CASES entry for CUDA, from any host:
    catches a shape the Triton lowering refuses before a GPU is at hand."""
    t, q_heads, kv_heads, head_dim, slots, batch, dtype, _, kwargs = case
    dtype = jnp.dtype(dtype)
    args = (jax.ShapeDtypeStruct((batch, t, q_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, slots, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, slots, head_dim), dtype),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, t, t), jnp.bool_))
    fn = jax.jit(lambda *a: tree_attention(*a, scale=1.0 / math.sqrt(head_dim), backend="gpu",
                                           **kwargs))
    start = time.perf_counter()
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return dict(lowered_for_cuda="tree_attention_gpu" in text,
                lower_s=round(time.perf_counter() - start, 3))


def make_inputs(batch, context, t, q_heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    capacity = -(-(context + t) // 256) * 256
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, t, q_heads, head_dim), jnp.bfloat16)   # [B, T, Hq, D]
    k = jax.random.normal(keys[1], (batch, kv_heads, capacity, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, kv_heads, capacity, head_dim), jnp.bfloat16)
    lengths = jnp.full((batch,), context, jnp.int32)                               # [B]
    return (q, k, v, lengths, tree_mask(rng, batch, t)), capacity


def time_call(fn, args, iters):
    """Compile time and mean seconds per call; calls are queued back to back so host dispatch
    overlaps device work, as it does inside a jitted decoding loop."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*args))
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(iters):
        result = compiled(*args)
    jax.block_until_ready(result)
    return out, compile_s, (time.perf_counter() - start) / iters


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def bench_shape(batch, context, t, *, q_heads, kv_heads, head_dim, configs, interpret, iters,
                errors=None):
    """XLA and kernel rows for one shape; a kernel tiling that fails to compile or run gives no
    row, and its error goes to stderr and (as "config: Error: message") to `errors`."""
    args, capacity = make_inputs(batch, context, t, q_heads, kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    kv_bytes = 2 * batch * context * kv_heads * head_dim * 2  # committed K and V, bfloat16

    def row(impl, config, compile_s, secs, err_xla, err_ref):
        return Result(batch, context, t, capacity, impl, config, round(compile_s, 3),
                      round(secs * 1e3, 4), round(kv_bytes / secs / 1e9, 2), err_xla, err_ref,
                      err_xla <= TOLERANCE and err_ref <= TOLERANCE)

    reference = jax.jit(lambda *a: tree_attention_reference(*a, scale=scale))(*args)
    expected, compile_s, secs = time_call(lambda *a: xla_attention(*a, scale=scale), args, iters)
    results = [row("xla", {}, compile_s, secs, 0.0, max_err(expected, reference))]
    for config in configs:
        fn = lambda *a, c=config: tree_attention(*a, scale=scale, interpret=interpret,
                                                 backend="gpu", **c)
        try:
            out, compile_s, secs = time_call(fn, args, iters)
        except Exception as err:  # a tiling that does not compile is a result, not a crash
            print(f"  {config}: failed: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr)
            if errors is not None:
                errors.append(f"{config or 'shipped'}: {type(err).__name__}: {str(err)[:600]}")
            continue
        results.append(row("pallas", config, compile_s, secs, max_err(out, expected),
                           max_err(out, reference)))
    return results


def device_name():
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


def markdown(results, device, args):
    lines = [f"# Tree attention: Pallas kernel vs XLA path on {device}", "",
             f"jax {jax.__version__}; bfloat16, Hq={args.q_heads}, Hkv={args.kv_heads}, "
             f"D={args.head_dim}; mean of {args.iters} back-to-back calls; "
             f"{'interpret mode (smoke run, timings meaningless)' if args.smoke else 'compiled'}.",
             f"Shipped GPU configuration: {dataclasses.asdict(SHIPPED_CONFIGS['gpu'])}.", "",
             "| batch | context | T | XLA ms | kernel ms (shipped) | speedup | best kernel ms "
             "| best config | kernel K/V GB/s | correct |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|:---:|"]
    keyed = {}
    for r in results:
        keyed.setdefault((r.batch, r.context, r.new_tokens), []).append(r)
    for (batch, context, t), rows in sorted(keyed.items()):
        xla = next(r for r in rows if r.impl == "xla")
        kernels = [r for r in rows if r.impl == "pallas"]
        shipped = next((r for r in kernels if not r.config), None)
        best = min(kernels, key=lambda r: r.ms, default=None)
        cell = lambda r, f: "n/a" if r is None else f(r)
        lines.append(
            f"| {batch} | {context} | {t} | {xla.ms:.3f} | {cell(shipped, lambda r: f'{r.ms:.3f}')}"
            f" | {cell(shipped, lambda r: f'{xla.ms / r.ms:.2f}x')}"
            f" | {cell(best, lambda r: f'{r.ms:.3f}')}"
            f" | {cell(best, lambda r: str(r.config or 'shipped'))}"
            f" | {cell(shipped, lambda r: f'{r.kv_gb_per_s:.0f}')}"
            f" | {'yes' if all(r.ok for r in rows) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, kernel in interpret mode; runs on CPU")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the tilings in SWEEP x SWEEP_SPLITS")
    parser.add_argument("--out-dir", default="benchmarks")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)

    if args.smoke:
        contexts, new_tokens, batches = (64, 192), (1, 8), (1, 2)
        args.q_heads, args.kv_heads, args.head_dim = 8, 2, 64
        args.iters = args.iters or 2
    else:
        if jax.default_backend() != "gpu":
            parser.error(f"no GPU (default backend: {jax.default_backend()}); use --smoke")
        contexts, new_tokens, batches = CONTEXTS, NEW_TOKENS, BATCHES
        args.q_heads, args.kv_heads, args.head_dim = Q_HEADS, KV_HEADS, HEAD_DIM
        args.iters = args.iters or 50

    shipped = [{}]  # {} = the shipped configuration
    swept = shipped + [dict(block_k=bk, block_q=bq, num_warps=w, num_splits=s)
                       for bk, bq, w in SWEEP for s in SWEEP_SPLITS]

    device = device_name()
    print(f"device: {device}; jax {jax.__version__}", file=sys.stderr)
    checks = []
    for case in SMOKE_CHECK_CASES if args.smoke else CHECK_CASES:
        checks.append(check_case(case, interpret=args.smoke))
        c = checks[-1]
        print(f"check T={c['T']} H={c['q_heads']}x{c['kv_heads']} D={c['head_dim']} "
              f"S={c['slots']} {c['dtype']} {c['mask']} {c['kwargs'] or ''}: err "
              f"{max(c['err_vs_reference'], c['err_vs_xla']):.2e}"
              f"{'' if c['ok'] else '  MISMATCH'}", file=sys.stderr)
    results = []
    for batch in batches:
        for context in contexts:
            for t in new_tokens:
                sweep_here = args.sweep and (batch, context, t) in SWEEP_SHAPES
                rows = bench_shape(batch, context, t, q_heads=args.q_heads,
                                   kv_heads=args.kv_heads, head_dim=args.head_dim,
                                   configs=swept if sweep_here else shipped,
                                   interpret=args.smoke, iters=args.iters)
                for r in rows:
                    print(f"B={batch} ctx={context} T={t} {r.impl} {r.config or ''}: "
                          f"{r.ms:.3f} ms, err {r.max_err_vs_reference:.2e}"
                          f"{'' if r.ok else '  MISMATCH'}", file=sys.stderr)
                results.extend(rows)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    stem = out_dir / f"gpu_tree_attention_{slug}{'_smoke' if args.smoke else ''}"
    payload = dict(device=device, jax=jax.__version__, smoke=args.smoke, iters=args.iters,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   shapes=dict(q_heads=args.q_heads, kv_heads=args.kv_heads,
                               head_dim=args.head_dim, dtype="bfloat16"),
                   shipped_config=dataclasses.asdict(SHIPPED_CONFIGS["gpu"]),
                   checks=checks, results=[dataclasses.asdict(r) for r in results])
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results, device, args))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0 if all(r.ok for r in results) and all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
