"""Does EAGLE-3's fused low/mid-layer input help an Eagle drafter on SmolLM2-135M? An A/B.

Usage: python benchmarks/eagle3_fused_features.py --work DIR [--steps 800] [--data E3_WORK]

EAGLE-3 (Li et al. 2025) feeds its drafter a linear fusion of a low, a middle and a high layer of
the target instead of the last hidden state alone. Here both arms start from the shipped Eagle
and fine-tune for the same steps on the same data (the shipped recipe's self-distilled answers,
`features.npz` and `features_si.npz` of its work directory, the held-out 5% of each left out):

  * last      the shipped drafter's input, fc([f_p ; e(x_{p+1})]);
  * fused     fc([f_p ; e(x_{p+1})]) + W [n(l_p) ; n(m_p)], where l_p and m_p are the residual
              stream after layers LOW and MID of the target at position p, n() a parameter-free
              RMS normalisation, and W [2D, D] a new weight initialised to zero (so the arm starts
              as the shipped drafter). Drafted nodes have no target layers: their input is
              fc([h_parent ; e]) in both arms, as in training step 2.

Score: teacher-forced top-1 agreement with the target's greedy token (steps 1 and 2, answer
positions only) on the target's greedy answers to the chat benchmark's held-out prompts, and the
top-k of step 1. Deterministic, no timing. Writes eagle3_fused_features.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

LOW, MID = 2, 15          # SmolLM2-135M has 30 layers (EAGLE-3 takes ~2, L/2 and L-3)


def layer_states(target, items, layers=(LOW, MID), batch_size: int = 8, log=print):
    """[T, len(layers) * D] bfloat16 per item: the residual stream after each layer in `layers`,
    RMS-normalised (no scale), computed over the item's tokens."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from jaxspec.models.transformer import _block, _embed, _layer_inputs, _qkv

    config = target.config
    depth = max(layers) + 1
    stacked = jax.tree_util.tree_map(lambda a: a[:depth], target.params["layers"])
    inv_freqs, _ = _layer_inputs(config)
    groups = config.num_heads // config.num_kv_heads

    @jax.jit
    def run(params, layer_params, tokens):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = _embed(params, tokens, positions, config)
        causal = jnp.tril(jnp.ones((t, t), bool))

        def layer(x, inputs):
            lp, inv_freq = inputs

            def attend(h):
                q, k, v = _qkv(h, lp, positions, config, inv_freq)
                qg = q.reshape(b, t, config.num_kv_heads, groups, config.head_dim)
                s = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k) * config.attn_scale
                w = jax.nn.softmax(jnp.where(causal, s, -1e30), axis=-1)
                return jnp.einsum("BKGTS,BSKD->BTKGD", w, v).reshape(b, t, -1)

            x = _block(x, lp, config, attend)
            return x, x

        _, xs = jax.lax.scan(layer, x, (layer_params,
                                        None if inv_freqs is None else inv_freqs[:depth]))
        picked = [xs[i] for i in layers]                                   # each [B, T, D]
        picked = [p * jax.lax.rsqrt(jnp.mean(p * p, -1, keepdims=True) + 1e-6) for p in picked]
        return jnp.concatenate(picked, axis=-1)                             # [B, T, nD]

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out = [None] * len(items)
    start, done = time.perf_counter(), 0
    for n, b in enumerate(range(0, len(order), batch_size)):
        idx = order[b:b + batch_size]
        length = max(len(items[i][0]) for i in idx)
        padded = int(math.ceil(length / 64) * 64)
        tokens = np.zeros((batch_size, padded), np.int32)
        for j, i in enumerate(idx):
            tokens[j, :len(items[i][0])] = items[i][0]
        states = np.asarray(run(target.params, stacked, jnp.asarray(tokens)), np.float32)
        for j, i in enumerate(idx):
            out[i] = states[j, :len(items[i][0])].astype(ml_dtypes.bfloat16)
            done += len(items[i][0])
        if n % 20 == 0:
            log(f"layer states: {b + len(idx)}/{len(items)}, "
                f"{done / (time.perf_counter() - start):.0f} tokens/s")
    return out


