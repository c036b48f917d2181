"""`jaxspec train eagle --target NAME`: self-distil, cache features, train and export an Eagle.

Stages (each resumes from what is already in --work):
  1. corpus    the target's greedy answers to offline prompts (jaxspec.train.prompts), in shards
  1b. requests  (--self-instruct N) N user requests the target writes itself by continuing lists
               of example requests (requests.json), and --passages prompts that summarize,
               answer from or translate paragraphs of the stage-1 answers; their greedy answers
               form a second corpus (corpus_si), for diversity the templates lack
  2. features  the target's final hidden states and greedy tokens on every corpus sequence
               (features.npz), and on docstring conversations it did not write (documents.npz)
  3. train     jaxspec.train.eagle's loss through trainer.train (orbax checkpoints, exact resume)
  4. export    Eagle.save(--out) with a model card (data, steps, held-out accuracy, timings)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


# Stage 1b generates at a larger batch (short, sampled requests; answers as long as the chat
# benchmark's 128 tokens).
SI_BATCH = 64
SI_MAX_NEW_TOKENS = 128


def _save_features(path: Path, items) -> None:
    """(tokens, bfloat16 features, greedy labels) per sequence, concatenated into one .npz."""
    lengths = np.asarray([len(it[0]) for it in items], np.int64)
    tokens = np.concatenate([it[0] for it in items]).astype(np.int32)
    feats = np.concatenate([it[1] for it in items]).view(np.uint16)
    labels = np.concatenate([it[2] for it in items]).astype(np.int32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, lengths=lengths, tokens=tokens, features=feats, labels=labels)
    tmp.rename(path)


def _load_features(path: Path):
    import ml_dtypes

    data = np.load(path)
    lengths, tokens, labels = data["lengths"], data["tokens"], data["labels"]
    feats = data["features"].view(ml_dtypes.bfloat16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [(tokens[offsets[i]:offsets[i + 1]], feats[offsets[i]:offsets[i + 1]],
             labels[offsets[i]:offsets[i + 1]]) for i in range(len(lengths))]


def _self_instruct_prompts(target, seqs, n_requests: int, n_passages: int, work: Path,
                           batch_size: int) -> list:
    """Stage 1b's prompts: self-instructed requests plus prompts over stage-1 answer paragraphs,
    shuffled with a fixed seed (written to prompts_si.json)."""
    import random

    from jaxspec.train.prompts import passage_prompts
    from jaxspec.train.selfdistill import sample_requests

    requests = sample_requests(target, n_requests, work / "requests.json", batch_size=batch_size,
                               log=lambda s: print(s, flush=True)) if n_requests else []
    passages = []
    for tokens, p in seqs:
        text = target.tokenizer.decode(tokens[p:].tolist(), skip_special_tokens=True)
        passages += [q.strip() for q in text.split("\n\n") if 200 <= len(q.strip()) <= 900]
    prompts = [[{"role": "user", "content": r}] for r in requests]
    if n_passages:
        prompts += passage_prompts(passages, n_passages, seed=5)
    random.Random(7).shuffle(prompts)
    (work / "prompts_si.json").write_text(json.dumps(prompts))
    return prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxspec train eagle")
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--work", default="eagle_work")
    parser.add_argument("--out", default=None, help="export directory (default WORK/export)")
    parser.add_argument("--prompts", type=int, default=640)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--self-instruct", type=int, default=0,
                        help="also answer this many requests the target writes itself")
    parser.add_argument("--passages", type=int, default=0,
                        help="also answer this many summarization / passage-QA / translation "
                             "prompts over paragraphs of the stage-1 answers")
    parser.add_argument("--corpus-only", action="store_true", help="stop after stage 1")
    parser.add_argument("--max-shards", type=int, default=None, help="use at most this many shards")
    parser.add_argument("--documents", type=int, default=800,
                        help="extra training conversations whose answers are standard-library "
                             "docstrings (read by the target, labelled with its greedy tokens)")
    parser.add_argument("--head-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--num-tokens", type=int, default=5, help="default chain length saved")
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    import jaxspec as js
    from jaxspec.speculative.drafters.eagle import Eagle
    from jaxspec.train import eagle as eagle_train
    from jaxspec.train.prompts import build_prompts
    from jaxspec.train.selfdistill import generate_corpus, read_corpus
    from jaxspec.train.trainer import TrainConfig, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        (work / "timings.json").write_text(json.dumps(timings, indent=1))
        return out

    print(f"loading {args.target}", flush=True)
    target = js.load(args.target)
    stops = [t for t in target.config.eos_token_ids]
    corpus_dir = work / "corpus"
    prompts = build_prompts(args.prompts, seed=0)
    if not (corpus_dir / "done.json").exists():
        n = None if args.max_shards is None else args.max_shards * args.gen_batch
        stage("corpus", lambda: generate_corpus(target, prompts[:n] if n else prompts, corpus_dir,
                                                batch_size=args.gen_batch,
                                                max_new_tokens=args.max_new_tokens,
                                                stop_tokens=stops, log=lambda s: print(s, flush=True)))
    seqs = read_corpus(corpus_dir)
    if args.max_shards is not None:
        seqs = seqs[:args.max_shards * args.gen_batch]
    corpora = [("features.npz", seqs)]
    if args.self_instruct or args.passages:
        si_dir = work / "corpus_si"
        if not (si_dir / "done.json").exists():
            si_prompts = stage("requests", lambda: _self_instruct_prompts(
                target, seqs, args.self_instruct, args.passages, work, SI_BATCH))
            stage("corpus_si", lambda: generate_corpus(
                target, si_prompts, si_dir, batch_size=SI_BATCH, max_new_tokens=SI_MAX_NEW_TOKENS,
                stop_tokens=stops,
                log=lambda s: print(s, flush=True)))
        corpora.append(("features_si.npz", read_corpus(si_dir)))
    if args.corpus_only:
        return 0
    train_items, eval_items, train_seqs = [], [], []
    for name, corpus in corpora:  # held out: the last 5% of each corpus
        feat_file = work / name
        if feat_file.exists():
            items = _load_features(feat_file)
        else:
            items = stage("features", lambda: eagle_train.compute_features(
                target, corpus, max_len=args.window * 3, log=lambda s: print(s, flush=True),
                labels=True))
            _save_features(feat_file, items)
        n_eval = max(1, len(items) // 20)
        train_items += items[:-n_eval]
        eval_items += items[-n_eval:]
        train_seqs += corpus[:len(items) - n_eval]
    seqs = train_seqs
    # VocabTrim: the most frequent tokens the target itself says in its answers.
    head_ids = eagle_train.head_token_ids(
        [(it[0][p:],) for it, (_, p) in zip(train_items, seqs)],
        target.config.vocab_size, args.head_tokens, always=stops)
    if args.documents:
        doc_file = work / "documents.npz"
        if doc_file.exists():
            docs = _load_features(doc_file)
        else:
            from jaxspec.train.prompts import document_conversations
            from jaxspec.chat import encode_conversation  # noqa: F401 (templates checked there)

            convs = document_conversations(args.documents)
            doc_seqs = []
            for conv in convs:
                ids = target.tokenizer.apply_chat_template(conv, add_generation_prompt=False)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                doc_seqs.append((np.asarray(ids, np.int32), 0))
            docs = stage("document_features", lambda: eagle_train.compute_features(
                target, doc_seqs, max_len=args.window * 3, log=lambda s: print(s, flush=True),
                labels=True))
            _save_features(doc_file, docs)
        train_items = train_items + docs
    print(f"{len(train_items)} train / {len(eval_items)} held-out sequences, "
          f"{sum(len(it[0]) for it in train_items)} train tokens; head {len(head_ids)} tokens", flush=True)

    drafter = Eagle.create(target, num_tokens=args.num_tokens, head_tokens=args.head_tokens)
    params = dict(drafter.params, head_ids=jnp.asarray(head_ids))
    data = eagle_train.FeatureBatches(train_items, length=args.window, batch_size=args.batch_size)
    held = eagle_train.FeatureBatches(eval_items, length=args.window, batch_size=args.batch_size)
    eval_batches = [held.batch(i * args.batch_size)[0]
                    for i in range(min(8, max(1, len(held.windows) // args.batch_size)))]
    from jaxspec.speculative.drafters.eagle import head_rows
    loss = eagle_train.make_loss(drafter.config, target.params["embed"], jnp.asarray(head_ids),
                                 head=head_rows(target.params, jnp.asarray(head_ids)))

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
    for it, (_, p) in zip(train_items, seqs):
        np.add.at(counts, it[0][p:], 1)
    order = np.argsort(-counts[head_ids], kind="stable").astype(np.int32)
    final = dict(result.params, head_ids=jnp.asarray(head_ids), head_order=jnp.asarray(order))
    trained = Eagle(params=final, config=drafter.config, num_tokens=args.num_tokens,
                    target_fingerprint=drafter.target_fingerprint)
    evals = result.evals[-1][1] if result.evals else {}
    out = Path(args.out) if args.out else work / "export"
    card = {"target": args.target, "prompts": len(seqs), "documents": args.documents,
            "train_sequences": len(train_items),
            "train_tokens": int(sum(len(it[0]) for it in train_items)), "steps": result.step,
            "finished": result.finished, "head_tokens": int(len(head_ids)),
            "held_out": {k: round(float(v), 4) for k, v in evals.items()},
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "command": "jaxspec train eagle " + " ".join(argv or [])}
    trained.save(out, extra={"training": card})
    print(json.dumps(card, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
