"""`jaxspec generate | chat | bench | train | convert`."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def _models(args, console):
    """(target, draft or None, description): --target/--model as given, else SmolLM2-135M-Instruct
    when its package is installed, else the shipped tiny pair (said in one line)."""
    import jaxspec as js
    from jaxspec.models import registry

    target_name = args.target or args.model
    if target_name is None:
        if registry.available(DEFAULT_MODEL):
            target_name = DEFAULT_MODEL
        else:
            console.print(f"[yellow]{DEFAULT_MODEL} is not installed "
                          f"(`{registry.MODELS[DEFAULT_MODEL][2]}`); using the shipped tiny pair "
                          "(jaxspec-tiny-code, a 6.8M toy code model)[/yellow]")
            with console.status("loading the shipped tiny pair"):
                target, draft = js.load_default(dtype=args.dtype)
            return target, draft, "jaxspec-tiny-code"
    with console.status(f"loading {target_name}"):
        target = js.load(target_name, dtype=args.dtype)
        draft = _load_draft(args.draft, target, args.dtype) if args.draft else None
    return target, draft, str(target_name)


def _load_draft(path, target, dtype):
    """--draft DIR: a model directory (js.load), or a draft distilled for this target by
    `jaxspec train draft` (js.DraftModel.load: it shares the target's embedding)."""
    import json
    from pathlib import Path

    import jaxspec as js

    meta = Path(path, "config.json")
    if meta.is_file() and json.loads(meta.read_text()).get("kind") == "draft_model":
        return js.DraftModel.load(path, target, dtype=dtype or "float32")
    return js.load(path, dtype=dtype)


def _drafter(name: str, target, draft, num_tokens):
    import jaxspec as js

    if name == "none":
        return None
    if name == "auto":  # a draft model if given (or the tiny pair's), else the best shipped drafter
        if draft is not None:
            name = "draft"
        else:
            drafter = js.default_drafter(target)   # js.Hybrid over the shipped Eagle, if any
            if num_tokens != "auto" and isinstance(drafter, js.Hybrid):
                drafter = drafter.with_tree(num_tokens=int(num_tokens))
            return drafter
    if name == "lookup":
        return js.PromptLookup(ngram=3, num_tokens=8 if num_tokens == "auto" else int(num_tokens))
    if name == "eagle":
        from jaxspec.speculative.default import shipped_drafter

        drafter = shipped_drafter(target, "eagle")
        if drafter is None:
            raise ValueError("no shipped Eagle drafter matches this target; train one with "
                             "`jaxspec train eagle --target ...` or use --drafter lookup")
        return drafter if num_tokens == "auto" else drafter.with_tree(num_tokens=int(num_tokens))
    if draft is None:
        from jaxspec.speculative.default import shipped_drafter

        draft = shipped_drafter(target, "draft_model")   # a distilled draft shipped for it
        if draft is None:
            raise ValueError("--drafter draft needs a draft model (--draft DIR)")
    length = num_tokens if num_tokens == "auto" else int(num_tokens)
    if isinstance(draft, js.DraftModel):   # distilled for this target (VocabTrim head)
        return js.DraftModel(draft.model, num_tokens=length, head_ids=draft.head_ids)
    return js.DraftModel(draft, num_tokens=length)


def _prompt(args):
    if args.chat:
        return [{"role": "user", "content": args.prompt}]
    return args.prompt


def cmd_generate(args) -> int:
    import jaxspec as js
    from rich.console import Console

    console = Console()
    target, draft, name = _models(args, console)
    if draft is not None and args.target is None and args.model is None and args.draft is None:
        pass  # the tiny pair: its draft model is the drafter
    sampling = js.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    drafter = _drafter(args.drafter, target, draft, args.num_tokens)
    prompts = [_prompt(args)]
    # Programs compile ahead of time (js.generate reports compile time apart), so each timed
    # run below measures decoding only.
    with console.status(f"compiling and running autoregressive {name}"):
        base = js.generate(target, prompts, args.max_new_tokens, sampling=sampling, seed=args.seed)
    shown = args.prompt if args.chat else args.prompt
    console.print(f"[bold]{shown}[/bold]", end="\n" if args.chat else "")
    if drafter is None:
        console.print(base.texts[0] if base.texts else base.tokens[0].tolist(), markup=False,
                      highlight=False)
        console.print(f"\n[dim]autoregressive: {base.stats['tokens_per_s']:.1f} tokens/s[/dim]")
        return 0
    with console.status(f"compiling and running speculative ({type(drafter).__name__})"):
        out = js.generate(target, prompts, args.max_new_tokens, sampling=sampling, drafter=drafter,
                          seed=args.seed)
    with console.status("timing again, interleaved"):  # CPU timings are noisy: best of two
        base2 = js.generate(target, prompts, args.max_new_tokens, sampling=sampling, seed=args.seed)
        out2 = js.generate(target, prompts, args.max_new_tokens, sampling=sampling,
                           drafter=drafter, seed=args.seed)
    ar_tps = max(base.stats["tokens_per_s"], base2.stats["tokens_per_s"])
    sp_tps = max(out.stats["tokens_per_s"], out2.stats["tokens_per_s"])
    console.print(out.texts[0] if out.texts else out.tokens[0].tolist(), markup=False,
                  highlight=False)
    speedup = sp_tps / ar_tps
    same = "identical to" if (out.tokens == base.tokens).all() else "differs from (sampled)"
    console.print(
        f"\n[dim]{name}: speculative ({type(drafter).__name__}): {sp_tps:.1f} tokens/s, "
        f"autoregressive: {ar_tps:.1f} tokens/s[/dim]\n"
        f"[bold green]speedup {speedup:.2f}x[/bold green] [dim](mean accepted "
        f"{out.stats['mean_accepted']:.2f} tokens per step; output {same} autoregressive)[/dim]")
    return 0


def cmd_chat(args) -> int:
    """A REPL: each line is a user turn; the whole conversation is the prompt of the next answer."""
    import jaxspec as js
    from rich.console import Console

    console = Console()
    args.chat = True
    target, draft, name = _models(args, console)
    drafter = _drafter(args.drafter, target, draft, args.num_tokens)
    sampling = js.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    conversation = []
    console.print(f"[dim]{name}, drafter {type(drafter).__name__ if drafter else 'none'}; "
                  "an empty line or Ctrl-D quits[/dim]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        conversation.append({"role": "user", "content": line})
        with console.status("generating"):
            out = js.generate(target, [conversation], args.max_new_tokens, sampling=sampling,
                              drafter=drafter, seed=args.seed)
        answer = out.texts[0] if out.texts else str(out.tokens[0].tolist())
        console.print(answer, markup=False, highlight=False)
        console.print(f"[dim]{out.stats['tokens_per_s']:.1f} tokens/s, mean accepted "
                      f"{out.stats['mean_accepted']:.2f}[/dim]")
        conversation.append({"role": "assistant", "content": answer})
    return 0


def cmd_bench(args) -> int:
    if args.profile:  # the round profile (jaxspec/bench/profile.py) reuses the harness's prompts
        from jaxspec.bench.profile import main as bench_main
    else:
        from jaxspec.bench.harness import main as bench_main

    return bench_main(args)


def cmd_train(args) -> int:
    if args.recipe == "eagle":
        from jaxspec.train.recipes.eagle import main as recipe_main
    elif args.recipe == "medusa":
        from jaxspec.train.recipes.medusa import main as recipe_main
    elif args.recipe == "draft":
        from jaxspec.train.recipes.draft import main as recipe_main
    else:
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

    def common(p):
        p.add_argument("--model", help="a model name (e.g. smollm2-135m-instruct, gemma-3-270m, "
                                       "jaxspec-tiny-code), a .gguf file or an HF directory")
        p.add_argument("--target", help="same as --model (an HF directory or .gguf file)")
        p.add_argument("--draft", help="a draft model (name, .gguf or HF directory) for --drafter draft")
        p.add_argument("--drafter", choices=["auto", "eagle", "draft", "lookup", "none"],
                       default="auto", help="auto: the draft model if there is one (the tiny pair "
                       "has one), else js.default_drafter (js.Hybrid: the shipped Eagle with prompt lookup), "
                       "else prompt lookup")
        p.add_argument("--num-tokens", default="auto",
                       help="draft tokens per step, or 'auto' (the drafter's default)")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="float32")

    gen = sub.add_parser("generate", help="answer or complete a prompt (speculative, with its speedup)")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="treat the prompt as a user turn (the model's chat template is applied)")
    common(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat (speculative)")
    common(chat)
    chat.set_defaults(func=cmd_chat)

    from jaxspec.bench.harness import add_arguments

    bench = sub.add_parser("bench", help="benchmark methods against autoregressive and HF")
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    train = sub.add_parser("train", help="train models (`jaxspec train eagle|medusa|draft --target NAME`, "
                                         "`jaxspec train default-pair`)")
    train.add_argument("recipe", choices=["eagle", "medusa", "draft", "default-pair"])
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

    convert = sub.add_parser("convert", help="write a model (HF directory, .gguf file or name) as "
                                             "an HF safetensors directory (e.g. to bfloat16)")
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
