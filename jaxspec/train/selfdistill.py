"""Self-distillation corpora: the target's own greedy answers to offline prompts, in shards.

`generate_corpus` runs the target (jaxspec's batched autoregressive loop) over the prompts in
batches and appends one `.npz` shard per batch to a directory, so an interrupted run resumes at
the next batch. Each shard holds, per sequence, the chat-formatted prompt ids followed by the
answer ids (`tokens`, concatenated), `offsets` and the prompt lengths. Hidden-state features
for feature drafters are computed from these sequences afterwards (`features.py`).
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
    """Greedy answers of `target` to `prompts` (conversations or id lists), sharded and resumable."""
    import jaxspec as js

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    start = time.perf_counter()
    made = 0
    for b in range(n_batches):
        shard = out / f"shard_{b:05d}.npz"
        if shard.exists():
            continue
        batch = prompts[b * batch_size:(b + 1) * batch_size]
        ids = [chat_ids(target.tokenizer, p) if not isinstance(p[0], int) else list(p) for p in batch]
        res = js.generate(target, ids, max_new_tokens=max_new_tokens, stop_tokens=list(stop_tokens))
        seqs = [ids[i] + res.tokens[i, :res.lengths[i]].tolist() for i in range(len(ids))]
        offsets = np.cumsum([0] + [len(s) for s in seqs])
        tmp = out / f"shard_{b:05d}.tmp.npz"
        np.savez(tmp, tokens=np.concatenate([np.asarray(s, np.int32) for s in seqs]),
                 offsets=offsets.astype(np.int64),
                 prompt_lengths=np.asarray([len(i) for i in ids], np.int32))
        tmp.rename(shard)
        made += int(res.lengths.sum())
        elapsed = time.perf_counter() - start
        log(f"shard {b + 1}/{n_batches}: {int(res.lengths.sum())} tokens; "
            f"{made / elapsed:.1f} generated tokens/s overall")
    (out / "done.json").write_text(json.dumps({"shards": n_batches, "batch_size": batch_size,
                                               "max_new_tokens": max_new_tokens}))
    return out


def read_corpus(out_dir) -> list[tuple[np.ndarray, int]]:
    """[(sequence ids [T], prompt length)] of every shard in order."""
    seqs = []
    for shard in sorted(Path(out_dir).glob("shard_[0-9]*.npz")):
        if shard.name.endswith(".tmp.npz"):
            continue
        data = np.load(shard)
        tokens, offsets, plen = data["tokens"], data["offsets"], data["prompt_lengths"]
        for i in range(len(plen)):
            seqs.append((tokens[offsets[i]:offsets[i + 1]], int(plen[i])))
    return seqs


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
