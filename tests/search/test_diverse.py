"""Diverse Beam Search against a plain-Python reference of Vijayakumar et al.'s algorithm.

transformers 5.x no longer ships group beam search (generate(num_beam_groups=...) points to a
Hub repository, which the tests cannot download), so the reference is written here: one prompt
at a time, lists of (score, tokens) hypotheses, log-probabilities from the transformers model on
each whole sequence (no KV cache). It follows the paper (groups choose in order at each step;
group g's log-probabilities are lowered by diversity_penalty x the number of beams of earlier
groups that chose the token at this step) with transformers' beam-search bookkeeping for
finished hypotheses, checked first: with one group it is transformers' beam search.
"""

from collections import Counter

import numpy as np
import pytest

import jaxspec as js

MAX_NEW = 10
NUM_BEAMS = 4


def _reference(logprobs, prompt, num_beams, num_groups, diversity_penalty, max_new_tokens,
               stop_tokens, length_penalty, early_stopping, num_return_sequences):
    """Diverse Beam Search on one prompt -> [(tokens, score)], best first.

    logprobs(tokens) -> log-probabilities [V] of the token after `tokens`."""
    size = num_beams // num_groups                   # beams per group
    width = max(2, 1 + len(stop_tokens)) * size      # candidates a group keeps per step
    beams = [[(0.0, ())] for _ in range(num_groups)]  # running (sum of log-probs, tokens)
    pools = [[] for _ in range(num_groups)]           # finished (score, tokens), best first
    open_ = [True] * num_groups                       # can the pool still improve
    for t in range(max_new_tokens):
        searching = [open_[g] and not (early_stopping is True and len(pools[g]) == size)
                     for g in range(num_groups)]
        if not any(searching):
            break
        chosen = Counter()                             # tokens picked at this step so far
        length = t + 1
        for g in range(num_groups):
            if not searching[g]:
                continue
            candidates = []
            for score, tokens in beams[g]:
                lp = logprobs(list(prompt) + list(tokens))
                candidates += [(score + float(lp[v]) - diversity_penalty * chosen[v], tokens + (v,))
                               for v in range(len(lp))]
            candidates = sorted(candidates, key=lambda c: -c[0])[:width]
            running = []
            for rank, (score, tokens) in enumerate(candidates):
                if tokens[-1] in stop_tokens or length == max_new_tokens:
                    if rank < size:       # only the top `size` may finish
                        pools[g].append((score / length ** length_penalty, tokens))
                elif len(running) < size:
                    running.append((score, tokens))
            pools[g] = sorted(pools[g], key=lambda c: -c[0])[:size]
            beams[g] = running
            chosen.update(tokens[-1] for _, tokens in running)
            bound = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
            if (len(pools[g]) == size and running
                    and running[0][0] / bound ** length_penalty <= pools[g][-1][0]):
                open_[g] = False
            if length == max_new_tokens:
                open_[g] = False
    best = sorted((h for pool in pools for h in pool), key=lambda c: -c[0])[:num_return_sequences]
    return [(list(tokens), score) for score, tokens in best]


@pytest.fixture(scope="module")
def llama(checkpoints):
    import torch

    ckpt = checkpoints["llama"]
    memo = {}

    def logprobs(tokens):
        key = tuple(tokens)
        if key not in memo:
            with torch.inference_mode():
                logits = ckpt.hf(torch.tensor([list(tokens)])).logits[0, -1].float()
            memo[key] = torch.log_softmax(logits, -1).numpy()
        return memo[key]

    return ckpt, logprobs


@pytest.fixture(scope="module")
def stops(llama, prompts, hf_beam_search, stop_tokens_for):
    ckpt, _ = llama
    return stop_tokens_for([[h for h, _ in hf_beam_search(ckpt, p, NUM_BEAMS, MAX_NEW)]
                            for p in prompts])


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.7, "never"),
                                                           (2.0, True)])
def test_reference_is_transformers_beam_search_with_one_group(llama, prompts, stops,
                                                              hf_beam_search, length_penalty,
                                                              early_stopping):
    ckpt, logprobs = llama
    for p in prompts:
        want = hf_beam_search(ckpt, p, NUM_BEAMS, MAX_NEW, stops, length_penalty=length_penalty,
                              early_stopping=early_stopping)
        got = _reference(logprobs, p, NUM_BEAMS, 1, 0.0, MAX_NEW, stops, length_penalty,
                         early_stopping, NUM_BEAMS)
        assert [h for h, _ in got] == [h for h, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4, rtol=0)


DIVERSE = [  # (num_beam_groups, diversity_penalty, length_penalty, early_stopping)
    (2, 1.5, 1.0, False),
    (2, 0.3, 2.0, True),
    (4, 1.0, 1.0, "never"),
    (4, 0.2, 1.0, False),
]


@pytest.mark.parametrize("groups,penalty,length_penalty,early_stopping", DIVERSE)
def test_matches_the_reference(llama, prompts, stops, assert_same_hypotheses, groups, penalty,
                               length_penalty, early_stopping):
    ckpt, logprobs = llama
    out = js.beam_search(ckpt.model, prompts, num_beams=NUM_BEAMS, max_new_tokens=MAX_NEW,
                         num_beam_groups=groups, diversity_penalty=penalty,
                         length_penalty=length_penalty, early_stopping=early_stopping,
                         num_return_sequences=NUM_BEAMS, stop_tokens=stops)
    refs = [_reference(logprobs, p, NUM_BEAMS, groups, penalty, MAX_NEW, stops, length_penalty,
                       early_stopping, NUM_BEAMS) for p in prompts]
    assert_same_hypotheses(out, refs, NUM_BEAMS, f"G={groups} penalty={penalty}")


def test_penalty_changes_the_hypotheses_and_zero_penalty_repeats_groups(llama, prompts, stops):
    """With diversity_penalty=0 the groups are identical searches, each plain beam search of its
    size: each hypothesis comes once per group. With a penalty they differ."""
    ckpt, _ = llama
    kwargs = dict(num_beams=NUM_BEAMS, max_new_tokens=MAX_NEW, num_beam_groups=2,
                  num_return_sequences=NUM_BEAMS, stop_tokens=stops)
    same = js.beam_search(ckpt.model, prompts, diversity_penalty=0.0, **kwargs)
    diverse = js.beam_search(ckpt.model, prompts, diversity_penalty=1.5, **kwargs)
    group_search = js.beam_search(ckpt.model, prompts, num_beams=2, max_new_tokens=MAX_NEW,
                                  num_return_sequences=2, stop_tokens=stops)
    for i in range(len(prompts)):
        rows = [tuple(same.tokens[i * NUM_BEAMS + j, :same.lengths[i * NUM_BEAMS + j]])
                for j in range(NUM_BEAMS)]
        assert rows[0] == rows[1] and rows[2] == rows[3], f"prompt {i}: groups repeat"
        np.testing.assert_allclose(same.sequence_scores[i * NUM_BEAMS:(i + 1) * NUM_BEAMS:2],
                                   group_search.sequence_scores[2 * i:2 * i + 2], atol=1e-5)
    assert not np.array_equal(same.tokens, diverse.tokens)
    # More distinct hypotheses than the 2 per prompt without penalty (not always 4: a group
    # may finish a hypothesis an earlier group finished too; only running beams are penalised).
    distinct = [len({tuple(diverse.tokens[i * NUM_BEAMS + j]) for j in range(NUM_BEAMS)})
                for i in range(len(prompts))]
    assert min(distinct) > 2, distinct
