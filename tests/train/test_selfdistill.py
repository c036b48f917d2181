"""jaxspec.train.selfdistill.generate_corpus / read_corpus on a tiny random target.

* Batches are formed in order of prompt length (each shard's prompts are no longer than the
  next shard's), and read_corpus gives the sequences back in the prompts' order, each one its
  prompt followed by the target's greedy answer to that prompt alone.
* A removed shard is generated again on resume, identically.
* A directory whose shards were written before `index` existed resumes in prompt order.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxspec as js
from jaxspec.models import create
from jaxspec.models.config import ModelConfig
from jaxspec.train.selfdistill import generate_corpus, read_corpus

MAX_NEW = 5


@pytest.fixture(scope="module")
def target():
    config = ModelConfig(family="llama", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64,
                         max_position_embeddings=128)
    return create(config, 3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = [9, 2, 30, 5, 17, 3, 12]
    return [[int(t) for t in rng.integers(1, 40, size=n)] for n in lengths]


@pytest.fixture(scope="module")
def alone(target, prompts):
    """Each prompt's greedy answer, generated on its own."""
    answers = []
    for p in prompts:
        res = js.generate(target, [p], max_new_tokens=MAX_NEW)
        answers.append(res.tokens[0, :res.lengths[0]].tolist())
    return answers


def _quiet(_):
    pass


def test_batches_follow_prompt_length_and_read_back_in_prompt_order(tmp_path, target, prompts,
                                                                      alone):
    out = generate_corpus(target, prompts, tmp_path / "c", batch_size=2, max_new_tokens=MAX_NEW,
                          log=_quiet)
    shards = sorted(out.glob("shard_*.npz"))
    assert len(shards) == 4
    longest = [int(np.load(s)["prompt_lengths"].max()) for s in shards]
    shortest = [int(np.load(s)["prompt_lengths"].min()) for s in shards]
    assert all(a <= b for a, b in zip(longest, shortest[1:])), (shortest, longest)
    seqs = read_corpus(out)
    assert [plen for _, plen in seqs] == [len(p) for p in prompts]
    for (tokens, plen), p, answer in zip(seqs, prompts, alone):
        assert tokens[:plen].tolist() == p
        assert tokens[plen:].tolist() == answer


def test_a_removed_shard_is_generated_again(tmp_path, target, prompts):
    out = generate_corpus(target, prompts, tmp_path / "c", batch_size=3, max_new_tokens=MAX_NEW,
                          log=_quiet)
    before = [t.tolist() for t, _ in read_corpus(out)]
    (out / "shard_00001.npz").unlink()
    generate_corpus(target, prompts, out, batch_size=3, max_new_tokens=MAX_NEW, log=_quiet)
    assert [t.tolist() for t, _ in read_corpus(out)] == before


def test_a_directory_without_index_resumes_in_prompt_order(tmp_path, target, prompts, alone):
    out = tmp_path / "old"
    out.mkdir()
    first = [p + a for p, a in zip(prompts[:2], alone[:2])]   # shard 0 as written before `index`
    np.savez(out / "shard_00000.npz", tokens=np.concatenate([np.asarray(s, np.int32) for s in first]),
             offsets=np.cumsum([0] + [len(s) for s in first]).astype(np.int64),
             prompt_lengths=np.asarray([len(p) for p in prompts[:2]], np.int32))
    generate_corpus(target, prompts, out, batch_size=2, max_new_tokens=MAX_NEW, log=_quiet)
    assert all("index" not in np.load(s).files for s in out.glob("shard_*.npz"))
    seqs = read_corpus(out)
    assert [t.tolist() for t, _ in seqs] == [p + a for p, a in zip(prompts, alone)]
