"""The speculative loop: draft -> score -> verify -> commit, one jitted while_loop over a batch.

Every row advances by its own accepted length. Per round and row:
  1. the drafter proposes N nodes (node 0 = root = last committed token, not yet in the cache);
  2. one target forward scores all N nodes at positions len + depth under the tree mask
     "committed prefix + own ancestors", writing their K/V at slots [len, len + N);
  3. the acceptance rule keeps a root-to-node path and draws the next token from the target;
  4. the path's K/V are compacted to slots [len, len + accepted + 1), `len` advances, the emitted
     tokens (accepted + next) are appended up to a stop token or the row's limit, and the
     drafter is told what was accepted.
Nothing syncs with the host inside the loop; the caches live inside the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxspec import constraints
from jaxspec.autoregressive import autoregressive_tokens
from jaxspec.decoding import TokenOutput, prefill, stop_mask
from jaxspec.models.cache import commit, compact, write_new
from jaxspec.models.transformer import Model, forward_pending, forward_step, new_cache, unstack_layers
from jaxspec.placement import constrain_batch
from jaxspec.sampling import Sampling, probabilities, sample
from jaxspec.speculative import costs
from jaxspec.speculative.constrained import constrain_draft
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.base import check_drafter
from jaxspec.speculative.trees import TreeSpec
from jaxspec.speculative.costs import CostModel, choose_size
from jaxspec.speculative.verify import Verdict, verify


def tree_tables(draft: Draft, max_depth: int, tree):
    """Depth [B, N] and ancestor mask [B, N, N] of a draft (baked constants for static trees)."""
    batch, n = draft.tokens.shape
    if isinstance(tree, TreeSpec):
        depth = jnp.broadcast_to(jnp.asarray(tree.depths), (batch, n))
        mask = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask), (batch, n, n))
        return depth, mask
    parents = jnp.maximum(draft.parents, 0)                                      # [B, N]
    mask = jnp.eye(n, dtype=bool)[None].repeat(batch, 0)
    cur = jnp.broadcast_to(jnp.arange(n), (batch, n))
    for _ in range(max_depth):
        cur = jnp.take_along_axis(parents, cur, axis=1)
        mask = mask | jax.nn.one_hot(cur, n, dtype=bool)
    depth = jnp.sum(mask, axis=-1).astype(jnp.int32) - 1
    return depth, mask


def generate_tokens(target: Model, drafter, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                    max_new_tokens: int, sampling: Sampling, key: jax.Array, *,
                    stop_tokens: jax.Array | None = None, limit: jax.Array | None = None,
                    pad_id: int = 0, rule: str = "auto", drafter_state=None, mesh=None,
                    return_cache: bool = False, constraint: constraints.Constraint | None = None):
    """Speculative generation on token arrays; pure, so it can run inside a user's jax.jit.

    prompt_tokens: [B, Tp] right-padded; prompt_lengths: [B]; max_new_tokens: static M;
    limit: optional dynamic per-row cap <= M; stop_tokens: [K]. drafter=None decodes
    autoregressively. mesh (js.make_mesh): rows split on "data", the target's KV cache by batch
    and KV head, drafter caches by batch (see jaxspec.sharding). Returns (TokenOutput, drafter_state),
    plus the target's final KVCache when return_cache (tests compare it with a plain run).
    rule="auto" is greedy at temperature 0, else the drafter's `rule` attribute when it has one
    (e.g. "speculative_wor" for trees drafted without replacement), else "speculative".
    constraint (js.Constraint): drafts are pruned to its language and verified against the target
    masked at every node's DFA state (jaxspec.speculative.constrained), so the output is
    constrained autoregressive decoding's (identical at temperature 0, same law otherwise);
    stop_tokens should include the constraint's.
    """
    if mesh is not None:
        from jaxspec.sharding import use_mesh
        with use_mesh(mesh, target.config):
            return generate_tokens(target, drafter, prompt_tokens, prompt_lengths, max_new_tokens,
                                   sampling, key, stop_tokens=stop_tokens, limit=limit,
                                   pad_id=pad_id, rule=rule, drafter_state=drafter_state,
                                   return_cache=return_cache, constraint=constraint)
    if drafter is None:
        return autoregressive_tokens(target, prompt_tokens, prompt_lengths, max_new_tokens,
                                     sampling, key, stop_tokens, limit, pad_id,
                                     constraint=constraint), None
    check_drafter(drafter)
    prompt_tokens, prompt_lengths = constrain_batch(prompt_tokens, prompt_lengths)  # if on a mesh
    if jax.default_backend() == "cpu":  # per-layer weights sliced once, not every step (see
        target = _unstacked(target)     # transformer.unstack_layers); same as the baseline
        if isinstance(getattr(drafter, "model", None), Model):
            drafter = drafter.replace(model=_unstacked(drafter.model))
    batch, tp = prompt_tokens.shape
    if rule == "auto" and not sampling.greedy:
        rule = getattr(drafter, "rule", "auto")
    tree = drafter.tree
    n, depth_max = tree.num_nodes, tree.max_depth
    max_children = tree.max_children
    vocab = target.config.vocab_size
    max_len = tp + max_new_tokens + n
    stop_tokens = jnp.zeros((0,), jnp.int32) if stop_tokens is None else stop_tokens
    limit = jnp.broadcast_to(jnp.asarray(max_new_tokens if limit is None else limit, jnp.int32), (batch,))
    rows = jnp.arange(batch)

    cache = new_cache(target, batch, max_len)   # per-layer buffers beside unstacked layers
    if hasattr(drafter, "bind"):  # drafters reading the target's frozen arrays (Eagle)
        drafter = drafter.bind(target)
    uses_hidden = getattr(drafter, "uses_target_hidden", False)  # feature drafters (Eagle, Medusa)
    sizing = getattr(drafter, "sizing", None)  # a costs.CostModel: per-round verify sizes
    if not isinstance(sizing, CostModel) or len(sizing.sizes) < 2:
        sizing = None                          # "auto" is resolved by js.generate (it measures)
    elif sizing.sizes[-1] != drafter.tree.num_nodes:
        sizing = sizing.restricted(drafter.tree.num_nodes)
    logits, prompt_hidden, cache = prefill(target, prompt_tokens, prompt_lengths, cache,
                                           all_hidden=uses_hidden)
    dfa = None                                                 # [B] DFA states (constrained)
    if constraint is not None:
        dfa = constraints.start_states(constraint, batch)
        logits = constraints.mask_logits(constraint, logits, dfa)
    first = sample(jax.random.fold_in(key, 0), logits, sampling)                  # [B]
    if constraint is not None:
        dfa = constraints.advance(constraint, dfa, first)
    history = jnp.zeros((batch, max_len), jnp.int32).at[:, :tp].set(prompt_tokens)
    history = history.at[rows, prompt_lengths].set(first)
    out = jnp.full((batch, max_new_tokens + n), pad_id, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((batch,), jnp.int32)
    done = stop_mask(first, stop_tokens) | (n_out >= limit)
    if uses_hidden:
        dstate = drafter.init(target, prompt_tokens, prompt_lengths, max_len, drafter_state,
                              target_hidden=prompt_hidden)
    else:
        dstate = drafter.init(target, prompt_tokens, prompt_lengths, max_len, drafter_state)
    # Rounds sized by earlier rounds' acceptance rates: every sampled round, and greedy rounds of
    # drafters without per-node confidences (prompt lookup): both decided before this round's
    # target logits (and, sampled, before its draw), so exact / lossless (invariant 8).
    sized_by_rate = sizing is not None and (not sampling.greedy
                                            or not getattr(drafter, "drafts_confidence", True))
    rate = jnp.full((batch,), costs.RATE_PRIOR, jnp.float32) if sized_by_rate else None  # [B]
    depths_by_size = costs.prefix_depths(sizing, tree) if sized_by_rate else None
    # Greedy rounds sized by the draft's confidences, corrected by each row's record of them.
    sized_by_confidence = (sizing is not None and sampling.greedy
                           and getattr(drafter, "drafts_confidence", True)
                           and getattr(drafter, "calibrated", True))
    calibration = costs.initial_calibration(batch) if sized_by_confidence else None  # 2 x [B]
    zeros = jnp.zeros((batch,), jnp.int32)
    stats = (jnp.ones((batch,), jnp.int32), zeros, zeros, jnp.zeros((batch, depth_max), jnp.int32))

    def cond(state):
        return (state["round"] < max_new_tokens) & ~jnp.all(state["done"])

    def body(state):
        cache, history, out, n_out, done = (state[k] for k in ("cache", "history", "out", "n_out", "done"))
        active = ~done
        round_key = jax.random.fold_in(key, state["round"])
        draft_key, verify_key = jax.random.split(round_key)
        ctx = Context(history=history, length=cache.lengths + 1, cache_lengths=cache.lengths,
                      active=active)
        draft, dstate = drafter.propose(state["dstate"], ctx, sampling, draft_key, vocab)
        proposed = draft                  # what the drafter is told about (its own node indices)
        if constraint is not None:        # prune to the language before the target is seen
            draft, node_state = constrain_draft(constraint, draft, state["dfa"], depth_max)

        def constrained(logits):
            """The target logits [B, n, V] verification sees: masked at each node's state."""
            if constraint is None:
                return logits
            return constraints.mask_logits(constraint, logits, node_state[:, :logits.shape[1]])

        depth, mask = tree_tables(draft, depth_max, tree)
        positions = cache.lengths[:, None] + depth                                 # [B, N]

        # Each way of scoring inside a conditional returns the new K/V instead of writing them
        # (forward_pending): a branch that wrote the cache would make XLA copy the whole cache
        # buffer per round. The K/V are written once, after the conditional. A round with no
        # conditional (a pinned draft size) runs `forward_step`, as the plain loop does.
        def padded(size, logits, hidden, new_k, new_v, verdict):
            """Outputs of a `size`-node forward padded to the draft's n nodes."""
            pad = lambda a, axis: jnp.pad(a, [(0, n - size if i == axis else 0)
                                              for i in range(a.ndim)])
            return pad(logits, 1), pad(hidden, 1), pad(new_k, 2), pad(new_v, 2), verdict

        def score():
            logits, hidden, new_k, new_v = forward_pending(target, draft.tokens, cache, positions,
                                                           mask)
            verdict = verify(rule, draft, constrained(logits), sampling, verify_key,
                             max_depth=depth_max, max_children=max_children)
            return logits, hidden, new_k, new_v, verdict

        def plain_step():
            """No row drafted anything: score the root alone, at a plain decode step's cost."""
            logits, hidden, new_k, new_v = forward_pending(target, draft.tokens[:, :1], cache,
                                                           positions[:, :1])
            verdict = Verdict(path=jnp.zeros((batch, depth_max + 1), jnp.int32),
                              num_accepted=jnp.zeros((batch,), jnp.int32),
                              next_token=sample(verify_key, constrained(logits)[:, 0], sampling))
            return padded(1, logits, hidden, new_k, new_v, verdict)

        def score_prefix(size):
            """Verify only the first `size` nodes (a prefix of a tree is a tree)."""
            if size >= n:
                return score()
            if size == 1:
                return plain_step()
            sub = Draft(tokens=draft.tokens[:, :size], parents=draft.parents[:, :size],
                        valid=draft.valid[:, :size], q=None if draft.q is None else draft.q[:, :size])
            logits, hidden, new_k, new_v = forward_pending(target, sub.tokens, cache,
                                                           positions[:, :size],
                                                           mask[:, :size, :size])
            sub_depth = int(tree.depths[:size].max()) if isinstance(tree, TreeSpec) else depth_max
            verdict = verify(rule, sub, constrained(logits), sampling, verify_key,
                             max_depth=sub_depth, max_children=max_children)
            verdict = verdict.replace(path=jnp.pad(verdict.path, [(0, 0), (0, depth_max - sub_depth)]))
            return padded(size, logits, hidden, new_k, new_v, verdict)

        verified = jnp.full((), n, jnp.int32)                  # nodes scored this round
        if sizing is not None and draft.confidence is not None and sampling.greedy:
            # Chosen from draft-side values only (before any target logits are seen): lossless.
            # Greedy rounds only: under sampling a node's confidence (its drawn token's q, its
            # children's q) depends on the drawn token, so verifying it or not by confidence skews
            # its law (seeded chi-square p ~ 1e-18 with per-row choices, test_costs.py); sampled
            # rounds are sized by earlier rounds' acceptance rates instead (next branch).
            confidence = draft.confidence
            if state["calibration"] is not None:
                confidence = costs.calibrated_confidence(confidence, state["calibration"])
            index = choose_size(sizing, confidence, draft.parents, draft.valid, active, depth_max)
            verified = jnp.asarray(sizing.sizes, jnp.int32)[index]
            scored = jax.lax.switch(
                index, [functools.partial(score_prefix, size) for size in sizing.sizes])
        elif sized_by_rate:
            # Sampled rounds: the size comes from acceptance rates of earlier rounds, so it is
            # fixed before this round's draft is drawn and the rule stays lossless (costs.py).
            rate_now = state["rate"]
            if getattr(drafter, "skips_empty_rounds", False):
                # A deterministic drafter that drafted nothing for a row this round: that row
                # commits its one token at any size; no row drafted -> a plain step.
                rate_now = jnp.where(draft.valid[:, 1], rate_now, 0.0)
            index = costs.choose_size_by_rate(sizing, rate_now, depths_by_size, active,
                                              drafted=n - 1)
            if getattr(drafter, "skips_empty_rounds", False) and sizing.sizes[0] == 1:
                index = jnp.where(jnp.any(draft.valid[:, 1] & active), index, 0)
            verified = jnp.asarray(sizing.sizes, jnp.int32)[index]
            scored = jax.lax.switch(
                index, [functools.partial(score_prefix, size) for size in sizing.sizes])
        elif getattr(drafter, "skips_empty_rounds", False):
            # Chosen from draft-side values only (before any target logits are seen), so the
            # lossless rules stay lossless; a round with no draft costs what a plain step costs.
            drafted_any = jnp.any(draft.valid[:, 1:] & active[:, None])
            scored = jax.lax.cond(drafted_any, score, plain_step)
        else:
            scored = None   # no conditional: the forward writes the new K/V where they belong
        if scored is None:
            target_logits, target_hidden, cache = forward_step(target, draft.tokens, cache,
                                                               positions, mask)
            verdict = verify(rule, draft, constrained(target_logits), sampling, verify_key,
                             max_depth=depth_max, max_children=max_children)
        else:
            target_logits, target_hidden, new_k, new_v, verdict = scored
            cache = write_new(cache, new_k, new_v)      # slots [len, len + n); len does not move
        accepted = verdict.num_accepted                                            # [B]
        # Emitted tokens: the accepted path's tokens (after the root), then the next token.
        path_tokens = jnp.take_along_axis(draft.tokens, verdict.path, axis=1)      # [B, D+1]
        emitted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
        emitted = emitted.at[rows, accepted].set(verdict.next_token)               # [B, D+1]
        count = accepted + 1
        positions_d = jnp.arange(depth_max + 1)[None, :]
        is_stop = stop_mask(emitted, stop_tokens) & (positions_d < count[:, None])
        first_stop = jnp.min(jnp.where(is_stop, positions_d, depth_max + 1), axis=1)
        count = jnp.minimum(jnp.minimum(count, first_stop + 1), limit - n_out)
        count = jnp.where(active, count, 0)
        slots = jnp.where(positions_d < count[:, None], n_out[:, None] + positions_d,
                          out.shape[1])
        out = out.at[rows[:, None], slots].set(emitted, mode="drop")
        hist_slots = jnp.where(positions_d < count[:, None], ctx.length[:, None] + positions_d,
                               history.shape[1])
        history = history.at[rows[:, None], hist_slots].set(emitted, mode="drop")
        n_out = n_out + count
        done = done | (active & ((first_stop <= accepted) | (n_out >= limit)))
        # K/V: the root and accepted nodes move to contiguous slots; len advances past them.
        if not _is_chain(tree):
            cache = compact(cache, verdict.path, jnp.where(active, accepted + 1, 0))
        cache = commit(cache, jnp.where(active, jnp.minimum(accepted + 1, count), 0))
        dfa = state["dfa"]
        if constraint is not None:  # the state after the last accepted node, then next_token
            last = jnp.take_along_axis(verdict.path, accepted[:, None], axis=1)[:, 0]
            moved = constraints.advance(constraint, node_state[rows, last], verdict.next_token)
            dfa = jnp.where(active, moved, dfa)
        # The drafter is told which of its nodes the target scored: those past the round's
        # verify size are marked invalid (their target logits are padding).
        proposed = proposed.replace(valid=proposed.valid & (jnp.arange(n)[None, :] < verified))
        if uses_hidden:
            dstate = drafter.commit(dstate, ctx, proposed, verdict, target_logits,
                                    target_hidden=target_hidden)
        else:
            dstate = drafter.commit(dstate, ctx, proposed, verdict, target_logits)
        rate = state["rate"]
        if sized_by_rate:  # node 1's exact acceptance probability against the target's root
            root_logits = target_logits[:, :1] if constraint is None else constrained(target_logits[:, :1])
            rate = costs.update_rate(rate, draft, probabilities(root_logits[:, 0], sampling), active)
        calibration = state["calibration"]
        if calibration is not None and draft.confidence is not None:
            root_logits = constrained(target_logits[:, :1])[:, 0]                 # [B, V]
            calibration = costs.update_calibration(calibration, draft, root_logits, active)
        steps, drafted, acc, by_pos = state["stats"]
        drafted_now = jnp.sum(draft.valid & (jnp.arange(n)[None, :] < verified), axis=1) - 1
        stats = (steps + active, drafted + jnp.where(active, drafted_now, 0),
                 acc + jnp.where(active, accepted, 0),
                 by_pos + (active[:, None] & (accepted[:, None] > jnp.arange(depth_max)[None, :])))
        return dict(cache=cache, history=history, out=out, n_out=n_out, done=done, dstate=dstate,
                    stats=stats, round=state["round"] + 1, dfa=dfa, rate=rate,
                    calibration=calibration)

    state = dict(cache=cache, history=history, out=out, n_out=n_out, done=done, dstate=dstate,
                 stats=stats, round=jnp.int32(1), dfa=dfa, rate=rate,
                 calibration=calibration)
    state = jax.lax.while_loop(cond, body, state)
    steps, drafted, acc, by_pos = state["stats"]
    output = TokenOutput(tokens=state["out"][:, :max_new_tokens], lengths=state["n_out"],
                         target_steps=steps, drafted=drafted, accepted=acc,
                         accepted_by_position=by_pos)
    if return_cache:
        return output, state["dstate"], state["cache"].stacked()
    return output, state["dstate"]


def _unstacked(model: Model) -> Model:
    if isinstance(model.params["layers"], (list, tuple)):
        return model
    return model.replace(params=unstack_layers(model.params))


def _is_chain(tree) -> bool:
    return isinstance(tree, TreeSpec) and tree.max_children <= 1


def speculative_program(max_new_tokens, pad_id, mesh, target, drafter, prompt_tokens,
                        prompt_lengths, sampling, key, stop_tokens, limit, drafter_state,
                        constraint=None):
    """The jitted program behind js.generate(..., drafter=...)."""
    return generate_tokens(target, drafter, prompt_tokens, prompt_lengths, max_new_tokens,
                           sampling, key, stop_tokens=stop_tokens, limit=limit, pad_id=pad_id,
                           drafter_state=drafter_state, mesh=mesh, constraint=constraint)
