"""`jaxspec bench --profile`: where one speculative round's time goes, measured.

For each method, on B chat prompts in one ragged batch (`--batch`, default 1; greedy):
  * round: the whole compiled program's decode time (js.generate's seconds, minus a separately
    timed prefill) divided by its rounds (the batch's rounds: its longest row's);
  * its parts, each compiled and timed alone on the state after the prompt (a `fori_loop` of R
    repetitions minus one repetition, so dispatch is not counted): draft (`drafter.propose`),
    target (one forward of the round's N nodes under the tree mask: the cost the round pays
    when it verifies everything), verify (the acceptance rule on those logits);
  * rest = round - draft - target - verify: commit, compaction, stop handling, the drafter's
    commit and the while loop's own bookkeeping (drafters run with sizing off, so every round
    verifies its N nodes and the split is exact; the sized drafter's ms/token is reported beside);
  * the compiled program's HLO instruction count (the autoregressive program's for scale).
Writes JSON + Markdown under --out (`profile_<model>_<backend>`).
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?[\w.\-%]+ = ", re.M)


def hlo_instructions(compiled) -> int:
    """Instructions in a compiled program's optimized HLO (every computation, fusions included)."""
    return len(_INSTRUCTION.findall(compiled.as_text()))


def _repeat_ms(step, args, carry, reps: int) -> float:
    """ms per application of step(args, carry) -> carry inside one compiled fori_loop (each
    iteration depends on the last, so nothing is hoisted out of the loop), minus a one-step loop.
    args (models, drafts, contexts) are traced arguments, as in the real program: closed-over
    arrays would be compile-time constants that XLA folds and lays out for free."""
    def run(n, args, carry):
        return jax.lax.fori_loop(0, n, lambda i, c: step(args, c), carry)

    jitted = jax.jit(run, static_argnums=0)
    times = {}
    for n in (1, 1 + reps):
        jax.block_until_ready(jitted(n, args, carry))
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(jitted(n, args, carry))
            samples.append(time.perf_counter() - start)
        times[n] = statistics.median(samples)
    return max(times[1 + reps] - times[1], 0.0) * 1000 / reps


def state_after_prompt(target, drafter, prompts_ids: list[list[int]]) -> dict:
    """What a round starts from after the prompts (a ragged batch, right-padded): the target as
    the loops hold it, its cache and the drafter (bound), its state and context, greedy."""
    from jaxspec.models.transformer import new_cache, unstack_layers
    from jaxspec.decoding import prefill
    from jaxspec.speculative.draft import Context

    target = target.replace(tokenizer=None)
    if jax.default_backend() == "cpu" and not isinstance(target.params["layers"], (list, tuple)):
        target = target.replace(params=unstack_layers(target.params))
    if hasattr(drafter, "bind"):
        drafter = drafter.bind(target)
    batch, tp = len(prompts_ids), max(map(len, prompts_ids))
    padded = np.zeros((batch, tp), np.int32)
    for b, ids in enumerate(prompts_ids):
        padded[b, :len(ids)] = ids
    tokens = jnp.asarray(padded)                                                   # [B, Tp]
    lengths = jnp.asarray([len(ids) for ids in prompts_ids], jnp.int32)            # [B]
    max_len = tp + 64 + drafter.tree.num_nodes
    cache = new_cache(target, batch, max_len)
    uses_hidden = getattr(drafter, "uses_target_hidden", False)
    logits, hidden, cache = jax.jit(prefill, static_argnums=4)(target, tokens, lengths, cache,
                                                               uses_hidden)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    extra = dict(target_hidden=hidden) if uses_hidden else {}
    dstate = drafter.init(target, tokens, lengths, max_len, None, **extra)
    history = jnp.zeros((batch, max_len), jnp.int32).at[:, :tp].set(tokens)
    history = history.at[jnp.arange(batch), lengths].set(first)                    # [B, S]
    ctx = Context(history=history, length=cache.lengths + 1, cache_lengths=cache.lengths,
                  active=jnp.ones((batch,), bool))
    return dict(target=target, drafter=drafter, cache=cache, dstate=dstate, ctx=ctx,
                tokens=tokens, lengths=lengths)


