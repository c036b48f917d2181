"""Regenerate the shipped default pair: tokenizer, target code model, distilled draft.

    python -m jaxspec.train.recipes.default_pair [--out DIR] [--target-minutes M]
        [--draft-minutes M] [--small]

Steps: (1) byte-level BPE tokenizer (vocab 8192) on the train split of the standard library
of the running interpreter; (2) a llama-architecture target trained on it for the wall-clock
budget (the cosine schedule's length is calibrated from a measured step time at the start);
(3) target export (bfloat16) to OUT/default_target; (4) a pool of target-generated text;
(5) a draft distilled from the exported target on corpus + generated text; (6) draft export to
OUT/default_draft, held-out measurements of both and OUT/MODEL_CARD.md.
Checkpoints and caches live in --work; rerunning with the same --work resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from jaxspec.train.trainer import log

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets"


@dataclasses.dataclass(frozen=True)
class Recipe:
    vocab_size: int = 8192
    seq_len: int = 256
    target: dict = dataclasses.field(default_factory=lambda: dict(
        hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=768))
    draft: dict = dataclasses.field(default_factory=lambda: dict(
        hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
        intermediate_size=384))
    target_batch: int = 8
    target_lr: float = 1.5e-3
    target_warmup: int = 100
    draft_corpus_batch: int = 8
    draft_generated_batch: int = 8
    draft_lr: float = 3e-3
    draft_warmup: int = 50
    max_steps_cap: int = 100_000
    eval_batch: int = 8
    eval_batches_during: int = 8
    eval_batches_final: int = 48
    gen_sequences: int = 512
    gen_prompt_len: int = 32
    gen_batch: int = 32
    gen_fraction_of_draft_time: float = 0.2
    max_files: int | None = None
    checkpoint_every: int = 100
    eval_every: int = 200
    log_every: int = 10


SMALL = Recipe(vocab_size=1024, seq_len=64,
               target=dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                           intermediate_size=192),
               draft=dict(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=32,
                          intermediate_size=96),
               target_batch=8, draft_corpus_batch=4, draft_generated_batch=4, target_warmup=10,
               draft_warmup=5, max_steps_cap=60, eval_batches_during=2, eval_batches_final=4,
               gen_sequences=16, gen_prompt_len=8, gen_batch=8, max_files=40,
               checkpoint_every=20, eval_every=20, log_every=5)


def model_config(recipe: Recipe, sizes: dict, eos_id: int):
    from jaxspec.models.config import ModelConfig
    return ModelConfig(family="llama", vocab_size=recipe.vocab_size, max_position_embeddings=1024,
                       norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=eos_id, eos_token_ids=(eos_id,), pad_token_id=eos_id, **sizes)


def _prepare_data(recipe: Recipe, work: Path, console):
    from jaxspec.train import data
    root = data.stdlib_root()
    files = data.stdlib_files(root)
    if recipe.max_files is not None:
        files = files[:recipe.max_files]
    train_files, heldout_files = data.split_files(files, root)
    if recipe.max_files is not None and not heldout_files:
        train_files, heldout_files = files[:-4], files[-4:]
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = data.load_tokenizer(tok_dir)
        log(console, f"[data] reusing tokenizer {tok_dir}")
    else:
        t = time.time()
        tokenizer = data.train_tokenizer(data.read_texts(train_files), recipe.vocab_size)
        tokenizer.save_pretrained(str(tok_dir))
        tokenizer = data.load_tokenizer(tok_dir)
        log(console, f"[data] trained tokenizer (vocab {len(tokenizer)}) in {time.time() - t:.1f}s")
    if len(tokenizer) != recipe.vocab_size:
        raise ValueError(f"tokenizer in {tok_dir} has {len(tokenizer)} tokens, the recipe wants "
                         f"{recipe.vocab_size}; delete {tok_dir} (and the checkpoints) to retrain")
    eos = tokenizer.eos_token_id
    streams = {}
    for split, fs in (("train", train_files), ("heldout", heldout_files)):
        cache = work / f"{split}_tokens.npy"
        if cache.is_file():
            streams[split] = np.load(cache)
        else:
            streams[split] = data.tokenize_documents(tokenizer, data.read_texts(fs), eos)
            np.save(cache, streams[split])
    info = dict(train_files=len(train_files), heldout_files=len(heldout_files),
                train_tokens=int(len(streams["train"])), heldout_tokens=int(len(streams["heldout"])),
                heldout_paths=[p.relative_to(root).as_posix() for p in heldout_files])
    log(console, f"[data] {info['train_files']} train files ({info['train_tokens']} tokens), "
                  f"{info['heldout_files']} held-out files ({info['heldout_tokens']} tokens)")
    return tokenizer, streams, info


def _budgeted_config(base, ckpt_dir: Path, minutes: float, measure, console, name: str,
                     cap: int, overhead_s: float, steps: int | None = None):
    """The TrainConfig of a phase: the stored one when resuming, else one whose max_steps
    (the cosine length) is fitted to the budget from a measured step time."""
    from jaxspec.train.trainer import stored_train_config
    stored = stored_train_config(ckpt_dir)
    if stored is not None:
        log(console, f"[{name}] resuming with the stored schedule (max_steps {stored.max_steps})")
        return dataclasses.replace(stored, max_minutes=minutes)
    if steps is not None:  # an explicit cosine length; `minutes` stays a hard stop
        log(console, f"[{name}] max_steps {steps} (given), stopping after {minutes} min at most")
        return dataclasses.replace(base, max_steps=steps, max_minutes=minutes,
                                   warmup_steps=min(base.warmup_steps, max(steps // 10, 1)))
    step_s = measure(base)
    steps = int(max(minutes * 60 - overhead_s, 10) / (step_s * 1.08))
    steps = max(1, min(cap, steps))
    log(console, f"[{name}] measured {step_s:.3f}s/step -> max_steps {steps} for {minutes} min")
    return dataclasses.replace(base, max_steps=steps, max_minutes=minutes,
                               warmup_steps=min(base.warmup_steps, max(steps // 10, 1)))


def _decode_latency(model_dir: Path, steps: int = 64) -> float:
    """Seconds per single-token cached decode step (batch 1), compiled, float32."""
    import jax
    import jax.numpy as jnp
    from jaxspec.models import hf
    from jaxspec.models.cache import KVCache, commit
    from jaxspec.models.transformer import forward, unstack_layers
    m = hf.load(model_dir, dtype="float32", attn_impl="xla")
    m = m.replace(params=unstack_layers(m.params), tokenizer=None)  # as generation runs it on CPU

    @jax.jit
    def run(model, cache):
        def body(i, carry):
            c, tok = carry
            logits, _, c = forward(model, tok, c, jnp.full((1, 1), i, jnp.int32))
            # Feeding the argmax back keeps every step live (unused logits would be dropped).
            return commit(c, jnp.ones((1,), jnp.int32)), jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((1, 1), jnp.int32)))[1]

    cache = KVCache.create(m.config, 1, 256)
    jax.block_until_ready(run(m, cache))
    t = time.time()
    for _ in range(3):
        jax.block_until_ready(run(m, cache))
    return (time.time() - t) / (3 * steps)


def run(out: Path, work: Path, target_minutes: float, draft_minutes: float, recipe: Recipe,
        console, resume: bool = True, target_steps: int | None = None,
        draft_steps: int | None = None, argv: list[str] | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from jaxspec.models import hf
    from jaxspec.models.transformer import init_params
    from jaxspec.train import data as data_mod
    from jaxspec.train import distill, trainer
    from jaxspec.train.export import export

    t_start = time.time()
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, streams, info = _prepare_data(recipe, work, console)
    eos = tokenizer.eos_token_id
    train_seqs = data_mod.pack(streams["train"], recipe.seq_len)
    heldout_seqs = data_mod.pack(streams["heldout"], recipe.seq_len)
    eval_during = data_mod.eval_batches(heldout_seqs, recipe.eval_batch, recipe.eval_batches_during)
    eval_final = data_mod.eval_batches(heldout_seqs, recipe.eval_batch, recipe.eval_batches_final)
    results: dict = {"data": {k: v for k, v in info.items() if k != "heldout_paths"}}

    # -- target ---------------------------------------------------------------------------------
    tcfg = model_config(recipe, recipe.target, eos)
    t_params = init_params(tcfg, jax.random.PRNGKey(0))
    t_batcher = data_mod.Batcher(train_seqs, recipe.target_batch, seed=0)
    base = trainer.TrainConfig(batch_size=recipe.target_batch, learning_rate=recipe.target_lr,
                               warmup_steps=recipe.target_warmup, max_steps=recipe.max_steps_cap,
                               checkpoint_every=recipe.checkpoint_every,
                               eval_every=recipe.eval_every, log_every=recipe.log_every)
    t_ckpt = work / "target_ckpt"
    if not resume and t_ckpt.exists():
        raise ValueError(f"{t_ckpt} exists; pass a fresh --work or drop --no-resume")
    t_train_cfg = _budgeted_config(
        base, t_ckpt, target_minutes,
        lambda c: trainer.measure_step_seconds(t_params, tcfg, t_batcher, c),
        console, "target", recipe.max_steps_cap,
        overhead_s=60 + 2 * len(eval_during) * (1 + recipe.max_steps_cap // recipe.eval_every) / 50,
        steps=target_steps)
    t0 = time.time()
    res = trainer.train(t_params, tcfg, t_batcher, t_train_cfg, eval_batches=eval_during,
                        checkpoint_dir=t_ckpt, name="target", console=console)
    results["target_train"] = dict(steps=res.step, finished=res.finished,
                                   tokens=res.step * recipe.target_batch * recipe.seq_len,
                                   seconds_this_run=round(time.time() - t0, 1),
                                   schedule=t_train_cfg.schedule_dict())
    target_dir = out / "default_target"
    export(res.params, tcfg, target_dir, tokenizer=tokenizer, dtype="bfloat16")
    log(console, f"[target] exported to {target_dir}")

    # -- draft ----------------------------------------------------------------------------------
    target = hf.load(target_dir, dtype="float32", attn_impl="xla")  # the shipped (bf16) weights
    dcfg = model_config(recipe, recipe.draft, eos)
    pool_path = work / "generated_pool.npy"
    t_gen = time.time()
    if pool_path.is_file():
        pool = np.load(pool_path)
    else:
        gen_budget = draft_minutes * 60 * recipe.gen_fraction_of_draft_time
        # One batch first to measure, then as many as the budget allows.
        first = distill.generate_pool(target.params, tcfg, streams["train"], recipe.gen_batch,
                                      recipe.seq_len, recipe.gen_prompt_len, recipe.gen_batch, seed=1)
        per_batch = max(time.time() - t_gen, 1e-3)
        more = int(min(recipe.gen_sequences - recipe.gen_batch,
                       max(gen_budget - per_batch, 0) / per_batch * recipe.gen_batch * 0.9))
        more = max(0, more // recipe.gen_batch * recipe.gen_batch)
        rest = (distill.generate_pool(target.params, tcfg, streams["train"], more, recipe.seq_len,
                                      recipe.gen_prompt_len, recipe.gen_batch, seed=2)
                if more else first[:0])
        pool = np.concatenate([first, rest])
        np.save(pool_path, pool)
    gen_seconds = time.time() - t_gen
    log(console, f"[distill] pool of {len(pool)} target-generated sequences ({gen_seconds:.0f}s)")
    results["generated"] = dict(sequences=int(len(pool)),
                                tokens=int(len(pool) * (recipe.seq_len + 1 - recipe.gen_prompt_len)),
                                seconds=round(gen_seconds, 1))
    d_params = init_params(dcfg, jax.random.PRNGKey(1))
    mixed = distill.MixedBatcher((data_mod.Batcher(train_seqs, recipe.draft_corpus_batch, seed=10),
                                  data_mod.Batcher(pool, recipe.draft_generated_batch, seed=11)))
    d_batch = recipe.draft_corpus_batch + recipe.draft_generated_batch
    kl = distill.make_kl_loss(dcfg, tcfg)
    dbase = trainer.TrainConfig(batch_size=d_batch, learning_rate=recipe.draft_lr,
                                warmup_steps=recipe.draft_warmup, max_steps=recipe.max_steps_cap,
                                weight_decay=0.0, checkpoint_every=recipe.checkpoint_every,
                                eval_every=recipe.eval_every, log_every=recipe.log_every)
    d_minutes = max(draft_minutes - gen_seconds / 60, 0.5)
    d_train_cfg = _budgeted_config(
        dbase, work / "draft_ckpt", d_minutes,
        lambda c: trainer.measure_step_seconds(d_params, dcfg, mixed, c, loss_fn=kl,
                                               extra=(target.params,)),
        console, "draft", recipe.max_steps_cap, overhead_s=45, steps=draft_steps)
    t0 = time.time()
    dres = trainer.train(d_params, dcfg, mixed, d_train_cfg, loss_fn=kl, extra=(target.params,),
                         eval_batches=eval_during, checkpoint_dir=work / "draft_ckpt",
                         name="draft", console=console)
    results["draft_train"] = dict(steps=dres.step, finished=dres.finished,
                                  tokens=dres.step * d_batch * recipe.seq_len,
                                  seconds_this_run=round(time.time() - t0, 1),
                                  schedule=d_train_cfg.schedule_dict())
    draft_dir = out / "default_draft"
    export(dres.params, dcfg, draft_dir, tokenizer=tokenizer, dtype="bfloat16")
    log(console, f"[draft] exported to {draft_dir}")

    # -- measurements on the shipped files --------------------------------------------------------
    draft = hf.load(draft_dir, dtype="float32", attn_impl="xla")
    lm_eval = lambda cfg_: trainer.make_eval_fn(lambda p, b: trainer.lm_loss(p, b, cfg_))
    t_ev = lm_eval(tcfg)(target.params, eval_final)
    d_ev = trainer.make_eval_fn(kl)(draft.params, eval_final, target.params)
    d_ev["ppl"] = math.exp(d_ev["loss"])
    results["heldout_eval_tokens"] = int(sum(b.shape[0] * (b.shape[1] - 1) for b in eval_final))
    results["target_heldout"] = dict(loss=t_ev["loss"], ppl=t_ev["ppl"])
    results["draft_heldout"] = dict(loss=d_ev["loss"], ppl=d_ev["ppl"], kl_to_target=d_ev["kl"],
                                    greedy_agreement=d_ev["agree"])
    results["params"] = dict(target=tcfg.num_params(), draft=dcfg.num_params())
    results["flops_per_token_ratio"] = dcfg.num_params() / tcfg.num_params()
    lat_t, lat_d = _decode_latency(target_dir), _decode_latency(draft_dir)
    results["decode_latency_ms"] = dict(target=lat_t * 1e3, draft=lat_d * 1e3, ratio=lat_d / lat_t)
    results["sizes_bytes"] = {d.name: sum(f.stat().st_size for f in d.iterdir())
                              for d in (target_dir, draft_dir)}
    results["wall_seconds_this_run"] = round(time.time() - t_start, 1)
    results["hardware"] = hardware()
    results["recipe"] = dataclasses.asdict(recipe)
    results["command"] = " ".join(["python -m jaxspec.train.recipes.default_pair", *(argv or [])])
    with open(work / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    write_model_card(out / "MODEL_CARD.md", results, tcfg, dcfg, info["heldout_paths"])
    log(console, f"[done] {json.dumps({k: results[k] for k in ('target_heldout', 'draft_heldout', 'params')})}")
    return results


def hardware() -> str:
    import jax
    dev = jax.devices()[0]
    desc = f"{dev.platform.upper()}"
    if dev.platform == "cpu":
        desc += f", {os.cpu_count()} cores ({platform.processor() or platform.machine()}), shared"
    else:
        desc += f", {getattr(dev, 'device_kind', '')}"
    return desc


def write_model_card(path: Path, r: dict, tcfg, dcfg, heldout_paths: list[str]) -> None:
    tt, dt = r["target_train"], r["draft_train"]
    th, dh = r["target_heldout"], r["draft_heldout"]

    def arch(c):
        return (f"llama, hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads "
                f"(head_dim {c.head_dim}), {c.num_kv_heads} KV heads, intermediate "
                f"{c.intermediate_size}, vocab {c.vocab_size}, tied embeddings, "
                f"max_position_embeddings {c.max_position_embeddings}")

    text = f"""# jaxspec default model pair

