"""Batched speculative generation over every device of every host (TPU pods, GPU clusters).

    python -m jaxspec.launch --prompts prompts.txt --out results.jsonl \\
        [--coordinator HOST:PORT --num-processes N --process-id I] \\
        [--target DIR --draft DIR] [--data D --model M] [--drafter draft|lookup|none] \\
        [--max-new-tokens 64] [--temperature 0] [--seed 0] [--num-tokens K] \\
        [--batch-size B] [--dtype float32|bfloat16]

Run the same command on every host. What each process does:

1. `jax.distributed.initialize()`: automatic on TPU pods (and SLURM / Open MPI / k8s);
   elsewhere pass --coordinator (process 0's address, any free port), --num-processes and
   --process-id. Without either, a single process runs on its local devices.
2. Builds the global ("data", "model") mesh (`js.make_mesh`; default: all devices on "data").
3. Loads the target (and draft) checkpoint straight into the sharded layout: each process reads
   only the slices its devices hold (HF safetensors or a jaxspec orbax checkpoint). The draft is
   replicated. Without --target, the shipped default pair.
4. Reads the prompt file (one prompt per line; blank lines are skipped; a line that is a JSON
   list of ints is taken as token ids), cuts it into global batches of --batch-size rows
   (default: all prompts, rounded up to a multiple of the "data" axis; padding rows are
   dropped from the output), and tokenizes only the rows its own devices hold. The global batch
   is assembled with `jax.make_array_from_process_local_data`.
5. Runs the one-program speculative loop (or the autoregressive one with --drafter none), the
   same program `js.generate` compiles, gathers tokens and per-row stats to every process
   (`process_allgather`) and process 0 writes one JSON line per prompt, in file order:
   {"index", "prompt", "completion", "tokens", "num_tokens", "target_steps", "accepted"}.

Testing on one machine: --cpu-devices N gives each process N CPU devices (set before jax
starts); tests/test_multihost.py runs two such processes on localhost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np  # jax and jaxspec are imported after jax.distributed.initialize

DRAFTERS = ("draft", "lookup", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxspec.launch", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="JSONL written by process 0")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (not needed on TPU pods)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--no-distributed", action="store_true",
                   help="skip jax.distributed.initialize (one process, local devices)")
    p.add_argument("--target", help="target checkpoint dir (HF or jaxspec orbax); default: shipped pair")
    p.add_argument("--draft", help="draft checkpoint dir; default: the shipped pair's draft")
    p.add_argument("--data", type=int, help="mesh 'data' axis size (default: devices / model)")
    p.add_argument("--model", type=int, default=1, help="mesh 'model' axis size (tensor parallel)")
    p.add_argument("--drafter", choices=DRAFTERS, default="draft")
    p.add_argument("--num-tokens", type=int, help="draft tokens per round (default 5, lookup 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="global rows per program run (default: all)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--cpu-devices", type=int, help="CPU devices per process (testing)")
    return p.parse_args(argv)


def init_distributed(args) -> None:
    """Join the multi-process job (before anything touches a device)."""
    import jax
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.no_distributed:
        return
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise SystemExit("--coordinator, --num-processes and --process-id go together")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
        return
    try:  # TPU pods, SLURM, Open MPI, k8s: the cluster is detected from the environment
        jax.distributed.initialize()
    except ValueError:  # no cluster environment: one process on its local devices
        pass


def read_prompts(path) -> list:
    prompts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped.startswith("["):
            try:
                ids = json.loads(stripped)
                if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
                    prompts.append(ids)
                    continue
            except ValueError:
                pass
        prompts.append(line)
    if not prompts:
        raise SystemExit(f"{path} holds no prompts (one per line)")
    return prompts


def local_rows(mesh, batch: int) -> list[int]:
    """The global batch rows held by this process's devices, in order (each listed once)."""
    from jax.sharding import NamedSharding

    from jaxspec.sharding import batch_spec
    index_map = NamedSharding(mesh, batch_spec(1)).addressable_devices_indices_map((batch,))
    spans = sorted({idx[0].indices(batch)[:2] for idx in index_map.values()})
    return [r for start, stop in spans for r in range(start, stop)]


def _global(mesh, local: np.ndarray, rows: int):
    """Assemble a [B, ...] batch-sharded global array from this process's rows."""
    import jax
    from jax.sharding import NamedSharding

    from jaxspec.sharding import batch_spec
    shape = (rows,) + local.shape[1:]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(local.ndim)),
                                                  local, shape)