def drafting_ms(start: dict, reps: int = 8) -> float:
    """ms of one `drafter.propose` on the state after the prompt (`state_after_prompt`)."""
    from jaxspec.sampling import Sampling

    sampling, key = Sampling(), jax.random.PRNGKey(0)
    vocab = start["target"].config.vocab_size

    def touched(tree, never):
        """tree with `never` (a traced False) added to each array's first element: the next
        propose depends on the last one, so XLA cannot hoist a state-independent draft (a
        search of an unchanged history, heads on an unchanged hidden state) out of the loop."""
        def touch(a):
            if not hasattr(a, "ndim") or a.size == 0:
                return a
            index = (0,) * a.ndim                       # () for a scalar
            return a.at[index].set(a[index] + never.astype(a.dtype))
        return jax.tree_util.tree_map(touch, tree)

    def draft_step(drafter, carry):
        dstate, ctx, acc = carry
        draft, dstate = drafter.propose(dstate, ctx, sampling, key, vocab)
        acc = acc + draft.tokens.sum()
        never = acc == -1                         # draft tokens are >= 0
        return touched(dstate, never), ctx.replace(history=touched(ctx.history, never)), acc

    return _repeat_ms(draft_step, start["drafter"], (start["dstate"], start["ctx"], jnp.int32(0)),
                      reps)


def round_parts(target, drafter, prompts_ids: list[list[int]], reps: int = 8) -> dict:
    """ms of draft / target forward (all N nodes) / verify, each alone, after the prompts
    (a ragged batch, right-padded)."""
    from jaxspec.models.transformer import forward
    from jaxspec.decoding import prefill
    from jaxspec.sampling import Sampling
    from jaxspec.speculative.loop import tree_tables
    from jaxspec.speculative.verify import verify

    sampling = Sampling()
    start = state_after_prompt(target, drafter, prompts_ids)
    target, drafter, cache = start["target"], start["drafter"], start["cache"]
    dstate, ctx, tokens, lengths = start["dstate"], start["ctx"], start["tokens"], start["lengths"]
    n, depth_max = drafter.tree.num_nodes, drafter.tree.max_depth
    vocab = target.config.vocab_size
    key = jax.random.PRNGKey(0)
    draft, _ = jax.jit(lambda s, c: drafter.propose(s, c, sampling, key, vocab))(dstate, ctx)
    depth, mask = tree_tables(draft, depth_max, drafter.tree)
    positions = cache.lengths[:, None] + depth

    def target_step(args, carry):
        target, draft, positions, mask = args
        cache, acc = carry
        logits, _, cache = forward(target, draft.tokens, cache, positions, mask)
        return cache, acc + logits[:, -1].sum()

    def verify_step(draft, carry):
        logits, acc = carry
        verdict = verify("greedy", draft, logits, sampling, key, max_depth=depth_max,
                         max_children=drafter.tree.max_children)
        never = (verdict.num_accepted.sum() == -1).astype(logits.dtype)   # keeps the dependency
        return logits + never, acc + verdict.num_accepted.sum()

    def prefill_step(target, carry):
        cache, acc = carry
        logits, _, cache = prefill(target, tokens, lengths, cache)
        return cache, acc + logits.sum()

    zero_f = jnp.float32(0)
    node_logits = jax.jit(lambda t, c: forward(t, draft.tokens, c, positions, mask)[0])(target, cache)
    return dict(draft_ms=drafting_ms(start, reps),
                target_all_ms=_repeat_ms(target_step, (target, draft, positions, mask),
                                         (cache, zero_f), reps),
                verify_ms=_repeat_ms(verify_step, draft, (node_logits, jnp.int32(0)), reps),
                prefill_ms=_repeat_ms(prefill_step, target, (cache, zero_f), 2),
                nodes=n)


