"""Self-distillation throughput: the target's greedy answers to the Eagle recipe's self-instruct
and passage prompts, batched in the prompts' order against batched in order of prompt length
(`jaxspec.train.selfdistill.generate_corpus` batches by length since this measurement).

Same prompts, batch size and 128 new tokens for both orders, interleaved (prompt, length,
prompt, length); tokens/s exclude compilation. Prompts: `--prompts FILE` (a JSON list of
conversations, as the recipe's WORK/prompts_si.json), shuffled with seed 0, the first `--count`.

    python benchmarks/selfdistill_length_order.py --prompts WORK/prompts_si.json --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import jaxspec as js
from jaxspec.decoding import bucket
from jaxspec.train.selfdistill import chat_ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()

    target = js.load("smollm2-135m-instruct")
    prompts = json.loads(Path(args.prompts).read_text())
    random.Random(0).shuffle(prompts)
    ids = [chat_ids(target.tokenizer, p) for p in prompts[:args.count]]
    stops = list(target.config.eos_token_ids)
    orders = {"prompt order": list(range(len(ids))),
              "length order": sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))}
    runs = []
    for name in ["prompt order", "length order"] * 2:
        order, made, compiling, prefilled = orders[name], 0, 0.0, 0
        start = time.perf_counter()
        for b in range(0, len(order), args.batch):
            batch = [ids[i] for i in order[b:b + args.batch]]
            res = js.generate(target, batch, max_new_tokens=args.max_new_tokens, stop_tokens=stops)
            made += int(res.lengths.sum())
            compiling += res.stats["compile_seconds"]
            prefilled += len(batch) * bucket(max(len(p) for p in batch))
        wall = time.perf_counter() - start
        runs.append({"order": name, "tokens": made, "wall_s": round(wall, 1),
                     "compile_s": round(compiling, 1), "prefilled_tokens": prefilled,
                     "tokens_per_s": round(made / (wall - compiling), 1)})
        print(runs[-1], flush=True)

    report = {"prompts": args.prompts, "count": len(ids), "batch": args.batch,
              "max_new_tokens": args.max_new_tokens,
              "prompt_tokens": sum(len(p) for p in ids), "runs": runs}
    out = Path(args.out)
    (out / "selfdistill_length_order.json").write_text(json.dumps(report, indent=1))
    lines = ["# Self-distillation throughput: batches in prompt order against length order", "",
             f"SmolLM2-135M-Instruct, this CPU, greedy, {len(ids)} of the recipe's self-instruct and "
             f"passage prompts ({report['prompt_tokens']} prompt tokens), batch {args.batch}, "
             f"{args.max_new_tokens} new tokens; tokens/s exclude compilation.", "",
             "| run | order | generated tokens | prefilled tokens (padded) | wall s | compile s | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['order']} | {r['tokens']} | {r['prefilled_tokens']} | {r['wall_s']} "
                     f"| {r['compile_s']} | {r['tokens_per_s']} |")
    (out / "selfdistill_length_order.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