Two tiny code models shipped inside the package so that `js.load_default()` works offline:
a **target** trained on the Python standard library and a **draft** distilled from it for
speculative decoding. They are for demos, tests and benchmarks of the decoding machinery,
not for real code completion.

| | target (`default_target/`) | draft (`default_draft/`) |
|---|---|---|
| architecture | {arch(tcfg)} | {arch(dcfg)} |
| parameters | {r['params']['target']:,} | {r['params']['draft']:,} |
| weights on disk | bfloat16, {r['sizes_bytes']['default_target'] / 1e6:.1f} MB (dir) | bfloat16, {r['sizes_bytes']['default_draft'] / 1e6:.1f} MB (dir) |
| training | next-token cross-entropy, {tt['steps']} steps, {tt['tokens']:,} tokens | KL(target ‖ draft) at T=1, {dt['steps']} steps, {dt['tokens']:,} tokens (half corpus, half target-generated) |
| held-out loss (nats/token) | {th['loss']:.4f} | {dh['loss']:.4f} |
| held-out perplexity | {th['ppl']:.2f} | {dh['ppl']:.2f} |
| KL(target ‖ draft) held-out | — | {dh['kl_to_target']:.4f} |
| greedy agreement with target | — | **{dh['greedy_agreement']:.3f}** |
| decode step latency, batch 1, f32 | {r['decode_latency_ms']['target']:.2f} ms | {r['decode_latency_ms']['draft']:.2f} ms ({r['decode_latency_ms']['ratio']:.2f}x) |

