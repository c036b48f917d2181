"""Drafters: settings and compatibility refusals, padded vocabularies, prompt-lookup search,
the adaptive draft-length schedule.

Every refusal is a ValueError raised before any compute, with a message that says what was
wrong; the messages are checked. Only the padded-vocabulary test compiles a program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec as js
from jaxspec.api import check_lengths
from jaxspec.decoding import COMPILATIONS
from jaxspec.speculative.draft import Context, Draft
from jaxspec.speculative.drafters.draft_model import DraftModelState
from jaxspec.speculative.drafters.prompt_lookup import find_continuation
from jaxspec.speculative.verify import Verdict


def _words(vocab, rename=None):
    words = [f"w{i}" for i in range(vocab - 1)] + ["[UNK]"]
    if rename is not None:
        words[rename] = "other"
    return words


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens", [0, -2, 257, 2.5, "4", "fast", True])
def test_draft_model_refuses_bad_num_tokens(num_tokens, target):
    with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, 256\] "
                                         r"\(or 'auto' where supported\), got "):
        js.DraftModel(target, num_tokens=num_tokens)


@pytest.mark.parametrize("max_tokens", [0, 300, 1.5, "8", None])
def test_draft_model_auto_refuses_bad_max_tokens(max_tokens, target):
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in \[1, 256\]"):
        js.DraftModel(target, num_tokens="auto", max_tokens=max_tokens)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, 2.0])
def test_draft_model_refuses_bad_stop_threshold(threshold, target):
    with pytest.raises(ValueError, match=r"stop_threshold must be in \(0, 1\) or None"):
        js.DraftModel(target, num_tokens="auto", stop_threshold=threshold)


def test_draft_model_needs_a_model():
    with pytest.raises(ValueError, match="DraftModel needs a jaxspec Model .* got str"):
        js.DraftModel("path/to/draft", num_tokens=4)


def test_draft_model_settings(target):
    fixed = js.DraftModel(target, num_tokens=3)
    assert fixed.k == 3 and not fixed.adaptive and fixed.tree == js.trees.chain(3)
    auto = js.DraftModel(target, num_tokens="auto", max_tokens=6)
    assert auto.k == 6 and auto.adaptive and auto.tree == js.trees.chain(6)
    assert js.PromptLookup(ngram=2, num_tokens=5).tree == js.trees.chain(5)


@pytest.mark.parametrize("ngram", [0, 17, 2.0, True, "3", None])
def test_prompt_lookup_refuses_bad_ngram(ngram):
    with pytest.raises(ValueError, match=r"ngram must be an integer in \[1, 16\], got "):
        js.PromptLookup(ngram=ngram, num_tokens=4)


@pytest.mark.parametrize("num_tokens", [0, 257, 1.5, "auto", False])
def test_prompt_lookup_refuses_bad_num_tokens(num_tokens):
    with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, 256\]"):
        js.PromptLookup(ngram=2, num_tokens=num_tokens)


# -- not a drafter ---------------------------------------------------------------------------

_NOT_A_DRAFTER = (r"drafter must be None or a jaxspec drafter \(js\.DraftModel, js\.PromptLookup, "
                  r"js\.TokenRecycling, \.\.\.\), got ")


@pytest.mark.parametrize("drafter,given", [
    ("draft", r"'draft' of type str, which lacks tree, init, propose, commit, cache_slack, "
              r"check_compatible"),
    (5, r"5 of type int, which lacks tree"),
    ({"num_tokens": 4}, r"\{'num_tokens': 4\} of type dict, which lacks tree"),
    (js.PromptLookup, r"the class PromptLookup itself: pass an instance, e\.g\. PromptLookup\(\.\.\.\)"),
])
def test_generate_refuses_what_is_not_a_drafter(target, drafter, given):
    _refused(target, drafter, _NOT_A_DRAFTER + given)


def test_generate_refuses_a_model_as_drafter(target):
    _refused(target, target, _NOT_A_DRAFTER + r"a js\.Model: wrap a draft model as js\.DraftModel")


def test_generate_tokens_refuses_what_is_not_a_drafter(target, tiny):
    tokens, lengths = jnp.zeros((1, 16), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match=_NOT_A_DRAFTER + "'draft' of type str"):
        js.speculative.generate_tokens(target, "draft", tokens, lengths, tiny.max_new,
                                       js.Sampling(), jax.random.PRNGKey(0))


def test_any_object_with_the_drafter_protocol_passes(target):
    """Duck typing: a future drafter (Eagle, Medusa) needs the protocol, not a base class."""
    from jaxspec.speculative.drafters.base import PROTOCOL, check_drafter

    @dataclasses.dataclass(frozen=True)
    class Wrapped:  # forwards everything to a prompt-lookup drafter
        inner: js.PromptLookup

        def __getattr__(self, name):
            return getattr(self.inner, name)

    lookup = js.PromptLookup(ngram=2, num_tokens=4)
    check_drafter(lookup)
    check_drafter(js.DraftModel(target, num_tokens=2))
    check_drafter(Wrapped(lookup))
    assert PROTOCOL == ("tree", "init", "propose", "commit", "cache_slack", "check_compatible")


# -- compatibility with the target ------------------------------------------------------------

def _refused(target, drafter, match, prompts=([1, 2, 3],), max_new_tokens=8):
    """generate must refuse before compiling or running anything."""
    before = dict(COMPILATIONS)
    with pytest.raises(ValueError, match=match):
        js.generate(target, list(prompts), max_new_tokens=max_new_tokens, drafter=drafter)
    assert dict(COMPILATIONS) == before


def test_refuses_draft_with_another_vocabulary_size(tiny, target):
    """No tokenizers: a padded vocabulary cannot be told from a different one."""
    draft = tiny.make_model(1, vocab=48)
    _refused(target, js.DraftModel(draft, num_tokens=4),
             r"draft vocabulary size 48 differs from the target's 32 \(and without tokenizers")


def test_refuses_draft_with_another_tokenizer(tiny, target, unrelated_draft):
    """Same vocabulary size, but one token means something else."""
    target = target.replace(tokenizer=tiny.make_tokenizer(_words(32)))
    draft = unrelated_draft.replace(tokenizer=tiny.make_tokenizer(_words(32, rename=5)))
    _refused(target, js.DraftModel(draft, num_tokens=4),
             r"the draft's tokenizer differs from the target's "
             r"\(e\.g\. target has \[\('w5', 5\)\]\); a draft must share the target's tokenizer")


def test_refuses_draft_vocabulary_smaller_than_the_tokenizer(tiny, target):
    tokenizer = tiny.make_tokenizer(_words(32))
    target = target.replace(tokenizer=tokenizer)
    draft = tiny.make_model(1, vocab=16).replace(tokenizer=tokenizer)
    _refused(target, js.DraftModel(draft, num_tokens=4),
             r"the tokenizer has 32 tokens but the draft's vocabulary is 16")


@pytest.mark.parametrize("drafter", ["draft_model", "prompt_lookup"])
def test_refuses_draft_slots_beyond_the_context(drafter, tiny, target):
    """10 + 50 positions fit max_position_embeddings = 64, 10 + 50 + 9 draft slots do not."""
    assert tiny.max_positions == 64
    prompt = list(range(1, 11))
    check_lengths(target, [prompt], 50)                 # fine without a drafter
    made = (js.DraftModel(target, num_tokens=8) if drafter == "draft_model"
            else js.PromptLookup(ngram=2, num_tokens=8))
    _refused(target, made, r"prompt 0 has 10 tokens; with max_new_tokens=50 and 9 draft slots "
                           r"it needs 69 positions, but the model supports at most 64",
             prompts=[prompt], max_new_tokens=50)


def test_refuses_draft_longer_than_the_draft_models_context(target):
    with pytest.raises(ValueError, match="num_tokens=64 is larger than the draft model's context"):
        js.DraftModel(target, num_tokens=64).check_compatible(target)


def _padded(model, tokenizer, factor):
    """model with its vocabulary padded from 32 to 64: embedding rows copied, LM head columns
    32 + i = factor * column i (so logit(32 + i) = factor * logit(i))."""
    params = dict(model.params)
    params["embed"] = jnp.concatenate([params["embed"], params["embed"]], axis=0)       # [64, D]
    kernel = model.params["lm_head"]["kernel"]                                          # [D, 32]
    params["lm_head"] = {"kernel": jnp.concatenate([kernel, factor * kernel], axis=1)}  # [D, 64]
    return js.Model(config=dataclasses.replace(model.config, vocab_size=64), params=params,
                    tokenizer=tokenizer)


@pytest.mark.parametrize("which", ["draft", "target"])
def test_padded_vocabulary_is_accepted_and_exact(which, tiny, target, greedy_ref):
    """Same 32-token tokenizer, one embedding padded to 64 rows: accepted, and exact.

    draft padded: the draft is the target plus padding whose LM-head columns are twice the real
    ones, so a draft that argmax-ed over its whole vocabulary would propose the nonexistent
    tokens 32.. and never be accepted. Restricted to the shared vocabulary it proposes the
    target's own greedy tokens: everything is accepted.
    target padded: the padding columns are half the real ones, below the (positive) top logit,
    so the padded target's greedy output is the unpadded one's; the 32-token draft's logits are
    extended with -inf, and it is again the target itself on the real vocabulary.
    """
    tokenizer = tiny.make_tokenizer(_words(32))
    unpadded = target.replace(tokenizer=tokenizer)
    if which == "draft":
        target, draft = unpadded, _padded(unpadded, tokenizer, 2.0)
    else:
        target, draft = _padded(unpadded, tokenizer, 0.5), unpadded
    out = js.generate(target, tiny.prompts, max_new_tokens=tiny.max_new,
                      drafter=js.DraftModel(draft, num_tokens=4))
    np.testing.assert_array_equal(out.tokens, greedy_ref.tokens)
    assert out.stats["acceptance_rate"] == 1.0
    assert out.texts == [" ".join(f"w{t}" for t in row) for row in greedy_ref.tokens]


# -- prompt lookup: the search ----------------------------------------------------------------

# (history, ngram) -> history index of the first proposed token, or None when nothing matches.
LOOKUP_CASES = [
    ([1, 2, 3, 1, 2], 2, 2),                        # the last bigram occurred at 0
    ([1, 2, 7, 1, 2, 8, 1, 2], 2, 5),               # the latest earlier occurrence wins
    ([5, 1, 9, 4, 1], 2, 2),                        # no bigram match: falls back to the unigram
    ([5, 1, 9, 4, 2], 2, None),                     # nothing matches
    ([7, 7, 7], 2, 2),                              # a window may overlap the tail
    ([3], 2, None),                                 # too short for any earlier window
    ([4, 4], 2, 1),                                 # too short for n = 2, n = 1 matches
    ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 3, 3),         # the longest n first (n = 2 would say 6)
    ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2, 6),
]


@pytest.mark.parametrize("ngram", [2, 3])
def test_find_continuation(ngram):
    cases = [c for c in LOOKUP_CASES if c[1] == ngram]
    width = 16
    # Past each row's length the buffer holds a copy of the row: matches there must not count.
    history = np.asarray([(h * width)[:width] for h, _, _ in cases], np.int32)
    lengths = np.asarray([len(h) for h, _, _ in cases], np.int32)
    start, found = jax.jit(find_continuation, static_argnums=(2, 3))(
        jnp.asarray(history), jnp.asarray(lengths), ngram, 4)
    for (h, _, expected), s, f in zip(cases, np.asarray(start), np.asarray(found)):
        assert (int(s) if f else None) == expected, h


def _ctx(history, lengths, active):
    history = jnp.asarray(history, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    return Context(history=history, length=lengths, cache_lengths=lengths - 1,
                   active=jnp.asarray(active))


def test_prompt_lookup_proposes_only_committed_tokens():
    """Row 0: after [1 2 3 1 2] propose 3 1 2 (not past the history); row 1 finished; row 2 no
    match: the root alone."""
    history = [[1, 2, 3, 1, 2, 0, 0, 0]] * 2 + [[1, 2, 3, 4, 5, 0, 0, 0]]
    lookup = js.PromptLookup(ngram=2, num_tokens=4)
    draft = jax.jit(lambda ctx: lookup.propose(None, ctx, js.Sampling(), None, 32)[0])(
        _ctx(history, [5, 5, 5], [True, False, True]))
    assert draft.q is None
    np.testing.assert_array_equal(draft.tokens, [[2, 3, 1, 2, 0], [2, 0, 0, 0, 0], [5, 0, 0, 0, 0]])
    np.testing.assert_array_equal(draft.valid, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(draft.parents, [[-1, 0, 1, 2, 3]] * 3)


# -- draft model: the adaptive length ---------------------------------------------------------

def test_auto_draft_length_schedule(target):
    """+2 after a fully accepted round, -1 otherwise, within [1, max_tokens]."""
    drafter = js.DraftModel(target, num_tokens="auto", max_tokens=6)
    current = jnp.asarray([1, 5, 6, 3, 1, 2], jnp.int32)
    drafted = np.asarray([1, 5, 6, 3, 1, 1])   # a row may stop early (the confidence rule)
    accepted = jnp.asarray([1, 5, 2, 0, 0, 1], jnp.int32)
    valid = jnp.asarray(np.arange(7)[None, :] <= drafted[:, None])
    draft = Draft(tokens=jnp.zeros((6, 7), jnp.int32), parents=jnp.zeros((6, 7), jnp.int32),
                  valid=valid)
    verdict = Verdict(path=jnp.zeros((6, 7), jnp.int32), num_accepted=accepted,
                      next_token=jnp.zeros((6,), jnp.int32))
    state = DraftModelState(cache=None, num_tokens=current)
    new = drafter.commit(state, None, draft, verdict, None)
    np.testing.assert_array_equal(new.num_tokens, [3, 6, 5, 2, 1, 4])
    fixed = js.DraftModel(target, num_tokens=4)
    assert fixed.commit(state, None, draft, verdict, None) is state


def test_draft_model_num_tokens_and_chain_must_agree(target):
    assert js.DraftModel(target).num_tokens == 5
    assert js.DraftModel(target, tree=js.trees.chain(3)).num_tokens == 3
    with pytest.raises(ValueError, match=r"num_tokens=6 disagrees with tree=chain\(4\)"):
        js.DraftModel(target, num_tokens=4).replace(num_tokens=6)
    with pytest.raises(ValueError, match=r"max_tokens=4 disagrees with tree=chain\(8\)"):
        js.DraftModel(target, num_tokens="auto").replace(max_tokens=4)
