"""Why XLA:CPU's bfloat16 is slow, what is fast, and why jaxspec does not ship it (yet).

Usage: python benchmarks/cpu_matmul_dtypes.py [--out benchmarks] [--model smollm2-135m-instruct]

1. One [M, 576] x [576, 1536] product (SmolLM2's MLP shape), per operand form: the optimized HLO
   says what XLA:CPU emits (YNNPACK fusion, Eigen dot, a whole-kernel convert), timed at M = 1, 2.
2. SmolLM2-135M's forward (256-token cache, batch 1), ms for T = 1 .. 64 new tokens:
   float32; "bf16 weights": every matmul kernel (layers and LM head) stored in bfloat16, the
   activations cast to bfloat16 at each product, float32 accumulation, a one-row product padded
   to two rows (the fast form of step 1, patched into `transformer._dense` / `lm_head` for this
   experiment only); dtype="bfloat16" (everything bfloat16). Medians of 9; sizes interleaved
   across configurations so drift on a shared machine hits all of them alike.
3. The exactness check that decides it: greedy output of the autoregressive program vs the
   speculative programs (prompt lookup, the shipped Eagle) on held-out chat prompts, for the
   bf16-weight model. Identical for float32 in every committed benchmark; here not.
Writes cpu_matmul_dtypes.{json,md}.
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

SIZES = (1, 2, 4, 8, 16, 32, 64)


def _ms(fn, *args, repeats: int = 9) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _emitted(fn, *args) -> str:
    """What the optimized HLO does: YNNPACK fusion, a plain dot, a whole-kernel convert."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    kinds = []
    if "__ynn_fusion" in text:
        kinds.append("YNNPACK dot fusion")
    if " dot(" in text:
        kinds.append("Eigen dot")
    kernel = args[1]
    if f"f32[{kernel.shape[0]},{kernel.shape[1]}]" in text and kernel.dtype != jnp.float32:
        kinds.append(f"kernel converted to f32[{kernel.shape[0]},{kernel.shape[1]}] per call")
    return ", ".join(kinds)


def padded_bf16_product(spec: str, x, kernel):
    """einsum(spec, x, kernel) as bf16 x bf16 -> f32 (YNNPACK on XLA:CPU), one row padded to two
    (a one-row product is otherwise rewritten to a float32 dot of the whole upcast kernel)."""
    xl = x.astype(jnp.bfloat16)
    rows = int(np.prod(x.shape[:-1]))
    if rows == 1:
        pair = jnp.concatenate([xl.reshape(1, -1)] * 2, axis=0)
        y = jnp.einsum(spec.replace("...", "M"), pair, kernel, preferred_element_type=jnp.float32)
        return y[:1].reshape(*x.shape[:-1], -1).astype(x.dtype)
    return jnp.einsum(spec, xl, kernel, preferred_element_type=jnp.float32).astype(x.dtype)


class bf16_weights:
    """Context: transformer._dense / lm_head use padded_bf16_product for bfloat16 kernels."""

    def __enter__(self):
        from jaxspec.models import transformer as tr
        self.tr, self.saved = tr, (tr._dense, tr.lm_head)

        def dense(x, p):
            k = p["kernel"]
            y = (padded_bf16_product("...I,IO->...O", x, k) if k.dtype == jnp.bfloat16
                 else jnp.einsum("...I,IO->...O", x, k))
            return y + p["bias"] if "bias" in p else y

        def lm_head(params, hidden, config):
            head = params.get("bf16_head")
            if head is None:
                return self.saved[1](params, hidden, config)
            return padded_bf16_product("...D,VD->...V", hidden, head).astype(jnp.float32)

        tr._dense, tr.lm_head = dense, lm_head
        return self

    def __exit__(self, *exc):
        self.tr._dense, self.tr.lm_head = self.saved


def bf16_weight_model(model):
    """Layer kernels in bfloat16 and a bfloat16 copy of the tied head; the rest float32."""
    def cast(path, leaf):
        names = [str(getattr(k, "key", "")) for k in path]
        return leaf.astype(jnp.bfloat16) if names[0] == "layers" and names[-1] == "kernel" else leaf
    params = jax.tree_util.tree_map_with_path(cast, model.params)
    return model.replace(params={**params, "bf16_head": params["embed"].astype(jnp.bfloat16)})


def single_products() -> list[dict]:
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32)
    w16 = w32.astype(jnp.bfloat16)
    forms = {
        "f32 x f32": (lambda x, w: jnp.einsum("MI,IO->MO", x, w), w32),
        "f32 x bf16 (promoted einsum)": (lambda x, w: jnp.einsum("MI,IO->MO", x, w), w16),
        "bf16 x bf16 -> f32 (preferred_element_type)":
            (lambda x, w: jnp.einsum("MI,IO->MO", x.astype(jnp.bfloat16), w,
                                     preferred_element_type=jnp.float32), w16),
        "bf16 x bf16 -> f32, one row padded to two": (
            lambda x, w: padded_bf16_product("...I,IO->...O", x, w), w16),
    }
    rows = []
    for name, (fn, w) in forms.items():
        for m in (1, 2):
            x = jnp.ones((m, 576), jnp.float32)
            # 30 products in a row (one per layer), so the time is not all dispatch.
            def chain(x, w, fn=fn):
                for _ in range(30):
                    x = x + 1e-3 * fn(x, w)[:, :576]
                return x
            rows.append(dict(form=name, rows=m, emitted=_emitted(fn, x, w),
                             ms_30_products=_ms(jax.jit(chain), x, w)))
    return rows


