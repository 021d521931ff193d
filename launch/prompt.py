"""Prompt syntax of the sample CLI: literal text with `<missing>N</missing>` for N unknown tokens,
padded with unknown tokens up to the requested length; `FILE:path` reads the prompt from a file.

Example: `abcd<missing>5</missing>jklm` with length 20 keeps "abcd" at 0-3 and "jklm" at 9-12 and
leaves 4-8 and 13-19 to the sampler (the published sample.py's convention).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

_MISSING = re.compile(r"<missing>\s*(\d+)\s*</?missing>")


def read_prompt(prompt: str) -> str:
    """The prompt text; `FILE:path` reads it from a file (FileNotFoundError if absent)."""
    if prompt.startswith("FILE:"):
        path = Path(prompt[5:])
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        return path.read_text()
    return prompt


def parse_prompt(text: str, encode: Callable[[str], np.ndarray], length: int,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [length], known bool [length]) from the prompt syntax.

    Raises ValueError (one line) when the prompt does not fit in `length` or `block_size`, and
    whatever `encode` raises (a DataError naming the characters outside the vocabulary).
    """
    if length > block_size:
        raise ValueError(f"--length {length} exceeds the model's block_size {block_size}")
    tokens, known = [], []
    pieces = _MISSING.split(text)  # alternating: text, count, text, count, ...
    for i, piece in enumerate(pieces):
        if i % 2:
            tokens += [0] * int(piece)
            known += [False] * int(piece)
        elif piece:
            ids = np.asarray(encode(piece), np.int32).tolist()
            tokens += ids
            known += [True] * len(ids)
    if len(tokens) > length:
        raise ValueError(f"the prompt is {len(tokens)} tokens long, more than --length {length} "
                         f"(block_size {block_size}); shorten it or raise --length")
    pad = length - len(tokens)
    return (np.asarray(tokens + [0] * pad, np.int32), np.asarray(known + [False] * pad, bool))
