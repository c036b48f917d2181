"""`jaxspec generate | bench | train | convert`."""

from __future__ import annotations

import argparse
import sys


def _models(target_dir: str | None, draft_dir: str | None, dtype: str):
    """The target/draft pair: given directories, or the shipped default pair."""
    import jaxspec as js

    if target_dir:
        target = js.load(target_dir, dtype=dtype)
        draft = js.load(draft_dir, dtype=dtype) if draft_dir else None
        return target, draft
    from jaxspec.models.default import load_default

    return load_default(dtype=dtype)


def _drafter(name: str, draft, num_tokens):
    import jaxspec as js

    if name == "none":
        return None
    if name == "lookup":
        return js.PromptLookup(ngram=3, num_tokens=8 if num_tokens == "auto" else int(num_tokens))
    if draft is None:
        raise SystemExit("--drafter draft needs a draft model (--draft DIR)")
    return js.DraftModel(draft, num_tokens=num_tokens if num_tokens == "auto" else int(num_tokens))


def cmd_generate(args) -> int:
    import jaxspec as js
    from rich.console import Console

    console = Console()
    target, draft = _models(args.target, args.draft, args.dtype)
    sampling = js.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    drafter = _drafter(args.drafter, draft, args.num_tokens)
    prompts = [args.prompt]
    # Warm-up runs compile both programs, so the timed runs below measure decoding only.
    base = js.generate(target, prompts, args.max_new_tokens, sampling=sampling, seed=args.seed)
    base = js.generate(target, prompts, args.max_new_tokens, sampling=sampling, seed=args.seed)
    console.print(f"[bold]{args.prompt}[/bold]", end="")
    if drafter is None:
        console.print(base.texts[0] if base.texts else base.tokens[0].tolist(), markup=False,
                      highlight=False)
        console.print(f"\n[dim]autoregressive: {base.stats['tokens_per_s']:.1f} tokens/s[/dim]")
        return 0
    js.generate(target, prompts, args.max_new_tokens, sampling=sampling, drafter=drafter,
                seed=args.seed)
    out = js.generate(target, prompts, args.max_new_tokens, sampling=sampling, drafter=drafter,
                      seed=args.seed)
    console.print(out.texts[0] if out.texts else out.tokens[0].tolist(), markup=False,
                  highlight=False)
    speedup = out.stats["tokens_per_s"] / base.stats["tokens_per_s"]
    same = "identical to" if (out.tokens == base.tokens).all() else "differs from (sampled)"
    console.print(
        f"\n[dim]speculative ({type(drafter).__name__}): {out.stats['tokens_per_s']:.1f} tokens/s, "
        f"autoregressive: {base.stats['tokens_per_s']:.1f} tokens/s[/dim]\n"
        f"[bold green]speedup {speedup:.2f}x[/bold green] [dim](mean accepted "
        f"{out.stats['mean_accepted']:.2f} tokens per step; output {same} autoregressive)[/dim]")
    return 0


def cmd_bench(args) -> int:
    from jaxspec.bench.harness import main as bench_main

    return bench_main(args)


def cmd_train(args) -> int:
    from jaxspec.train.recipes.default_pair import main as recipe_main

    return recipe_main(args.rest) or 0


def cmd_convert(args) -> int:
    import jaxspec as js

    model = js.load(args.src, dtype=args.dtype)
    js.save(model, args.dst)
    print(f"wrote {args.dst} ({model.config.family}, dtype {args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt (speculative, with its speedup)")
    gen.add_argument("prompt")
    gen.add_argument("--target", help="HF model directory (default: the shipped pair)")
    gen.add_argument("--draft", help="HF draft model directory")
    gen.add_argument("--drafter", choices=["draft", "lookup", "none"], default="draft")
    gen.add_argument("--num-tokens", default="3",
                     help="draft tokens per step, or 'auto' (3 is best for the shipped pair on CPU)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32")
    gen.set_defaults(func=cmd_generate)

    from jaxspec.bench.harness import add_arguments

    bench = sub.add_parser("bench", help="benchmark methods against autoregressive and HF")
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    train = sub.add_parser("train", help="train models (e.g. `jaxspec train default-pair`)")
    train.add_argument("recipe", choices=["default-pair"])
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

    convert = sub.add_parser("convert", help="re-save an HF directory (e.g. to bfloat16)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--dtype", default="float32")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # user errors: a message, not a traceback
        print(f"jaxspec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