def make_fused_loss(config, embed, head_ids, head, fused: bool, d: int,
                    ce_weight: float = 0.5, second_step_weight: float = 0.5):
    """jaxspec.train.eagle.make_loss with the fused arm's extra input at true positions.
    Batch features: [B, L+3, 3D] = [f ; n(l) ; n(m)]."""
    import jax.numpy as jnp
    import optax

    from jaxspec.models.transformer import _dense
    from jaxspec.speculative.drafters.eagle import draft_features, head_logits
    from jaxspec.train.eagle import step_one, step_two

    vocab = embed.shape[0]
    to_head = jnp.full((vocab,), -1, jnp.int32).at[head_ids].set(jnp.arange(head_ids.shape[0]))

    def loss_fn(params, batch):
        tokens, feats, valid = batch["tokens"], batch["features"], batch["valid"]
        t, b = tokens.shape[1] - 3, tokens.shape[0]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        all_f = feats.astype(jnp.float32)
        f = all_f[..., :d]                                                    # [B, L+3, D]
        x1 = draft_features(params, config, f[:, :t], embed[tokens[:, 1:t + 1]])
        if fused:
            x1 = x1 + _dense(all_f[:, :t, d:], params["fuse"])               # [B, T, D]
        h1, (k1, v1) = step_one(params, config, x1, positions)
        x2 = draft_features(params, config, h1, embed[tokens[:, 2:t + 2]])
        h2 = step_two(params, config, x2, positions, k1, v1)
        metrics, total = {}, 0.0
        for step, (h, weight) in enumerate(((h1, 1.0), (h2, second_step_weight)), start=1):
            label = to_head[batch["labels"][:, step:t + step]]                # [B, T]
            mask = valid[:, step + 1:t + step + 1].astype(jnp.float32)
            reg = jnp.mean(optax.huber_loss(h, f[:, step:t + step], delta=1.0), axis=-1)
            logits = head_logits(head, h)                                     # [B, T, V']
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0))
            ce_mask = mask * (label >= 0)
            n, n_ce = jnp.maximum(mask.sum(), 1.0), jnp.maximum(ce_mask.sum(), 1.0)
            reg_l, ce_l = (reg * mask).sum() / n, (ce * ce_mask).sum() / n_ce
            ranks = jnp.sum(logits > jnp.take_along_axis(
                logits, jnp.maximum(label, 0)[..., None], -1), axis=-1)      # [B, T]
            for k in ((1, 2, 3, 4) if step == 1 else (1,)):
                metrics[f"top{k}_{step}"] = ((ranks < k) * ce_mask).sum() / n_ce
            total = total + weight * (reg_l + ce_weight * ce_l)
            metrics.update({f"reg{step}": reg_l, f"ce{step}": ce_l})
        metrics["loss"] = total
        return total, metrics

    return loss_fn


def held_out_score(loss, params, held_items, seqs) -> dict:
    """Mean of `loss`'s top-k and CE metrics over held-out answers, weighted by answer positions.
    held_items: [(tokens [T], features [T, F], labels [T])]; seqs: [(tokens, prompt length)]."""
    import jax

    sums, count = {}, 0
    ev = jax.jit(lambda p, b: loss(p, b)[1])
    for (tokens, feats, labels), (_, start) in zip(held_items, seqs):
        size = int(math.ceil(len(tokens) / 64) * 64)   # one compile per 64 tokens
        pad = lambda a: np.pad(a, [(0, size - len(a))] + [(0, 0)] * (a.ndim - 1))
        valid = np.zeros((1, size), bool)
        valid[0, start:len(tokens)] = True
        n = int(valid[0, start + 2:].sum())
        m = ev(params, {"tokens": pad(tokens)[None],
                        "features": pad(feats.astype(np.float32))[None],
                        "valid": valid, "labels": pad(labels)[None]})
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        count += n
    return {k: round(v / count, 4) for k, v in sums.items()
            if k.startswith("top") or k.startswith("ce")}


