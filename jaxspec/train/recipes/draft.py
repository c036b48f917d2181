"""`jaxspec train draft --target NAME`: distil a small draft model (FastDraft) for js.DraftModel.

The draft has the target's layer shape and `--layers` decoder layers, initialised as copies of
the target's layers (`--init-layers`); it shares the target's token embedding, and its head is
VocabTrim's: the target's LM-head rows of the `--head-tokens` ids the target says most often in
its own answers. It learns the target's next-token distribution over those ids
(jaxspec.train.distill.feature_kl_loss) on the target's own answers and the reading data, from
the cached features the Eagle recipe writes (so, given the same --work, no target forward runs).

Stages (each resumes from what is already in --work):
  1-2b. corpus, self-instruct corpus, features, documents: jaxspec/train/recipes/features.py
  3. train   through trainer.train (orbax checkpoints in WORK/draft_ckpt, exact resume)
  4. export  DraftModel.save(--out): its own layers, final norm and head ids (a few MB), with
             the training card
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxspec.train.recipes.features import add_data_arguments, documents, start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxspec train draft")
    add_data_arguments(parser)
    parser.add_argument("--work", default="draft_work")
    parser.add_argument("--out", default=None, help="export directory (default WORK/draft_export)")
    parser.add_argument("--documents", type=int, default=800,
                        help="extra training conversations whose answers are local texts")
    parser.add_argument("--init-layers", default="0,1",
                        help="the target layers the draft's layers start from (comma-separated; "
                             "their count is the draft's depth)")
    parser.add_argument("--head-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=256, help="training window in tokens")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--num-tokens", type=int, default=3, help="default chain length saved")
    args = parser.parse_args(argv)
    try:
        layers = tuple(int(x) for x in args.init_layers.split(","))
    except ValueError:
        parser.error(f"--init-layers is a comma-separated list of target layers, got "
                     f"{args.init_layers!r}")

    import functools

    import jax.numpy as jnp

    import jaxspec as js
    from jaxspec.models.transformer import Model
    from jaxspec.speculative.drafters.eagle import fingerprint
    from jaxspec.train import eagle as eagle_train
    from jaxspec.train.distill import draft_from_target, feature_kl_loss
    from jaxspec.train.trainer import TrainConfig, train

    target, work, stage, prepared = start(args)
    if prepared is None:
        return 0
    stops = list(target.config.eos_token_ids)
    train_items, eval_items, seqs, eval_seqs = prepared
    docs = documents(target, args.documents, args.window, work, stage)
    starts = [p for _, p in seqs] + [0] * len(docs)
    train_items = train_items + docs
    # VocabTrim over the target's greedy labels on the answers (as the Eagle recipe counts).
    answers = [(it[2][p:],) for it, p in zip(train_items, starts)]
    head_ids = eagle_train.head_token_ids(answers, target.config.vocab_size, args.head_tokens,
                                          always=stops)
    config, own, shared, head = draft_from_target(target.params, target.config, layers, head_ids)
    print(f"{len(train_items)} train / {len(eval_items)} held-out sequences, "
          f"{sum(len(it[0]) for it in train_items)} train tokens; draft of {len(layers)} layers "
          f"from target layers {layers}, head {len(head_ids)} tokens", flush=True)

    data = eagle_train.FeatureBatches(train_items, length=args.context, batch_size=args.batch_size)
    held = eagle_train.FeatureBatches(eval_items, length=args.context, batch_size=args.batch_size,
                                      starts=[p for _, p in eval_seqs])  # answers only
    eval_batches = [held.batch(i * args.batch_size)[0]
                    for i in range(min(8, max(1, len(held.windows) // args.batch_size)))]
    loss_fn = functools.partial(feature_kl_loss, config=config, shared=shared, head=head,
                                head_ids=jnp.asarray(head_ids), ce_weight=args.ce_weight)
    cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr,
                      warmup_steps=min(50, args.steps // 10), max_steps=args.steps,
                      weight_decay=0.0, checkpoint_every=100, eval_every=200, log_every=10,
                      max_minutes=args.minutes)
    result = stage("train_draft", lambda: train(own, config, data, cfg, loss_fn=loss_fn,
                                                eval_batches=eval_batches,
                                                checkpoint_dir=work / "draft_ckpt", name="draft"))
    params = dict(result.params, embed=shared["embed"], lm_head={"kernel": head.T})
    drafter = js.DraftModel(Model(config=config, params=params, tokenizer=target.tokenizer),
                            num_tokens=args.num_tokens, head_ids=jnp.asarray(head_ids))
    evals = result.evals[-1][1] if result.evals else {}
    card = {"target": args.target, "init_layers": list(layers),
            "train_sequences": len(train_items), "documents": len(docs),
            "train_tokens": int(sum(len(it[0]) for it in train_items)), "steps": result.step,
            "finished": result.finished, "head_tokens": int(len(head_ids)),
            "held_out": {k: round(float(v), 4) for k, v in evals.items()},
            "timings_s": {k: round(v, 1) for k, v in stage.timings.items()},
            "command": "jaxspec train draft " + " ".join(argv or [])}
    out = Path(args.out) if args.out else work / "draft_export"
    drafter.save(out, extra={"training": card}, target_fingerprint=fingerprint(target))
    print(json.dumps(card, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