*Greedy agreement*: fraction of held-out token positions (teacher-forced on held-out text)
where the draft's argmax equals the target's — a proxy for the acceptance rate of greedy
speculative decoding. Parameter ratio draft/target: {r['flops_per_token_ratio']:.3f}
(≈ FLOPs per token).

## Data

- Corpus: the `.py` files of the CPython {platform.python_version()} standard library
  (`sysconfig.get_paths()["stdlib"]`), excluding `site-packages` and test directories
  (`test/`, `tests/`, `idle_test/`); files that are not UTF-8 are skipped.
- Split by a stable hash of each file's relative path: {r['data']['train_files']} train files
  ({r['data']['train_tokens']:,} tokens), {r['data']['heldout_files']} held-out files
  ({r['data']['heldout_tokens']:,} tokens). Held-out metrics use the first
  {r['heldout_eval_tokens']:,} held-out tokens (packed sequences of {r['recipe']['seq_len']}).
- Tokenizer: byte-level BPE (vocab {tcfg.vocab_size}, `tokenizers`), no prefix space; it
  round-trips any text byte for byte. `<|endoftext|>` (id {tcfg.eos_token_ids[0]}) is bos, eos,
  pad and the document separator.
- Documents are concatenated with `<|endoftext|>` and packed into sequences of
  {r['recipe']['seq_len']} tokens (static shapes).