def ab_parser(description: str, default_steps: int) -> argparse.ArgumentParser:
    """The arguments every Eagle fine-tuning A/B from the shipped drafter takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", required=True, help="cache and checkpoint directory")
    parser.add_argument("--data", required=True,
                        help="an Eagle recipe's work directory (features.npz, features_si.npz)")
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks")
    return parser


def ab_start(data_dir: Path) -> dict:
    """What every arm shares: the target, the shipped Eagle (its head ids and head rows, the
    target's embedding), the training items (each corpus of `data_dir` minus its last 5%, the
    recipe's held-out share) and the held out set: the target's greedy answers to the chat
    benchmark's prompts (`seqs`) and their features with greedy labels (`held`)."""
    import jaxspec as js
    from jaxspec.bench.chat_bench import load_prompts
    from jaxspec.speculative.default import shipped_drafter
    from jaxspec.speculative.drafters.eagle import head_rows
    from jaxspec.train.eagle import compute_features
    from jaxspec.train.recipes.features import load_features

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eagle_generalisation import answers

    target = js.load("smollm2-135m-instruct")
    shipped = shipped_drafter(target, "eagle")
    items = []
    for name in ("features.npz", "features_si.npz"):
        part = load_features(Path(data_dir) / name)
        items += part[:len(part) - max(1, len(part) // 20)]
    seqs = answers(target, [c for _, _, c in load_prompts(code=True)])
    return dict(target=target, shipped=shipped, head_ids=shipped.params["head_ids"],
                head=head_rows(target.params, shipped.params["head_ids"]),
                embed=target.params["embed"], items=items, seqs=seqs,
                held=compute_features(target, seqs, labels=True, log=lambda *_: None))


def fine_tune_arm(arm: str, loss, scoring, params, train_items, held_items, seqs, config, args,
                  work: Path) -> dict:
    """Fine-tune `params` (copies of the shipped drafter's) with `loss` for args.steps (seed 1,
    batch args.batch_size x 128, cosine lr args.lr, warmup 50); the held-out scores before and
    after (`held_out_score` with `scoring`)."""
    from jaxspec.train.eagle import FeatureBatches
    from jaxspec.train.trainer import TrainConfig, train

    before = held_out_score(scoring, params, held_items, seqs)
    data = FeatureBatches(train_items, length=128, batch_size=args.batch_size, seed=1)
    cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=50,
                      max_steps=args.steps, weight_decay=0.0, checkpoint_every=100,
                      eval_every=10 ** 9, log_every=20)
    t0 = time.perf_counter()
    result = train(params, config, data, cfg, loss_fn=loss, checkpoint_dir=work / f"ckpt_{arm}",
                   name=arm)
    out = {"before": before, "after": held_out_score(scoring, result.params, held_items, seqs),
           "steps": result.step, "train_seconds": round(time.perf_counter() - t0, 1)}
    print(arm, json.dumps(out), flush=True)
    return out


def shipped_params(shipped) -> dict:
    """Trainable copies of a drafter's weights (training donates its params)."""
    import jax
    import jax.numpy as jnp

    return {k: jax.tree_util.tree_map(jnp.array, v) for k, v in shipped.params.items()
            if k not in ("head_ids", "head_order")}


def main(argv=None) -> int:
    import jax.numpy as jnp
    import ml_dtypes

    from jaxspec.bench.report import markdown_table, write_report

    args = ab_parser(__doc__.splitlines()[0], 800).parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ab = ab_start(Path(args.data))
    target, shipped, items = ab["target"], ab["shipped"], ab["items"]
    seqs, d = ab["seqs"], target.config.hidden_size

    cache = work / "layer_states.npy"
    if cache.exists():
        flat = np.load(cache).view(ml_dtypes.bfloat16)
        offs = np.concatenate([[0], np.cumsum([len(it[0]) for it in items])])
        states = [flat[offs[i]:offs[i + 1]] for i in range(len(items))]
    else:
        states = layer_states(target, items)
        np.save(cache, np.concatenate(states).view(np.uint16))
    train_items = [(t, np.concatenate([f, s], axis=-1), lab)
                   for (t, f, lab), s in zip(items, states)]
    print(f"{len(train_items)} train sequences, {sum(len(it[0]) for it in items)} tokens; "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    held_states = layer_states(target, ab["held"], log=lambda *_: None)
    held_items = [(t, np.concatenate([f, s], axis=-1), lab)
                  for (t, f, lab), s in zip(ab["held"], held_states)]

    results = {}
    for arm in ("last", "fused"):
        loss = make_fused_loss(shipped.config, ab["embed"], ab["head_ids"], ab["head"],
                               fused=arm == "fused", d=d)
        params = shipped_params(shipped)
        if arm == "fused":
            params["fuse"] = {"kernel": jnp.zeros((2 * d, d), jnp.float32)}
        results[arm] = fine_tune_arm(arm, loss, loss, params, train_items, held_items, seqs,
                                     shipped.config, args, work)

    cols = ["top1_1", "top2_1", "top3_1", "top4_1", "top1_2", "ce1"]
    lines = ["# EAGLE-3 fused low/mid-layer input on SmolLM2-135M: an A/B from the shipped Eagle", "",
             f"Written by `python benchmarks/eagle3_fused_features.py` ({time.strftime('%Y-%m-%d')}, "
             f"{args.steps} fine-tuning steps per arm at batch {args.batch_size} x 128, peak lr "
             f"{args.lr}, layers {LOW} and {MID} of 30; held out: the target's greedy answers to "
             f"the {len(seqs)} chat benchmark prompts, answer positions only; teacher-forced "
             "top-k agreement with the target's greedy token at draft step 1, top-1 at step 2).", ""]
    rows = [["shipped (start of both arms)"] + [f"{results['last']['before'][c]:.4f}" for c in cols]]
    rows += [[f"{arm} after {r['steps']} steps"] + [f"{r['after'][c]:.4f}" for c in cols]
             for arm, r in results.items()]
    lines += markdown_table(["drafter", "top-1 step 1", "top-2 step 1", "top-3 step 1",
                             "top-4 step 1", "top-1 step 2", "CE step 1"], rows)
    write_report(Path(args.out), "eagle3_fused_features",
                 dict(results=results, low_mid=[LOW, MID], steps=args.steps, lr=args.lr,
                      held_out_prompts=len(seqs),
                      seconds=round(time.perf_counter() - started, 1),
                      date=time.strftime("%Y-%m-%d")), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