def profile(target, methods: dict, conversations: list, max_new_tokens: int = 128,
            repeats: int = 3) -> list[dict]:
    """One row per method (autoregressive first): round time, its parts, HLO size.

    conversations: the batch's prompts (conversations or token-id lists), one row each."""
    import jaxspec as js
    from jaxspec import decoding
    from jaxspec.chat import encode_conversation
    prompts_ids = [list(c) if isinstance(c[0], int) else encode_conversation(target.tokenizer, c)
                   for c in conversations]
    batch = len(conversations)
    rows = []
    def best_run(drafter):
        js.generate(target, conversations, max_new_tokens, drafter=drafter)  # compile, warm
        compiled = decoding.PROGRAMS.last_compiled
        runs = [js.generate(target, conversations, max_new_tokens, drafter=drafter)
                for _ in range(repeats)]
        return min(runs, key=lambda r: r.stats["seconds"]), compiled

    def ms_per_token(out):  # per generated token after each row's first (the prefill's)
        return 1000 * out.stats["seconds"] / max(int(np.sum(out.lengths)) - batch, 1)

    for name, shipped in methods.items():
        # The split is exact for a round that verifies all N nodes: sizing off. The shipped
        # (sized) drafter's time per token is reported beside it.
        drafter = shipped.replace(sizing=None) if getattr(shipped, "sizing", None) else shipped
        best, compiled = best_run(drafter)
        s = best.stats
        rounds = max(int(np.max(s["target_steps"])) - 1, 1)    # the batch's rounds
        row = dict(method=name, batch=batch, tokens=int(np.sum(best.lengths)), rounds=rounds,
                   mean_accepted=float(s["mean_accepted"]), hlo_instructions=hlo_instructions(compiled))
        if drafter is None:
            row.update(round_ms=1000 * s["seconds"] / rounds)
        else:
            parts = round_parts(target, drafter, prompts_ids)
            round_ms = (1000 * s["seconds"] - parts["prefill_ms"]) / rounds
            row.update(round_ms=round_ms, draft_ms=parts["draft_ms"], verify_ms=parts["verify_ms"],
                       target_ms=parts["target_all_ms"], nodes=parts["nodes"],
                       rest_ms=round_ms - parts["draft_ms"] - parts["verify_ms"]
                       - parts["target_all_ms"])
        row["ms_per_token"] = ms_per_token(best)
        if drafter is not shipped:
            sized, _ = best_run(shipped)
            row["ms_per_token_sized"] = ms_per_token(sized)
        rows.append(row)
    return rows


def write(rows: list[dict], meta: dict, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    cols = ["method", "nodes", "round_ms", "draft_ms", "target_ms", "verify_ms", "rest_ms",
            "mean_accepted", "ms_per_token", "ms_per_token_sized", "hlo_instructions"]
    lines = [f"# Round profile: {meta['model']} on {meta['device']}", "",
             f"{meta['date']}, jax {meta['jax']}, batch {meta.get('batch', 1)}, greedy, "
             f"{meta['max_new_tokens']} new tokens, {meta.get('batch', 1)} prompt(s) in one "
             "ragged batch. Each drafter runs with sizing off (every round verifies its N "
             "nodes) so the split is exact: round = decode time / rounds (prefill excluded); "
             "draft, target (one forward of the N nodes) and verify are each compiled and timed "
             "alone on the state after the prompt; rest = round - draft - target - verify (commit, "
             "compaction, stops, the drafter's commit, loop bookkeeping). ms_per_token_sized: "
             "the shipped drafter (sizing on), same prompts. ms_per_token: decode seconds per "
             "generated token of the batch (all rows).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(args) -> int:
    import jaxspec as js
    from jaxspec.bench.chat_bench import load_prompts, method_table
    from jaxspec.bench.report import selected_methods

    target = js.load(args.model) if getattr(args, "model", None) else js.load_default()[0]
    batch = getattr(args, "batch", 1)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if getattr(args, "model", None):
        methods = method_table(target)
        methods.pop("autoregressive_again")      # the bench's noise control; one AR row here
        items = load_prompts(code=False)
        if batch > len(items):
            raise ValueError(f"--batch {batch} is more than the {len(items)} held-out chat prompts")
        conversations = [conv for _, _, conv in items[:batch]]
    else:
        from jaxspec.bench.harness import heldout_prompts
        from jaxspec.models.default import load_default

        _, draft = load_default()
        methods = {"autoregressive": None, "draft_model_k4": js.DraftModel(draft, num_tokens=4),
                   "prompt_lookup": js.PromptLookup()}
        conversations = heldout_prompts(batch)
        if len(conversations) < batch:
            raise ValueError(f"--batch {batch} is more than the {len(conversations)} held-out "
                             "prompts of the shipped pair")
    methods = selected_methods(methods, args.methods)
    # the tiny pair has no chat template: token ids
    conversations = [target.tokenizer.encode(c) if isinstance(c, str) else c
                     for c in conversations]
    rows = profile(target, methods, conversations, args.max_new_tokens)
    model = getattr(args, "model", None) or "jaxspec-tiny-code"
    meta = dict(model=model, device=f"{platform.machine()} CPU x{jax.device_count()}"
                if jax.default_backend() == "cpu" else str(jax.devices()[0].device_kind),
                backend=jax.default_backend(), jax=jax.__version__,
                max_new_tokens=args.max_new_tokens, batch=batch, date=time.strftime("%Y-%m-%d"))
    default_name = f"profile_{model}_{jax.default_backend()}" + (f"_b{batch}" if batch > 1 else "")
    md = write(rows, meta, Path(args.out), args.name or default_name)
    print(md.read_text())
    return 0