- Draft distillation text: corpus sequences plus {r['generated']['sequences']} sequences the
  target generated (temperature 1, continuations of {r['recipe']['gen_prompt_len']}-token
  corpus prompts, {r['generated']['tokens']:,} generated tokens) — the FastDraft recipe.

## Training

- Optimiser: AdamW (b1 0.9, b2 0.95, weight decay {tt['schedule']['weight_decay']} target /
  {dt['schedule']['weight_decay']} draft), linear warmup + cosine decay to 10 %, global-norm
  clipping at 1.0, float32 compute.
- Target: batch {tt['schedule']['batch_size']} x {r['recipe']['seq_len']}, peak lr
  {tt['schedule']['learning_rate']}, {tt['steps']} steps (cosine length {tt['schedule']['max_steps']}).
- Draft: batch {dt['schedule']['batch_size']} x {r['recipe']['seq_len']}, peak lr
  {dt['schedule']['learning_rate']}, {dt['steps']} steps (cosine length {dt['schedule']['max_steps']}),
  distilled from the exported bfloat16 target.
- Hardware: {r['hardware']}. Wall time of the run: {r['wall_seconds_this_run'] / 60:.1f} min
  (target {tt['seconds_this_run'] / 60:.1f} min, target-generated text
  {r['generated']['seconds'] / 60:.1f} min, draft {dt['seconds_this_run'] / 60:.1f} min, rest is
  tokenization, evaluation and export).

