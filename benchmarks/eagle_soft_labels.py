"""Soft or hard labels for an Eagle drafter on SmolLM2-135M? An A/B from the shipped Eagle.

Usage: python benchmarks/eagle_soft_labels.py --work DIR --data E3_WORK [--steps 1000]

jaxspec's Eagle recipe classifies each drafted feature as the target's greedy token
(`jaxspec.train.eagle.make_loss`). EAGLE's and EAGLE-3's reference trainers classify it against
the target's whole distribution, softmax(LM head(f)), a soft label that also says how sure the
target was and what it would say instead. Both arms start from the shipped Eagle and fine-tune
for the same steps on the same data (the shipped recipe's self-distilled answers, `features.npz`
and `features_si.npz` of its work directory, the held-out 5% of each left out; the data, seed,
steps and learning rate of `eagle3_fused_features.py`, so its "last" arm is this "hard" arm):

  * hard   the shipped loss: smooth-L1 on the feature + 0.5 x cross-entropy on the greedy token;
  * soft   the same with the cross-entropy taken against the target's distribution over the
           drafter's 8192 head tokens (`make_loss(..., soft_labels=True)`).

Score: teacher-forced top-k agreement with the target's greedy token (step 1; top-1 at step 2)
and the cross-entropy on that token, on the target's greedy answers to the chat benchmark's
held-out prompts, answer positions only. Deterministic, no timing. Writes eagle_soft_labels.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from jaxspec.bench.report import markdown_table, write_report
    from jaxspec.train.eagle import make_loss

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eagle3_fused_features import (ab_parser, ab_start, fine_tune_arm, make_fused_loss,
                                       shipped_params)

    parser = ab_parser(__doc__.splitlines()[0], 1000)
    parser.add_argument("--arms", default="soft,hard")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ab = ab_start(Path(args.data))
    shipped, seqs = ab["shipped"], ab["seqs"]
    print(f"{len(ab['items'])} train sequences, {sum(len(it[0]) for it in ab['items'])} tokens",
          flush=True)
    # Scored the same way for both arms: the greedy token's top-k and cross-entropy.
    scoring = make_fused_loss(shipped.config, ab["embed"], ab["head_ids"], ab["head"],
                              fused=False, d=ab["target"].config.hidden_size)

    results = {}
    for arm in args.arms.split(","):
        loss = make_loss(shipped.config, ab["embed"], ab["head_ids"], head=ab["head"],
                         soft_labels=arm == "soft")
        results[arm] = fine_tune_arm(arm, loss, scoring, shipped_params(shipped), ab["items"],
                                     ab["held"], seqs, shipped.config, args, work)

    cols = ["top1_1", "top2_1", "top3_1", "top4_1", "top1_2", "ce1"]
    first = next(iter(results.values()))
    lines = ["# Soft or hard labels for the Eagle drafter on SmolLM2-135M: an A/B from the shipped Eagle", "",
             f"Written by `python benchmarks/eagle_soft_labels.py` ({time.strftime('%Y-%m-%d')}, "
             f"{args.steps} fine-tuning steps per arm at batch {args.batch_size} x 128, peak lr "
             f"{args.lr}; held out: the target's greedy answers to the {len(seqs)} chat benchmark "
             "prompts, answer positions only; teacher-forced top-k agreement with the target's "
             "greedy token at draft step 1, top-1 at step 2, cross-entropy on that token).", ""]
    rows = [["shipped (start of every arm)"] + [f"{first['before'][c]:.4f}" for c in cols]]
    rows += [[f"{arm} after {r['steps']} steps"] + [f"{r['after'][c]:.4f}" for c in cols]
             for arm, r in results.items()]
    lines += markdown_table(["drafter", "top-1 step 1", "top-2 step 1", "top-3 step 1",
                             "top-4 step 1", "top-1 step 2", "CE step 1"], rows)
    write_report(Path(args.out), "eagle_soft_labels",
                 dict(results=results, steps=args.steps, lr=args.lr, held_out_prompts=len(seqs),
                      seconds=round(time.perf_counter() - started, 1),
                      date=time.strftime("%Y-%m-%d")), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
