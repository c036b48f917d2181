"""Corpus selection, stable split, packing, deterministic batches, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxspec.models.default import TARGET_DIR
from jaxspec.train import data


def test_stdlib_files_exclude_tests_and_site_packages():
    root = data.stdlib_root()
    files = data.stdlib_files(root)
    rels = [p.relative_to(root).as_posix() for p in files]
    assert len(rels) > 100
    assert any(r == "os.py" for r in rels)
    for r in rels:
        parts = r.split("/")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts[:-1]), r
        assert r.endswith(".py")
    assert rels == sorted(rels)


def test_split_is_stable_and_disjoint():
    root = data.stdlib_root()
    files = data.stdlib_files(root)
    train, heldout = data.split_files(files, root)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(files)
    assert 0 < len(heldout) < 0.15 * len(files)
    # The split depends only on the relative path.
    assert data.is_heldout("json/decoder.py") == data.is_heldout("json/decoder.py")
    assert [data.is_heldout(p.relative_to(root).as_posix()) for p in heldout] == [True] * len(heldout)


def test_pack_and_batches():
    stream = np.arange(50, dtype=np.int32)
    seqs = data.pack(stream, 8)                                    # [6, 9], overlap by one
    assert seqs.shape == (6, 9)
    np.testing.assert_array_equal(seqs[1], np.arange(8, 17))
    b = data.Batcher(seqs, 4, seed=3)
    x, pos = b.batch(0)
    assert x.shape == (4, 9) and pos == 4
    y, pos2 = b.batch(4)                                           # crosses into epoch 1
    assert pos2 == 8
    np.testing.assert_array_equal(b.batch(4)[0], y)                # pure function of position
    epoch0 = np.concatenate([b.batch(0)[0], b.batch(4)[0][:2]])
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, seqs))  # each sequence once per epoch
    with pytest.raises(ValueError, match="too short for one sequence"):
        data.pack(np.arange(5, dtype=np.int32), 8)
    assert len(data.eval_batches(seqs, 4)) == 1


@pytest.fixture(scope="module")
def tokenizer_and_files(tmp_path_factory):
    """The shipped tokenizer with the held-out files, else a tiny one trained here."""
    root = data.stdlib_root()
    train, heldout = data.split_files(data.stdlib_files(root), root)
    if (TARGET_DIR / "tokenizer.json").is_file():
        return data.load_tokenizer(TARGET_DIR), heldout, True
    tok = data.train_tokenizer(data.read_texts(train[:20]), vocab_size=600)
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(d))
    return data.load_tokenizer(d), heldout[:10], False


def test_tokenizer_round_trips_heldout_files_byte_for_byte(tokenizer_and_files):
    tok, files, shipped = tokenizer_and_files
    checked = 0
    for p in files:
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        ids = data.encode(tok, text)
        assert data.decode(tok, ids).encode("utf-8") == raw, p
        checked += 1
    assert checked >= min(5, len(files))
    for s in ["    def f(x):\n\treturn  x \r\n", "  leading", "trailing  \n\n\n", "ünïcödé → ✓ 🐍",
              "<|endoftext|>"]:
        assert data.decode(tok, data.encode(tok, s)) == s
    assert tok.convert_ids_to_tokens(data.encode(tok, "<|endoftext|>")) == ["<|endoftext|>"]


def test_tokenizer_special_tokens(tokenizer_and_files):
    tok, _, shipped = tokenizer_and_files
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0
    if shipped:
        assert len(tok) == 8192
        cfg = json.loads((TARGET_DIR / "config.json").read_text())
        assert cfg["eos_token_id"] == cfg["bos_token_id"] == cfg["pad_token_id"] == tok.eos_token_id
        assert cfg["vocab_size"] == len(tok)
