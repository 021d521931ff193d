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
_TAG = re.compile(r"<missing>[^<]{0,20}(</?missing>)?|</missing>")  # what is left of a bad gap


def read_prompt(prompt: str) -> str:
    """The prompt text; `FILE:path` reads it from a UTF-8 text file (FileNotFoundError if
    absent; ValueError naming the file if it is a folder, unreadable or not UTF-8)."""
    if prompt.startswith("FILE:"):
        path = Path(prompt[5:])
        if path.is_dir():
            raise ValueError(f"prompt file {path} is a folder; give a text file")
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {path} is not UTF-8 text") from None
        except OSError as error:
            raise ValueError(f"cannot read prompt file {path} ({error.strerror or error})") \
                from None
    return prompt


def parse_prompt(text: str, encode: Callable[[str], np.ndarray], length: int,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [length], known bool [length]) from the prompt syntax.

    Raises ValueError (one line) when the prompt does not fit in `length` or `block_size` or holds
    a malformed gap (a `<missing>` or `</missing>` tag outside `<missing>N</missing>` with N a
    whole number), and whatever `encode` raises (a DataError naming the characters outside the
    vocabulary).
    """
    if length > block_size:
        raise ValueError(f"--length {length} exceeds the model's block_size {block_size}")
    pieces = _MISSING.split(text)  # alternating: text, count, text, count, ...
    runs = []  # (token ids or None for a gap, run length), checked against length as they come
    total = 0
    for i, piece in enumerate(pieces):
        if i % 2:  # a gap: its digits are bounded before they become a number
            run = (None, int(piece) if len(piece) <= len(str(length)) else length + 1)
        elif piece:
            bad = _TAG.search(piece)
            if bad:
                raise ValueError(f"malformed gap {bad.group()!r} in the prompt; write "
                                 "<missing>N</missing> with N the number of unknown tokens")
            ids = np.asarray(encode(piece), np.int32)
            run = (ids, ids.size)
        else:
            continue
        runs.append(run)
        total += run[1]
        if total > length:
            raise ValueError(f"the prompt is more than --length {length} tokens long "
                             f"(block_size {block_size}); shorten it or raise --length")
    tokens, known = np.zeros(length, np.int32), np.zeros(length, bool)
    at = 0
    for ids, size in runs:
        if ids is not None:
            tokens[at:at + size], known[at:at + size] = ids, True
        at += size
    return tokens, known
