"""Corpus, tokenizer and the packed, static-shape data pipeline.

The corpus is the Python standard library of the running interpreter, split into train and
held-out files by a stable hash of each file's relative path. Text is tokenized with a
byte-level BPE tokenizer (lossless: every file round-trips byte for byte), documents are
joined with the end-of-text token, and the stream is cut into fixed-length sequences.

Batches are a pure function of (seed, data position): position p is the p-th sequence of an
endless stream of epochs, each epoch a seeded permutation of the sequences. Saving the
position in a checkpoint is therefore enough to resume the exact batch order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)

# Directory names (anywhere in the relative path) that hold tests or third-party code.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# -- corpus -----------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The `.py` files of the standard library, minus site-packages and test directories.

    Sorted by relative path so the list is the same on every run.
    """
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if any(part in _EXCLUDED_DIRS for part in rel[:-1]):
            continue
        if p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel_path: str, heldout_fraction: float = 0.05) -> bool:
    """Stable split: a file is held out when the hash of its relative path falls below the fraction."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
    return h / 2 ** 64 < heldout_fraction


def split_files(files: Sequence[Path], root: str | os.PathLike,
                heldout_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """(train, heldout) by `is_heldout` on the path relative to `root`."""
    root = Path(root)
    train, heldout = [], []
    for p in files:
        (heldout if is_heldout(p.relative_to(root).as_posix(), heldout_fraction) else train).append(p)
    return train, heldout


def read_texts(files: Iterable[Path]) -> list[str]:
    """UTF-8 file contents; files that are not valid UTF-8 are skipped (a few legacy encodings)."""
    out = []
    for p in files:
        try:
            out.append(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return out


# -- tokenizer --------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """A byte-level BPE tokenizer (GPT-2 style, no prefix space, lossless) as a
    `transformers.PreTrainedTokenizerFast` whose bos, eos and pad are `<|endoftext|>` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=None, clean_up_tokenization_spaces=False, add_prefix_space=False,
        model_max_length=1024)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def tokenize_documents(tokenizer, texts: Sequence[str], eos_id: int) -> np.ndarray:
    """One int32 stream: each document's tokens followed by the end-of-text token."""
    if not texts:
        return np.zeros((0,), np.int32)
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    total = sum(len(e) + 1 for e in enc)
    out = np.empty((total,), np.int32)
    i = 0
    for e in enc:
        out[i:i + len(e)] = e
        out[i + len(e)] = eos_id
        i += len(e) + 1
    return out


# -- packing and batches ----------------------------------------------------------------------

def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into sequences of seq_len + 1 tokens overlapping by one, so every
    stream token after the first is a target exactly once: [N, seq_len + 1] int32.
    The tail that does not fill a sequence is dropped."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"corpus of {len(stream)} tokens is too short for one sequence of "
                         f"{seq_len + 1} tokens; use more text or a shorter seq_len")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.ascontiguousarray(stream[idx].astype(np.int32))


@dataclasses.dataclass(frozen=True)
class Batcher:
    """Deterministic batches from packed sequences [N, T+1]; `batch(position)` returns the
    batch that starts at sequence `position` of the endless shuffled stream, and the next position."""

    sequences: np.ndarray
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if len(self.sequences) < 1:
            raise ValueError("no sequences to batch")

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))

    def batch(self, position: int) -> tuple[np.ndarray, int]:
        n = len(self.sequences)
        rows = []
        epoch, perm = None, None
        for p in range(position, position + self.batch_size):
            e = p // n
            if e != epoch:
                epoch, perm = e, self._perm(e)
            rows.append(perm[p % n])
        return self.sequences[np.asarray(rows)], position + self.batch_size  # [B, T+1]


def eval_batches(sequences: np.ndarray, batch_size: int, max_batches: int | None = None) -> list[np.ndarray]:
    """Held-out batches in order (no shuffle), each [B, T+1]; the ragged tail is dropped."""
    n = len(sequences) // batch_size
    if max_batches is not None:
        n = min(n, max_batches)
    if n == 0 and len(sequences):
        return [sequences[:batch_size]] if len(sequences) >= batch_size else [sequences]
    return [sequences[i * batch_size:(i + 1) * batch_size] for i in range(n)]
