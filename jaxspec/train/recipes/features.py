"""The data stages every recipe over target features shares (`jaxspec train eagle|medusa|draft`).

Each stage resumes from what is already in the work directory:
  1. corpus    the target's greedy answers to offline prompts (jaxspec.train.prompts), in shards
  1b. requests  (--self-instruct N) N user requests the target writes itself by continuing lists
               of example requests (requests.json), and --passages prompts that summarize,
               answer from or translate paragraphs of the stage-1 answers; their greedy answers
               form a second corpus (corpus_si), for diversity the templates lack
  2. features  the target's final hidden states and greedy tokens on every corpus sequence
               (features.npz, features_si.npz); the last 5% of each corpus is held out
  2b. documents (--documents N) features of conversations whose answers are local texts (documents())
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


def save_features(path: Path, items) -> None:
    """(tokens, bfloat16 features, greedy labels) per sequence, concatenated into one .npz."""
    lengths = np.asarray([len(it[0]) for it in items], np.int64)
    tokens = np.concatenate([it[0] for it in items]).astype(np.int32)
    feats = np.concatenate([it[1] for it in items]).view(np.uint16)
    labels = np.concatenate([it[2] for it in items]).astype(np.int32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, lengths=lengths, tokens=tokens, features=feats, labels=labels)
    tmp.rename(path)


def load_features(path: Path):
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
    if n_passages and passages:
        prompts += passage_prompts(passages, n_passages, seed=5)
    elif n_passages:
        print("no stage-1 answer has a paragraph of 200-900 characters: no passage prompts",
              flush=True)
    random.Random(7).shuffle(prompts)
    (work / "prompts_si.json").write_text(json.dumps(prompts))
    return prompts


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=640)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--self-instruct", type=int, default=0,
                        help="also answer this many requests the target writes itself")
    parser.add_argument("--passages", type=int, default=0,
                        help="also answer this many summarization / passage-QA / translation "
                             "prompts over paragraphs of the stage-1 answers")
    parser.add_argument("--si-batch", type=int, default=SI_BATCH,
                        help="batch of the self-instruct stage (requests and their answers)")
    parser.add_argument("--corpus-only", action="store_true", help="stop after the corpora")
    parser.add_argument("--max-shards", type=int, default=None, help="use at most this many shards")
    parser.add_argument("--window", type=int, default=128)


class Stages:
    """Timed stages: each one's seconds accumulate in WORK/timings.json (across resumes)."""

    def __init__(self, work: Path):
        self.work = work
        path = work / "timings.json"
        self.timings = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, name, fn):
        t = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=1))
        return out


def start(args):
    """What every recipe over target features does first: WORK and its stage timer, the target
    (`--target`) and stages 1-2 (`prepare`). Returns (target, work, stage, prepared); prepared is
    None after --corpus-only."""
    import jaxspec as js

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stage = Stages(work)
    print(f"loading {args.target}", flush=True)
    target = js.load(args.target)
    return target, work, stage, prepare(target, args, work, stage)


def prepare(target, args, work: Path, stage: Stages):
    """Stages 1, 1b and 2. Returns (train_items, eval_items, train_seqs, eval_seqs) with items
    (tokens [T], bfloat16 features [T, D], greedy labels [T]) and seqs (tokens, prompt length),
    or None after --corpus-only."""
    from jaxspec.train import eagle as eagle_train
    from jaxspec.train.prompts import build_prompts
    from jaxspec.train.selfdistill import generate_corpus, read_corpus

    stops = list(target.config.eos_token_ids)
    log = lambda s: print(s, flush=True)  # noqa: E731
    corpus_dir = work / "corpus"
    if not (corpus_dir / "done.json").exists():
        prompts = build_prompts(args.prompts, seed=0)
        n = None if args.max_shards is None else args.max_shards * args.gen_batch
        stage("corpus", lambda: generate_corpus(target, prompts[:n] if n else prompts, corpus_dir,
                                                batch_size=args.gen_batch,
                                                max_new_tokens=args.max_new_tokens,
                                                stop_tokens=stops, log=log))
    seqs = read_corpus(corpus_dir)
    if args.max_shards is not None:
        seqs = seqs[:args.max_shards * args.gen_batch]
    corpora = [("features.npz", seqs)]
    if args.self_instruct or args.passages:
        si_dir = work / "corpus_si"
        if not (si_dir / "done.json").exists():
            si_prompts = stage("requests", lambda: _self_instruct_prompts(
                target, seqs, args.self_instruct, args.passages, work, args.si_batch))
            stage("corpus_si", lambda: generate_corpus(
                target, si_prompts, si_dir, batch_size=args.si_batch,
                max_new_tokens=min(SI_MAX_NEW_TOKENS, args.max_new_tokens),
                stop_tokens=stops, log=log))
        corpora.append(("features_si.npz", read_corpus(si_dir)))
    if args.corpus_only:
        return None
    train_items, eval_items, train_seqs, eval_seqs = [], [], [], []
    for name, corpus in corpora:  # held out: the last 5% of each corpus
        feat_file = work / name
        if feat_file.exists():
            items = load_features(feat_file)
        else:
            items = stage("features", lambda: eagle_train.compute_features(
                target, corpus, max_len=args.window * 3, log=log, labels=True))
            save_features(feat_file, items)
        n_eval = max(1, len(items) // 20)
        train_items += items[:-n_eval]
        eval_items += items[-n_eval:]
        train_seqs += corpus[:len(items) - n_eval]
        eval_seqs += corpus[len(items) - n_eval:len(items)]
    return train_items, eval_items, train_seqs, eval_seqs


def documents(target, count: int, window: int, work: Path, stage: Stages) -> list:
    """Stage 2b (--documents N): features of N conversations whose answers are local texts the
    target did not write (jaxspec.train.reading: docstrings, package READMEs, the Python
    reference, standard-library code), labelled with the target's greedy tokens; cached in
    WORK/documents.npz. [] for N = 0."""
    if not count:
        return []
    doc_file = work / "documents.npz"
    if doc_file.exists():
        return load_features(doc_file)
    from jaxspec.train import eagle as eagle_train
    from jaxspec.train.reading import reading_conversations

    doc_seqs = []
    for conv in reading_conversations(count):
        ids = target.tokenizer.apply_chat_template(conv, add_generation_prompt=False)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        doc_seqs.append((np.asarray(ids, np.int32), 0))
    docs = stage("document_features", lambda: eagle_train.compute_features(
        target, doc_seqs, max_len=window * 3, log=lambda s: print(s, flush=True), labels=True))
    save_features(doc_file, docs)
    return docs
