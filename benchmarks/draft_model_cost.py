"""What a distilled draft model (FastDraft) would cost per token beside SmolLM2-135M on this CPU.

Usage: python benchmarks/draft_model_cost.py

A FastDraft-style draft for SmolLM2-135M-Instruct shares its tokenizer (and, to stay small, its
576-wide embedding). Its per-token cost sets how many tokens per round it must get accepted to
pay, whatever it is trained on. This script measures it with random weights (the cost does not
depend on them): one-token forwards against a 256-token cache (`jaxspec.speculative.costs
.measure`, the timing the loop's sizing uses), for 1, 2 and 4 layers of SmolLM2's layer shape,
with the full 49152-token head and with an 8192-token VocabTrim head. The target's own curve is
measured in the same process. For a chain of k draft tokens a round costs k draft forwards plus
one target forward of k + 1 tokens; the table gives the tokens a round must commit beyond the
target's own to break even (round / step - 1). Writes draft_model_cost.{json,md}.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path


def main(argv=None) -> int:
    import jaxspec as js
    from jaxspec.bench.report import markdown_table, write_report
    from jaxspec.models.transformer import create
    from jaxspec.speculative.costs import measure

    target = js.load("smollm2-135m-instruct")
    curve = measure(target, 1, (1, 2, 3, 4, 5))
    step = dict(zip(curve.sizes, curve.ms))
    rows, data = [], []
    for layers in (1, 2, 4):
        for head in (8192, target.config.vocab_size):
            config = dataclasses.replace(target.config, num_layers=layers, vocab_size=head,
                                         tie_word_embeddings=True)
            draft = create(config, key=0)
            ms = measure(draft, 1, (1,)).ms[0]
            entry = {"layers": layers, "head_tokens": head, "ms_per_token": round(ms, 2)}
            for k in (2, 3, 4):
                round_ms = k * ms + step[k + 1]
                entry[f"break_even_k{k}"] = round(round_ms / step[1] - 1, 2)
            data.append(entry)
            rows.append([layers, head, f"{ms:.2f}", f"{ms / step[1]:.2f}"]
                        + [f"{entry[f'break_even_k{k}']:.2f}" for k in (2, 3, 4)])
    lines = ["# A distilled draft model's cost beside SmolLM2-135M-Instruct (this CPU)", "",
             f"Written by `python benchmarks/draft_model_cost.py` ({time.strftime('%Y-%m-%d')}; "
             "random weights, float32, batch 1, one-token forwards against a 256-token cache, "
             "medians of 5 interleaved runs). Target forward, ms for T = 1..5 new tokens: "
             + ", ".join(f"{v:.1f}" for v in curve.ms) + ".", "",
             "Break-even: tokens a round of k draft tokens must commit beyond the target's own "
             "bonus token to match plain decoding (k draft forwards + a (k + 1)-token verify, over "
             "one plain step, minus 1).", ""]
    lines += markdown_table(["draft layers", "head tokens", "ms per draft token", "x target step",
                             "break-even k=2", "break-even k=3", "break-even k=4"], rows)
    write_report(Path("benchmarks"), "draft_model_cost",
                 dict(target_ms=step, drafts=data, date=time.strftime("%Y-%m-%d")), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
