"""`jaxspec train medusa --target NAME`: Medusa-1 heads on the target's cached hidden states.

Stages (each resumes from what is already in --work; point --work at an Eagle recipe's work
directory to reuse its corpora and features):
  1-2. corpus, self-instruct corpus, features: jaxspec/train/recipes/features.py
  3. train     jaxspec.train.medusa's loss (per-head cross-entropy, decay 0.8) through
               trainer.train (orbax checkpoints, exact resume). The heads share the target's
               frozen LM-head rows of the V' most frequent answer tokens (VocabTrim), so only the
               K residual blocks are trained and shipped.
  4. export    Medusa.save(--out) with a model card (data, steps, held-out per-head top-1, timings)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from jaxspec.train.recipes.features import add_data_arguments, start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxspec train medusa")
    add_data_arguments(parser)
    parser.add_argument("--work", default="medusa_work")
    parser.add_argument("--out", default=None, help="export directory (default WORK/medusa_export)")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from jaxspec.speculative.drafters.eagle import head_rows
    from jaxspec.speculative.drafters.medusa import Medusa
    from jaxspec.train import eagle as eagle_train
    from jaxspec.train import medusa as medusa_train
    from jaxspec.train.trainer import TrainConfig, train

    target, work, stage, prepared = start(args)
    if prepared is None:
        return 0
    stops = list(target.config.eos_token_ids)
    train_items, eval_items, seqs, eval_seqs = prepared
    head_ids = eagle_train.head_token_ids(
        [(it[0][p:],) for it, (_, p) in zip(train_items, seqs)],
        target.config.vocab_size, args.head_tokens, always=stops)
    pairs = lambda items: [(it[0], it[1]) for it in items]  # noqa: E731 (tokens, features)
    data = medusa_train.MedusaBatches(pairs(train_items), num_heads=args.heads,
                                      length=args.window, batch_size=args.batch_size)
    # Held out: labels inside the target's answers only (a fixed system prompt would flatter it).
    held = medusa_train.MedusaBatches(pairs(eval_items), num_heads=args.heads,
                                      length=args.window, batch_size=args.batch_size,
                                      starts=[p for _, p in eval_seqs])
    eval_batches = [held.batch(i * args.batch_size)[0]
                    for i in range(min(8, max(1, len(held.windows) // args.batch_size)))]
    print(f"{len(train_items)} train / {len(eval_items)} held-out sequences, "
          f"{sum(len(it[0]) for it in train_items)} train tokens; {args.heads} heads over "
          f"{len(head_ids)} head tokens", flush=True)

    drafter = Medusa.create(target, num_heads=args.heads, head_tokens=head_ids, shared_head=True)
    rows = head_rows(target.params, jnp.asarray(drafter.params["head_ids"]))          # [V', D]
    loss = medusa_train.make_loss(drafter.config, drafter.params["head_ids"], lm_head=rows)
    cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr,
                      warmup_steps=min(50, args.steps // 10), max_steps=args.steps,
                      weight_decay=0.0, checkpoint_every=100, eval_every=200, log_every=10,
                      max_minutes=args.minutes)
    result = stage("train_medusa", lambda: train(
        medusa_train.trainable(drafter.params), drafter.config, data, cfg, loss_fn=loss,
        eval_batches=eval_batches, checkpoint_dir=work / "ckpt_medusa", name="medusa"))
    trained = drafter.replace(params=dict(result.params, head_ids=drafter.params["head_ids"]))
    evals = result.evals[-1][1] if result.evals else {}
    out = Path(args.out) if args.out else work / "medusa_export"
    card = {"target": args.target, "sequences": len(train_items) + len(eval_items),
            "train_sequences": len(train_items),
            "train_tokens": int(sum(len(it[0]) for it in train_items)), "steps": result.step,
            "finished": result.finished, "heads": args.heads, "head_tokens": int(len(head_ids)),
            "held_out": {k: round(float(v), 4) for k, v in evals.items()},
            "timings_s": {k: round(v, 1) for k, v in stage.timings.items()},
            "command": "jaxspec train medusa " + " ".join(argv or [])}
    trained.save(out, extra={"training": card})
    print(json.dumps(card, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