## Reproduce

```
{r['command']}
# or the same arguments after: jaxspec train default-pair
```

Without --target-steps/--draft-steps the step budget is fitted to the wall-clock minutes from a
measured step time, so results depend on the machine; an interrupted run resumes from its checkpoints in `--work`
(same command). `--small` runs a one-minute miniature of the whole pipeline.

Held-out files: {', '.join(heldout_paths[:60])}{' ...' if len(heldout_paths) > 60 else ''}
"""
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxspec.train.recipes.default_pair",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"where default_target/, default_draft/ and MODEL_CARD.md go (default "
                        f"{DEFAULT_OUT}; with --small: WORK/assets)")
    p.add_argument("--work", type=Path, default=None,
                   help="checkpoints and caches (default runs/default_pair, or runs/default_pair_small)")
    p.add_argument("--target-minutes", type=float, default=45.0)
    p.add_argument("--draft-minutes", type=float, default=15.0)
    p.add_argument("--target-steps", type=int, default=None,
                   help="cosine length of the target phase (default: fitted to --target-minutes "
                        "from a measured step time, which a busy machine makes pessimistic)")
    p.add_argument("--draft-steps", type=int, default=None, help="as --target-steps, for the draft")
    p.add_argument("--small", action="store_true", help="tiny models and corpus: a quick end-to-end check")
    p.add_argument("--no-resume", action="store_true", help="refuse to reuse existing checkpoints")
    args = p.parse_args(argv)
    from rich.console import Console
    console = Console(stderr=True)
    recipe = SMALL if args.small else Recipe()
    work = args.work or Path("runs") / ("default_pair_small" if args.small else "default_pair")
    out = args.out or (work / "assets" if args.small else DEFAULT_OUT)
    run(out, work, args.target_minutes, args.draft_minutes, recipe, console, resume=not args.no_resume,
        target_steps=args.target_steps, draft_steps=args.draft_steps,
        argv=list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
