"""`text_bpe`: GPT-2 BPE tokens (through tiktoken) of any UTF-8 text file, default tiny-shakespeare.

The encoder is built here from a local ranks file (`bpe_path`, else
`$SIGMA_JAX_DATA/gpt2/gpt2.tiktoken`, else the cache, else a download of tiktoken's public copy),
GPT-2's pre-tokenisation regex and `<|endoftext|>` = 50256: V = 50257. As in nanoGPT, the text is
cut at 90% of its characters and each part is encoded separately with `encode_ordinary`
(tiny-shakespeare: 301,966 + 36,059 = 338,025 tokens). Token arrays are cached as uint16 `.bin`
files in `cache_dir()/bpe`, keyed by the sha256 of the text and of the ranks file. Windows as in
`shakespeare_char`: train every start offset, val non-overlapping; default seq_len 1024.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.data import fetch, text_char
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

GPT2_RANKS = "gpt2/gpt2.tiktoken"
# tiktoken's public copy of the same ranks (its "r50k_base"; same sha256 as gpt2.tiktoken).
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation: contractions, letter runs, digit runs, other-symbol runs (each with an
# optional leading space), then whitespace not followed by non-space, then remaining whitespace.
GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
DEFAULT_SEQ_LEN = 1024
OPTIONS = {"bpe_path": None, "val_fraction": 0.1}


@functools.lru_cache(maxsize=2)
def gpt2_encoding(ranks_path: str):
    """A `tiktoken.Encoding` equal to GPT-2's (r50k), built from a local ranks file; a file that
    is not GPT-2's ranks raises DataError."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(ranks_path)
    except ValueError:  # a line that is not "<base64 token> <rank>"
        raise DataError(f"{ranks_path} is not a tiktoken ranks file (lines of '<base64 token> "
                        "<rank>'); pass the GPT-2 gpt2.tiktoken file as bpe_path") from None
    if len(ranks) != EOT_ID:
        raise DataError(f"{ranks_path} has {len(ranks)} ranks, GPT-2 has {EOT_ID}; "
                        "pass the GPT-2 gpt2.tiktoken file as bpe_path")
    return tiktoken.Encoding(name="gpt2_sigma_jax", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID})


def _write_bin(path: Path, tokens: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cached_tokens(text_path: Path, ranks_path: Path, val_fraction: float) -> dict[str, np.ndarray]:
    """{"train": uint16[T1], "val": uint16[T2]} memmaps, encoding the text once per cache key."""
    text_sha = fetch.sha256_file(text_path)
    ranks_sha = fetch.sha256_file(ranks_path)
    text = None
    out = {}
    for split in ("train", "val"):
        key = f"{text_sha[:16]}-{ranks_sha[:8]}-v{val_fraction}-{split}"
        path = fetch.cache_dir() / "bpe" / f"gpt2-{key}.bin"
        if not path.is_file():
            if text is None:
                text = text_char.read_text(text_path)
                cut = text_char.split_point(len(text), val_fraction)
                parts = {"train": text[:cut], "val": text[cut:]}
            enc = gpt2_encoding(str(ranks_path))
            _write_bin(path, enc.encode_ordinary(parts[split]))
        size = path.stat().st_size // 2
        out[split] = (np.memmap(path, dtype=np.uint16, mode="r") if size
                      else np.zeros(0, np.uint16))
    return out


class BpeCodec:
    """encode/decode for the task record; picklable (holds only the ranks path)."""

    def __init__(self, ranks_path: str):
        self.ranks_path = ranks_path

    def encode(self, text: str) -> np.ndarray:
        """String -> `np.int32[n]` (special tokens are encoded as plain text); a text that is not
        a string raises DataError."""
        text = check_text(text)
        return np.asarray(gpt2_encoding(self.ranks_path).encode_ordinary(text), dtype=np.int32)

    def decode(self, tokens) -> str:
        """Integer ids [N] -> string; ids outside [0, V) are dropped, invalid UTF-8 byte
        sequences print as U+FFFD."""
        ids = [t for t in token_row(tokens).tolist() if 0 <= t < VOCAB_SIZE]
        return gpt2_encoding(self.ranks_path).decode(ids, errors="replace")


def build(seq_len=None, data_path=None, **options) -> Task:
    opts = check_options("text_bpe", options, OPTIONS)
    check_fraction("val_fraction", opts["val_fraction"])
    n = data_check(check_int, "seq_len", DEFAULT_SEQ_LEN if seq_len is None else seq_len, 1)
    ranks_path = fetch.locate(GPT2_RANKS, explicit=opts["bpe_path"], url=GPT2_RANKS_URL,
                              sha256=GPT2_RANKS_SHA256, option="bpe_path")
    text_path = text_char.locate_text(data_path)
    tokens = cached_tokens(text_path, ranks_path, opts["val_fraction"])
    n = text_char.check_seq_len(n, len(tokens["train"]), len(tokens["val"]))
    codec = BpeCodec(str(ranks_path))
    return Task(
        name="text_bpe",
        vocab_size=VOCAB_SIZE,
        seq_len=n,
        prompt_len=0,
        train=WindowSource(tokens["train"], n, stride=1),
        val=WindowSource(tokens["val"], n, stride=n),
        decode=codec.decode,
        encode=codec.encode,
    )
