"""`jaxspec train eagle --target NAME`: self-distil, cache features, train and export an Eagle.

Stages (each resumes from what is already in --work):
  1-2. corpus, self-instruct corpus, features: jaxspec/train/recipes/features.py (shared with
       `jaxspec train medusa`)
  2b. reading (--documents N) features on conversations whose answers are local texts the target
      did not write (jaxspec.train.reading: docstrings, package READMEs, the Python reference,
      standard-library code), labelled with the target's greedy tokens
  3. train     jaxspec.train.eagle's loss through trainer.train (orbax checkpoints, exact resume)
  4. export    Eagle.save(--out) with a model card (data, steps, held-out accuracy, timings)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jaxspec.train.recipes.features import add_data_arguments, documents, start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxspec train eagle")
    add_data_arguments(parser)
    parser.add_argument("--work", default="eagle_work")
    parser.add_argument("--out", default=None, help="export directory (default WORK/export)")
    parser.add_argument("--documents", type=int, default=800,
                        help="extra training conversations whose answers are local texts "
                             "(docstrings, package READMEs, the Python reference, standard-library "
                             "code; read by the target, labelled with its greedy tokens)")
    parser.add_argument("--head-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--num-tokens", type=int, default=5, help="default chain length saved")
    parser.add_argument("--soft-labels", action="store_true",
                        help="classify against the target's distribution over the head tokens "
                             "(EAGLE's reference loss) instead of its greedy token")
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from jaxspec.speculative.drafters.eagle import Eagle
    from jaxspec.train import eagle as eagle_train
    from jaxspec.train.trainer import TrainConfig, train

    target, work, stage, prepared = start(args)
    timings = stage.timings
    if prepared is None:
        return 0
    stops = list(target.config.eos_token_ids)
    train_items, eval_items, seqs, eval_seqs = prepared
    n_sequences = len(train_items) + len(eval_items)
    docs = documents(target, args.documents, args.window, work, stage)
    train_items = train_items + docs
    doc_starts = [(None, 0)] * len(docs)  # its labels everywhere: prompts are a small share
    # VocabTrim: the tokens the target itself says most often, counted over its greedy labels on
    # the answers of every training sequence (its own answers and the reading data).
    answers = [(it[2][p:],) for it, (_, p) in zip(train_items, seqs + doc_starts)]
    head_ids = eagle_train.head_token_ids(answers, target.config.vocab_size, args.head_tokens,
                                          always=stops)
    print(f"{len(train_items)} train / {len(eval_items)} held-out sequences, "
          f"{sum(len(it[0]) for it in train_items)} train tokens; head {len(head_ids)} tokens", flush=True)

    drafter = Eagle.create(target, num_tokens=args.num_tokens, head_tokens=args.head_tokens)
    params = dict(drafter.params, head_ids=jnp.asarray(head_ids))
    data = eagle_train.FeatureBatches(train_items, length=args.window, batch_size=args.batch_size)
    # Held out: the target's answers only (a fixed system prompt would flatter the scores).
    held = eagle_train.FeatureBatches(eval_items, length=args.window, batch_size=args.batch_size,
                                      starts=[p for _, p in eval_seqs])
    eval_batches = [held.batch(i * args.batch_size)[0]
                    for i in range(min(8, max(1, len(held.windows) // args.batch_size)))]
    from jaxspec.speculative.drafters.eagle import head_rows
    loss = eagle_train.make_loss(drafter.config, target.params["embed"], jnp.asarray(head_ids),
                                 head=head_rows(target.params, jnp.asarray(head_ids)),
                                 soft_labels=args.soft_labels,
                                 logit_softcap=target.config.final_logit_softcap)

    def loss_fn(p, batch):  # head_ids are data, not trained
        return loss(dict(p, head_ids=jnp.asarray(head_ids)), batch)

    trainable = {k: v for k, v in params.items() if k != "head_ids"}
    cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=min(50, args.steps // 10),
                      max_steps=args.steps, weight_decay=0.0, checkpoint_every=100, eval_every=200,
                      log_every=10, max_minutes=args.minutes)
    result = stage("train", lambda: train(trainable, drafter.config, data, cfg, loss_fn=loss_fn,
                                          eval_batches=eval_batches, checkpoint_dir=work / "ckpt",
                                          name="eagle"))
    # head_order: head positions by descending frequency, so a smaller VocabTrim head can be cut
    # from this one without retraining (jaxspec.bench.chat_bench.trimmed).
    counts = np.zeros(target.config.vocab_size, np.int64)
    for (labels,) in answers:
        np.add.at(counts, labels, 1)
    order = np.argsort(-counts[head_ids], kind="stable").astype(np.int32)
    final = dict(result.params, head_ids=jnp.asarray(head_ids), head_order=jnp.asarray(order))
    trained = Eagle(params=final, config=drafter.config, num_tokens=args.num_tokens,
                    target_fingerprint=drafter.target_fingerprint)
    evals = result.evals[-1][1] if result.evals else {}
    out = Path(args.out) if args.out else work / "export"
    card = {"target": args.target, "sequences": n_sequences, "documents": len(doc_starts),
            "train_sequences": len(train_items),
            "train_tokens": int(sum(len(it[0]) for it in train_items)), "steps": result.step,
            "finished": result.finished, "head_tokens": int(len(head_ids)),
            "labels": "soft" if args.soft_labels else "greedy",
            "held_out": {k: round(float(v), 4) for k, v in evals.items()},
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "command": "jaxspec train eagle " + " ".join(argv or [])}
    trained.save(out, extra={"training": card})
    print(json.dumps(card, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
