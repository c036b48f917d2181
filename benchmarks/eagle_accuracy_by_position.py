"""Where the shipped Eagle's held-out accuracy is lost: by category, by position in the sequence,
and against its own confidence (the value sizing reads).

Usage: python benchmarks/eagle_accuracy_by_position.py

The target (SmolLM2-135M-Instruct, float32) answers the chat benchmark's held-out prompts
greedily (128 new tokens); the shipped Eagle is scored teacher-forced on those answers: step-1
top-1 agreement with the target's greedy token, answer positions only, per category and per
128-position bucket of the sequence. A second column runs the drafter with its attention limited
to the last 131 positions (its training window, `FeatureBatches(length=128)` + 3): if long contexts
were out of distribution for its attention, that column would be higher at later positions.
A third table bins the drafter's confidence in its top-1 token (its softmax probability over the
head tokens) and gives the top-1 hit rate per bin, overall and per category: how far a per-row
scale (hits / claimed, `costs.calibrated_confidence`) is from a per-confidence calibration.
Deterministic (no timing). Writes eagle_accuracy_by_position.{json,md}.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

WINDOW = 131   # FeatureBatches(length=128) windows: 128 + 3 tokens
CHUNK = 32
CONF_BINS = [0.0, 0.2, 0.4, 0.6, 0.8]   # lower edges


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    import jaxspec as js
    from jaxspec.bench.chat_bench import load_prompts
    from jaxspec.bench.report import markdown_table, write_report
    from jaxspec.speculative.default import shipped_drafter
    from jaxspec.speculative.drafters.eagle import draft_features, head_logits, head_rows
    from jaxspec.train.eagle import compute_features, step_one

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eagle_generalisation import answers

    start = time.perf_counter()
    target = js.load("smollm2-135m-instruct")
    drafter = shipped_drafter(target, "eagle")
    prompts = load_prompts(code=True)
    seqs = answers(target, [c for _, _, c in prompts])
    items = compute_features(target, seqs, labels=True, log=lambda *_: None)
    ids = drafter.params["head_ids"]
    head, embed = head_rows(target.params, ids), target.params["embed"]
    to_head = np.full(target.config.vocab_size, -1)
    to_head[np.asarray(ids)] = np.arange(len(ids))

    @jax.jit
    def predict(params, tokens, feats):                       # [1, T + 2] -> [1, T] head index
        t = tokens.shape[1] - 2
        x1 = draft_features(params, drafter.config, feats[:, :t], embed[tokens[:, 1:t + 1]])
        h1, _ = step_one(params, drafter.config, x1, jnp.arange(t)[None])
        probs = jax.nn.softmax(head_logits(head, h1), -1)
        return jnp.argmax(probs, -1), jnp.max(probs, -1)

    def run(tokens, feats, with_confidence=False):
        best, conf = predict(drafter.params, jnp.asarray(tokens)[None],
                             jnp.asarray(feats, jnp.float32)[None])
        best, conf = np.asarray(best)[0], np.asarray(conf)[0]
        return (best, conf) if with_confidence else best

    def windowed(tokens, feats):
        """Each chunk of CHUNK predictions made from at most WINDOW positions of context."""
        t = len(tokens) - 2
        out = np.zeros(t, np.int64)
        for e in range(0, t, CHUNK):
            s = max(0, e + CHUNK - WINDOW)
            part = run(tokens[s:e + CHUNK + 2], feats[s:e + CHUNK + 2])
            out[e:e + CHUNK] = part[e - s:e - s + CHUNK][:len(out[e:e + CHUNK])]
        return out

    hits = {"category": defaultdict(lambda: ([], [])), "position": defaultdict(lambda: ([], []))}
    by_conf = defaultdict(lambda: ([], []))        # (category or "all", bin) -> (confidences, hits)
    for (tokens, feats, labels), (_, p), (_, category, _) in zip(items, seqs, prompts):
        (full, conf), short = run(tokens, feats, with_confidence=True), windowed(tokens, feats)
        for q in range(max(p - 1, 0), len(tokens) - 2):      # predicts labels[q + 1], an answer token
            label = to_head[labels[q + 1]]
            for key, group in ((category, "category"),
                               (f"{128 * min(q // 128, 3)}-", "position")):
                hits[group][key][0].append(full[q] == label)
                hits[group][key][1].append(short[q] == label)
            for key in ("all", category):
                low = [b for b in CONF_BINS if conf[q] >= b][-1]
                by_conf[(key, low)][0].append(float(conf[q]))
                by_conf[(key, low)][1].append(full[q] == label)
    results = {group: {key: {"positions": len(a), "top1": round(float(np.mean(a)), 4),
                             "top1_window": round(float(np.mean(b)), 4)}
                       for key, (a, b) in table.items()}
               for group, table in hits.items()}
    results["confidence"] = {f"{key} {low:.1f}": {"positions": len(c),
                                                   "confidence": round(float(np.mean(c)), 4),
                                                   "top1": round(float(np.mean(h)), 4)}
                             for (key, low), (c, h) in sorted(by_conf.items())}
    lines = ["# The shipped Eagle's held-out accuracy by category and by position", "",
             "Written by `python benchmarks/eagle_accuracy_by_position.py` (SmolLM2-135M-Instruct, "
             f"float32, greedy answers of 128 new tokens to the {len(prompts)} chat benchmark "
             "prompts; teacher-forced step-1 top-1, answer positions only; window: attention "
             f"limited to the last {WINDOW} positions, the training window).", ""]
    for group, label in (("category", "category"), ("position", "position in the sequence")):
        lines += markdown_table([label, "positions", "top-1", f"top-1, window {WINDOW}"],
                                [[k, v["positions"], f"{v['top1']:.3f}", f"{v['top1_window']:.3f}"]
                                 for k, v in sorted(results[group].items())])
        lines.append("")
    groups = ["all"] + sorted(results["category"])
    lines += ["Top-1 hit rate by the drafter's confidence (mean confidence -> hit rate, positions):", ""]
    lines += markdown_table(
        ["confidence"] + groups,
        [[f"[{low:.1f}, {high:.1f})"] + [
            (lambda e: f"{e['confidence']:.2f} -> {e['top1']:.2f} ({e['positions']})" if e else "-")(
                results["confidence"].get(f"{g} {low:.1f}")) for g in groups]
         for low, high in zip(CONF_BINS, CONF_BINS[1:] + [1.0])])
    lines.append("")
    write_report(Path("benchmarks"), "eagle_accuracy_by_position",
                 dict(results=results, window=WINDOW, prompts=len(prompts),
                      seconds=round(time.perf_counter() - start, 1),
                      date=time.strftime("%Y-%m-%d")), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
