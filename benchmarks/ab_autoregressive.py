"""Autoregressive js.generate on SmolLM2-135M-Instruct, for A/B runs of two jaxspec checkouts.

Usage: PYTHONPATH=CHECKOUT python benchmarks/ab_autoregressive.py BATCH ar|default

Eight held-out chat prompts (every fourth of jaxspec/bench/prompts/specbench_like.jsonl), 128 new
tokens, greedy; prints tokens per second of wall time (prefill included), the best of two passes
after a compiling one. Two checkouts cannot share a process, so alternate them (old, new, old,
new) and compare within a batch size; `benchmarks/ab_autoregressive.md` holds one such run.
"""
import json
import sys
import time
from pathlib import Path

import jaxspec as js
print("jaxspec from", js.__file__, file=sys.stderr)
batch, method = int(sys.argv[1]), sys.argv[2]
target = js.load("smollm2-135m-instruct")
rows = [json.loads(l) for l in open(Path(js.__file__).parent / "bench" / "prompts" / "specbench_like.jsonl")]
msgs = [r["messages"] for r in rows[::4]][:8]
drafter = None if method == "ar" else js.default_drafter(target)
def run():
    tokens, secs = 0, 0.0
    for i in range(0, len(msgs), batch):
        t = time.perf_counter()
        out = js.generate(target, msgs[i:i + batch], max_new_tokens=128, drafter=drafter)
        secs += time.perf_counter() - t
        tokens += int(out.lengths.sum())
    return tokens, secs
run()  # compile
best = min(run()[1] for _ in range(2))
tokens, _ = run()
print(f"RESULT batch={batch} method={method} tokens={tokens} s={best:.2f} tok/s={tokens / best:.1f}")