def run_batch(target, drafter, prompts: list, mesh, max_new_tokens: int, sampling, seed: int):
    """Generate for one global batch (len(prompts) rows, a multiple of the 'data' axis).

    Every process passes the same `prompts` list; each tokenizes only its own rows. Returns
    (tokens [B, max_new_tokens], lengths [B], target_steps [B], accepted [B]) as numpy arrays on
    every process.
    """
    import jax
    from jax.experimental import multihost_utils

    from jaxspec import api, decoding
    from jaxspec.sharding import check_mesh, replicate_tree

    batch = len(prompts)
    check_mesh(target.config, mesh, batch=batch)
    rows = local_rows(mesh, batch)
    encoded = api.encode_prompts(target, [prompts[r] for r in rows])
    slack = 0 if drafter is None else drafter.cache_slack()
    api.check_lengths(target, encoded, max_new_tokens, slack)
    longest = int(np.max(multihost_utils.process_allgather(
        np.asarray(max(len(ids) for ids in encoded), np.int32))))
    tp, m, pad = decoding.bucket(longest), decoding.bucket(max_new_tokens), api.pad_token_id(target)
    tokens = np.full((len(rows), tp), pad, np.int32)
    for i, ids in enumerate(encoded):
        tokens[i, :len(ids)] = ids
    lengths = np.asarray([len(ids) for ids in encoded], np.int32)
    limit = np.full((len(rows),), max_new_tokens, np.int32)
    prompt_tokens, prompt_lengths, limit = (_global(mesh, a, batch) for a in (tokens, lengths, limit))
    key = np.asarray(jax.random.PRNGKey(seed))
    stops = api.stop_token_array(target, None)
    # Every program argument must be a global array when processes share the program.
    sampling = jax.tree_util.tree_map(
        lambda v: np.asarray(v, np.int32 if isinstance(v, int) else np.float32), sampling)
    sampling, key, stops = replicate_tree((sampling, key, stops), mesh)
    if drafter is None:
        args = (target, prompt_tokens, prompt_lengths, sampling, key, stops, limit)
        program, _ = decoding.PROGRAMS.get("autoregressive", api._autoregressive_program, (m, pad, mesh), args)
    else:
        from jaxspec.speculative.loop import speculative_program
        drafter = replicate_tree(drafter, mesh)
        args = (target, drafter, prompt_tokens, prompt_lengths, sampling, key, stops, limit, None)
        program, _ = decoding.PROGRAMS.get("speculative", speculative_program, (m, pad, mesh), args)
    result = program(*args)
    out = result[0] if isinstance(result, tuple) else result
    gathered = multihost_utils.process_allgather(
        (out.tokens, out.lengths, out.target_steps, out.accepted), tiled=True)
    tokens, lengths, steps, accepted = (np.asarray(x) for x in gathered)
    lengths = np.minimum(lengths, max_new_tokens)
    tokens = tokens[:, :max_new_tokens].copy()
    for i in range(batch):
        tokens[i, lengths[i]:] = pad
    return tokens, lengths, steps, accepted


def main(argv=None) -> int:
    args = parse_args(argv)
    init_distributed(args)
    import jax

    import jaxspec as js
    from jaxspec.sharding import axis_sizes, load_sharded, make_mesh

    mesh = make_mesh(data=args.data, model=args.model)
    if args.target is None:
        from jaxspec.models.default import default_pair_dirs
        target_dir, default_draft = default_pair_dirs()
    else:
        target_dir, default_draft = Path(args.target), None
    target = load_sharded(target_dir, mesh, dtype=args.dtype)
    drafter = None
    if args.drafter == "draft":
        draft_dir = args.draft or default_draft
        if draft_dir is None:
            raise SystemExit("--drafter draft needs --draft DIR (or no --target, for the shipped pair)")
        draft = load_sharded(draft_dir, mesh, dtype=args.dtype, replicate=True)
        drafter = js.DraftModel(draft, num_tokens=args.num_tokens or 5)
    elif args.drafter == "lookup":
        drafter = js.PromptLookup(num_tokens=args.num_tokens or 8)
    if drafter is not None:
        drafter.check_compatible(target)
    sampling = js.Sampling(temperature=args.temperature, top_p=args.top_p)

    prompts = read_prompts(args.prompts)
    data, model = axis_sizes(mesh)
    size = args.batch_size or len(prompts)
    size = -(-size // data) * data
    records, start, generated = [], time.perf_counter(), 0
    for first in range(0, len(prompts), size):
        chunk = prompts[first:first + size]
        padded = chunk + [chunk[0]] * (size - len(chunk))   # padding rows, dropped below
        tokens, lengths, steps, accepted = run_batch(target, drafter, padded, mesh,
                                                     args.max_new_tokens, sampling,
                                                     args.seed + first)
        for i, prompt in enumerate(chunk):
            ids = tokens[i, :lengths[i]].tolist()
            text = None
            if target.tokenizer is not None:
                text = target.tokenizer.decode(ids, skip_special_tokens=True)
            records.append({"index": first + i, "prompt": prompt, "completion": text, "tokens": ids,
                            "num_tokens": int(lengths[i]), "target_steps": int(steps[i]),
                            "accepted": int(accepted[i])})
            generated += int(lengths[i])
    elapsed = time.perf_counter() - start
    if jax.process_index() == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"jaxspec.launch: {len(records)} prompts, {generated} tokens in {elapsed:.1f}s "
              f"({jax.process_count()} processes, {jax.device_count()} devices, mesh "
              f"data={data} model={model}) -> {out}", file=sys.stderr)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxspec.launch done")
    return 0

if __name__ == "__main__":
    sys.exit(main())
