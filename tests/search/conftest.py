"""Shared pieces of the beam-search tests: ragged prompts, transformers' beam search as the
reference, and stop tokens that really end hypotheses.

The checkpoints (tests/conftest.py) have no eos token, so a search runs to its length limit
unless the test names stop tokens. `stop_tokens_for` picks tokens from the best hypotheses of a
search without stop tokens: with them, hypotheses finish at different lengths, which is where the
length penalty, the early-stopping modes and the finished-hypothesis pool matter.
"""

from __future__ import annotations

import numpy as np
import pytest

VOCAB = 128
PROMPT_LENGTHS = (9, 4, 1)    # one ragged batch (prompt bucket 16)


@pytest.fixture(scope="session")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENGTHS]


def _hf_beam_search(checkpoint, prompt, num_beams, max_new_tokens, stop_tokens=None,
                    num_return_sequences=None, **kwargs):
    """transformers' generate(num_beams=k, do_sample=False) on one prompt ->
    [(generated tokens up to and including the stop token, sequence score)], best first."""
    import torch

    out = checkpoint.hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
        num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences or num_beams,
        eos_token_id=list(stop_tokens) if stop_tokens else None,
        return_dict_in_generate=True, output_scores=True, **kwargs)
    hypotheses = []
    for row, score in zip(out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()):
        ends = [i for i, t in enumerate(row) if stop_tokens and t in stop_tokens]
        hypotheses.append((row[:ends[0] + 1] if ends else row, score))
    return hypotheses


@pytest.fixture(scope="session")
def hf_beam_search():
    return _hf_beam_search


@pytest.fixture(scope="session")
def stop_tokens_for():
    def pick(hypotheses):
        """Two distinct stop tokens from the hypotheses (per prompt, token lists, best first):
        the third token of the first prompt's best, and the first other token among the next
        prompts' hypotheses from their fifth token on (tiny random models repeat themselves)."""
        first = hypotheses[0][0][2]
        later = [t for per_prompt in hypotheses[1:] for h in per_prompt for t in h[4:]]
        second = next(t for t in later + [t for h in hypotheses[0] for t in h] if t != first)
        return sorted({first, second})
    return pick


def _assert_same_hypotheses(out, references, num_return_sequences, label="", pad=0):
    """js.beam_search's rows against per-prompt reference lists [(tokens, score)], best first."""
    assert out.tokens.shape[0] == len(references) * num_return_sequences
    for i, reference in enumerate(references):
        for j in range(num_return_sequences):
            row = i * num_return_sequences + j
            tokens = out.tokens[row, :out.lengths[row]].tolist()
            assert tokens == list(reference[j][0]), f"{label} prompt {i} hypothesis {j}"
            np.testing.assert_allclose(out.sequence_scores[row], reference[j][1], atol=1e-4,
                                       rtol=0, err_msg=f"{label} prompt {i} hypothesis {j}")
            assert np.all(out.tokens[row, out.lengths[row]:] == pad), f"{label} padding"


@pytest.fixture(scope="session")
def assert_same_hypotheses():
    return _assert_same_hypotheses
