"""Self-distillation corpora: the target's own greedy answers to offline prompts, in shards.

`generate_corpus` runs the target (jaxspec's batched autoregressive loop) over the prompts in
batches and appends one `.npz` shard per batch to a directory, so an interrupted run resumes at
the next batch. Each shard holds, per sequence, the chat-formatted prompt ids followed by the
answer ids (`tokens`, concatenated), `offsets`, the prompt lengths and each sequence's position
in the prompt list (`index`). Hidden-state features for feature drafters are computed from these
sequences afterwards (`features.py`).

Batches are formed in order of prompt length, and `read_corpus` puts the sequences back in the
prompts' order. A batch is prefilled at its longest prompt's power-of-two bucket, and its KV
cache is sized by that bucket too. On the 2600 self-instruct and passage prompts of the Eagle
recipe (prompts of 55 tokens on average, at most 189) that cut the prefilled tokens from 633k
to 219k at batch 64 (143k are real), and the decode steps' cache slots from 124M to 71M.
Directories written before `index` existed (no `index` in their shards) resume in prompt order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def chat_ids(tokenizer, conversation) -> list[int]:
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def generate_corpus(target, prompts: list, out_dir, batch_size: int = 8,
                    max_new_tokens: int = 192, stop_tokens=(), log=print) -> Path:
    """Greedy answers of `target` to `prompts` (conversations or id lists), sharded and resumable;
    batched in order of prompt length (module docstring)."""
    import jaxspec as js

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids_all = [chat_ids(target.tokenizer, p) if not isinstance(p[0], int) else list(p)
               for p in prompts]
    legacy = any("index" not in np.load(f).files for f in _shards(out))
    order = (list(range(len(ids_all))) if legacy
             else sorted(range(len(ids_all)), key=lambda i: (len(ids_all[i]), i)))
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    start = time.perf_counter()
    made = 0
    for b in range(n_batches):
        shard = out / f"shard_{b:05d}.npz"
        if shard.exists():
            continue
        index = order[b * batch_size:(b + 1) * batch_size]
        ids = [ids_all[i] for i in index]
        res = js.generate(target, ids, max_new_tokens=max_new_tokens, stop_tokens=list(stop_tokens))
        seqs = [ids[i] + res.tokens[i, :res.lengths[i]].tolist() for i in range(len(ids))]
        offsets = np.cumsum([0] + [len(s) for s in seqs])
        tmp = out / f"shard_{b:05d}.tmp.npz"
        extra = {} if legacy else {"index": np.asarray(index, np.int64)}
        np.savez(tmp, tokens=np.concatenate([np.asarray(s, np.int32) for s in seqs]),
                 offsets=offsets.astype(np.int64),
                 prompt_lengths=np.asarray([len(i) for i in ids], np.int32), **extra)
        tmp.rename(shard)
        made += int(res.lengths.sum())
        elapsed = time.perf_counter() - start
        log(f"shard {b + 1}/{n_batches}: {int(res.lengths.sum())} tokens; "
            f"{made / elapsed:.1f} generated tokens/s overall")
    (out / "done.json").write_text(json.dumps({"shards": n_batches, "batch_size": batch_size,
                                               "max_new_tokens": max_new_tokens,
                                               "order": "prompts" if legacy else "length"}))
    return out


def _shards(out_dir) -> list[Path]:
    return [f for f in sorted(Path(out_dir).glob("shard_[0-9]*.npz"))
            if not f.name.endswith(".tmp.npz")]


def read_corpus(out_dir) -> list[tuple[np.ndarray, int]]:
    """[(sequence ids [T], prompt length)] of every shard, in the order of the prompts they
    answer (shards written in length order carry each sequence's `index`)."""
    seqs = []
    for shard in _shards(out_dir):
        data = np.load(shard)
        tokens, offsets, plen = data["tokens"], data["offsets"], data["prompt_lengths"]
        index = data["index"] if "index" in data.files else [None] * len(plen)
        for i in range(len(plen)):
            seqs.append((index[i], tokens[offsets[i]:offsets[i + 1]], int(plen[i])))
    if seqs and seqs[0][0] is not None:
        seqs.sort(key=lambda item: int(item[0]))
    return [(tokens, plen) for _, tokens, plen in seqs]


def sample_requests(target, count: int, out_file, batch_size: int = 64, max_new_tokens: int = 80,
                    seed: int = 0, log=print) -> list[str]:
    """Self-instruct: `count` user requests the target writes itself, by continuing numbered
    lists of example requests (`prompts.request_list_prompts`) with temperature 0.9, top-p 0.95.

    Written to `out_file` (JSON) after every batch, so an interrupted run resumes where it was.
    """
    import jaxspec as js
    from jaxspec.train.prompts import parse_listed_requests, request_list_prompts

    out_file = Path(out_file)
    state = json.loads(out_file.read_text()) if out_file.exists() else {"batches": 0, "requests": []}
    seen = {r.lower() for r in state["requests"]}
    sampling = js.Sampling(temperature=0.9, top_p=0.95)
    while len(state["requests"]) < count:
        b = state["batches"]
        prompts = request_list_prompts(batch_size, seed=seed * 1_000_003 + b)
        ids = [target.tokenizer.encode(p) for p in prompts]
        res = js.generate(target, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                          seed=seed * 1_000_003 + b)
        for text in res.texts:
            state["requests"].extend(parse_listed_requests(text, seen))
        state["batches"] = b + 1
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=0))
        tmp.rename(out_file)
        log(f"requests batch {b + 1}: {len(state['requests'])}/{count}")
    return state["requests"][:count]
