"""`shakespeare_char`: character-level tiny-shakespeare (or any UTF-8 text file), as in nanoGPT.

Vocabulary: the sorted set of characters of the whole text (65 for tiny-shakespeare); token = rank.
Split: first `1 - val_fraction` of the characters (90%) train, the rest val.
Examples: windows of `seq_len` (default 256) tokens; train has one window per start offset, val has
non-overlapping windows. No prompt (prompt_len 0); no task metric (use cross-entropy).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.data import fetch
from sigma_jax.data.sources import WindowSource
from sigma_jax.data.task import (
    DataError,
    Task,
    check_fraction,
    check_options,
    check_text,
    data_check,
    token_row,
)

TINY_SHAKESPEARE = "tinyshakespeare/input.txt"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_SEQ_LEN = 256
OPTIONS = {"val_fraction": 0.1}


def locate_text(data_path=None) -> Path:
    """The text file: `data_path`, else tiny-shakespeare (shared folder, cache, or download)."""
    return fetch.locate(TINY_SHAKESPEARE, explicit=data_path, url=TINY_SHAKESPEARE_URL,
                        sha256=TINY_SHAKESPEARE_SHA256)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def split_point(n: int, val_fraction: float) -> int:
    """Index where val starts: int(n * (1 - val_fraction)), nanoGPT's rule; val_fraction is a
    number in (0, 1), else DataError."""
    val_fraction = check_fraction("val_fraction", val_fraction)
    return int(n * (1.0 - val_fraction))


def check_seq_len(seq_len, n_train: int, n_val: int) -> int:
    """A positive integer seq_len (as a Python int) that fits at least one window in each split,
    else DataError."""
    seq_len = data_check(check_int, "seq_len", seq_len, 1)
    if seq_len > min(n_train, n_val):
        raise DataError(
            f"seq_len={seq_len} exceeds the split sizes (train {n_train}, val {n_val} tokens); "
            "use a shorter seq_len or a longer text"
        )
    return seq_len


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [len(text)]


class CharVocab:
    """Sorted characters <-> ids; picklable, so Task functions can be bound methods."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self._codes = _codepoints("".join(self.chars))  # sorted, [V]

    def encode(self, text: str) -> np.ndarray:
        """String -> `np.int32[len(text)]`; a character outside the vocabulary, or a text that is
        not a string, raises DataError."""
        codes = _codepoints(check_text(text))
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_clipped] != codes
        if bad.any():
            c = chr(int(codes[np.argmax(bad)]))
            raise DataError(f"character {c!r} is not in the {len(self.chars)}-character "
                            "vocabulary; remove it from the input")
        return ids.astype(np.int32)

    def decode(self, tokens) -> str:
        """Integer ids [N] -> string; an id outside [0, V) prints as U+FFFD."""
        v = len(self.chars)
        ids = token_row(tokens).tolist()
        return "".join(self.chars[t] if 0 <= t < v else "\ufffd" for t in ids)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[CharVocab, np.ndarray]:
    text = read_text(Path(path))
    if not text:
        raise DataError(f"{path} is empty; pass a non-empty text file")
    vocab = CharVocab(text)
    return vocab, vocab.encode(text).astype(np.uint16 if len(vocab.chars) <= 65535 else np.int32)


def build(seq_len=None, data_path=None, **options) -> Task:
    opts = check_options("shakespeare_char", options, OPTIONS)
    check_fraction("val_fraction", opts["val_fraction"])
    n = data_check(check_int, "seq_len", DEFAULT_SEQ_LEN if seq_len is None else seq_len, 1)
    path = locate_text(data_path)
    vocab, tokens = _load(str(path))  # tokens [T]
    cut = split_point(len(tokens), opts["val_fraction"])
    train, val = tokens[:cut], tokens[cut:]
    n = check_seq_len(n, len(train), len(val))
    return Task(
        name="shakespeare_char",
        vocab_size=len(vocab.chars),
        seq_len=n,
        prompt_len=0,
        train=WindowSource(train, n, stride=1),
        val=WindowSource(val, n, stride=n),
        decode=vocab.decode,
        encode=vocab.encode,
    )