def forward_curves(model_name: str) -> dict:
    import jaxspec as js
    from jaxspec.models.cache import KVCache
    from jaxspec.models.transformer import forward, unstack_layers

    f32 = js.load(model_name).replace(tokenizer=None)
    configs = {"float32": f32, "bf16 weights, f32 accumulation": bf16_weight_model(f32),
               "bfloat16 everything (dtype), same padded products": js.load(model_name, dtype="bfloat16").replace(tokenizer=None)}
    models = {name: m.replace(params=unstack_layers(m.params))      # as the CPU loops run it
              for name, m in configs.items()}
    curves = {name: {} for name in configs}
    for t in SIZES:
        for name, model in models.items():
            cache = KVCache.create(model.config, 1, 256 + max(SIZES), model.dtype)
            cache = cache.replace(lengths=jnp.full((1,), 256, jnp.int32))
            positions = 256 + jnp.arange(t, dtype=jnp.int32)[None]
            fn = jax.jit(lambda m, tok, c: forward(m, tok, c, positions)[0][:, -1].sum())
            curves[name][t] = _ms(fn, model, jnp.ones((1, t), jnp.int32), cache)
    return curves


def identity(model_name: str, prompts: int = 6, max_new_tokens: int = 128) -> list[dict]:
    """Does each speculative program reproduce the autoregressive program's greedy tokens?"""
    import jaxspec as js
    from jaxspec.speculative.default import shipped_drafter
    from jaxspec.bench.chat_bench import load_prompts

    target = js.load(model_name)
    eagle = shipped_drafter(target, "eagle")
    low = bf16_weight_model(target)
    items = load_prompts(code=False)
    items = items[::max(1, len(items) // prompts)][:prompts]
    rows = []
    for name, model in (("float32", target), ("bf16 weights", low)):
        for pid, _, conv in items:
            ref = js.generate(model, [conv], max_new_tokens)
            for method, drafter in (("prompt_lookup", js.PromptLookup(ngram=3, num_tokens=8)),
                                    ("eagle_k2", eagle)):
                out = js.generate(model, [conv], max_new_tokens, drafter=drafter)
                a, b = ref.tokens[0][:ref.lengths[0]], out.tokens[0][:out.lengths[0]]
                n = min(len(a), len(b))
                diverge = next((i for i in range(n) if a[i] != b[i]), None)
                rows.append(dict(model=name, prompt=pid, method=method,
                                 identical=bool(len(a) == len(b) and diverge is None),
                                 first_divergence=diverge))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    products = single_products()
    with bf16_weights():
        curves = forward_curves(args.model)
        same = identity(args.model)
    meta = dict(device=f"{platform.machine()} CPU x{jax.device_count()}", jax=jax.__version__,
                model=args.model, date=time.strftime("%Y-%m-%d"))
    lines = [f"# XLA:CPU matmuls by dtype ({meta['device']}, jax {meta['jax']}, {meta['date']})",
             "", "Written by `python benchmarks/cpu_matmul_dtypes.py`.", "",
             "## One [M, 576] x [576, 1536] product, 30 in a row (ms)", "",
             "| operands | M | XLA:CPU emits | ms |", "|---|---|---|---|"]
    for r in products:
        lines.append(f"| {r['form']} | {r['rows']} | {r['emitted']} | {r['ms_30_products']:.2f} |")
    lines += ["", f"## {args.model} forward, ms for T new tokens (256-token cache, batch 1)", "",
              "| model | " + " | ".join(map(str, SIZES)) + " |", "|---|" + "---|" * len(SIZES)]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{curve[t]:.1f}" for t in SIZES) + " |")
    for name, curve in curves.items():
        lines.append(f"| {name}, x T=1 | " + " | ".join(f"{curve[t] / curve[1]:.2f}" for t in SIZES) + " |")
    lines += ["", "## Greedy tokens: speculative program vs autoregressive program", "",
              "| model | method | identical prompts | first divergences (token index) |",
              "|---|---|---|---|"]
    for model in ("float32", "bf16 weights"):
        for method in ("prompt_lookup", "eagle_k2"):
            rs = [r for r in same if r["model"] == model and r["method"] == method]
            div = [f"{r['prompt']}@{r['first_divergence']}" for r in rs if not r["identical"]]
            lines.append(f"| {model} | {method} | {sum(r['identical'] for r in rs)}/{len(rs)} | "
                         f"{', '.join(div) or '-'} |")
    write_report(Path(args.out), "cpu_matmul_dtypes",
                 dict(meta=meta, products=products, curves=curves, identity=same), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
