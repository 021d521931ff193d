"""The one error of the torch checkpoint reader, and bounded, printable text for its messages.

- `CheckpointError`: a ValueError whose message is one line of printable characters, at most
  `MAX_MESSAGE` long (control characters, escape sequences and line breaks are escaped).
- `short_repr(value)`: a repr of about `limit` characters of any value a pickle can build, made
  in O(limit) steps whatever the value's size, sharing, depth or cycles.
- `reading(path)`: a context in which any exception but CheckpointError and FileNotFoundError
  becomes a CheckpointError naming `path` (MemoryError, RecursionError, zip and zlib errors...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

MAX_MESSAGE = 400
_ELLIPSIS = "..."


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with every non-printable character (ESC, newline, U+202E, ...) escaped as `\\xNN`,
    `\\uNNNN` or `\\UNNNNNNNN`, cut to at most `limit` characters (ending in '...' when cut).
    Idempotent: printable(printable(t)) == printable(t)."""
    out, size = [], 0
    for char in text[:limit]:
        piece = char if char.isprintable() else _escape(char)
        out.append(piece)
        size += len(piece)
        if size > limit:
            break
    line = "".join(out)
    if len(line) > limit or len(text) > limit:
        line = line[: limit - len(_ELLIPSIS)] + _ELLIPSIS
    return line


class CheckpointError(ValueError):
    """The file is not a published σ-GPT checkpoint we can read or express. Its message is one
    printable line of at most MAX_MESSAGE characters, whatever text it was built from."""

    def __init__(self, message: str):
        super().__init__(printable(str(message)))


class _Text(str):
    """A piece of a repr that is emitted as it is (brackets, separators)."""


def _leaf(value, limit: int) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, str | bytes):
        return repr(value[:limit]) + (_ELLIPSIS if len(value) > limit else "")
    if isinstance(value, np.number | np.bool_):  # a numpy scalar: its value, not a tensor
        return repr(value)[:limit]
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and all(type(n) is int for n in shape[:8]):
        return f"<tensor {list(shape[:8])}>"
    return f"<{type(value).__name__}>"


def _children(value) -> Iterator | None:
    """The pieces of a container's repr, lazily (children are yielded as values), or None for a
    value that is not a list, tuple or dict."""
    if isinstance(value, list | tuple):
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        pairs = ((None, item) for item in value)
    elif isinstance(value, dict):
        opening, closing = "{", "}"
        pairs = iter(value.items())
    else:
        return None

    def pieces():
        yield _Text(opening)
        for i, (key, item) in enumerate(pairs):
            if i:
                yield _Text(", ")
            if key is not None:
                yield key
                yield _Text(": ")
            yield item
        yield _Text(closing)

    return pieces()


def short_repr(value, limit: int = 60) -> str:
    """A printable repr of `value`, cut after about `limit` characters ('...' marks the cut).
    Containers (list, tuple, dict) are walked with an explicit stack, one piece at a time, so
    the cost is O(limit) for any size, depth, sharing or cycle; numpy number scalars print
    their value (np.int64(5)); ints over 64 bits, long strings, tensors and other objects are
    summarised."""
    parts: list[str] = []
    size = 0
    stack = [iter((value,))]
    while stack and size < limit:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        if isinstance(item, _Text):
            piece = str(item)
        else:
            children = _children(item)
            if children is not None:
                stack.append(children)
                continue
            piece = _leaf(item, limit)
        parts.append(piece)
        size += len(piece)
    text = "".join(parts)
    if stack or len(text) > limit:
        text = text[:limit] + _ELLIPSIS
    return printable(text, limit + len(_ELLIPSIS))


_END = object()


def _first_line(error: BaseException) -> str:
    """The message of `error` if it is a short string argument, else ''; never calls str() on
    arbitrary arguments (a KeyError of a huge key would build its whole repr)."""
    args = getattr(error, "args", ())
    text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
    return printable(text, 160)


@contextlib.contextmanager
def reading(path) -> Iterator[None]:
    """Run the body; any exception but CheckpointError and FileNotFoundError (MemoryError,
    RecursionError, OverflowError, BadZipFile, zlib.error, struct.error, EOFError, KeyError, ...)
    becomes `CheckpointError("<path> is damaged or not a torch checkpoint (<type>: <message>)")`."""
    try:
        yield
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as error:  # every other failure on a crafted file means "cannot read"
        detail = _first_line(error)
        kind = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise CheckpointError(f"{path} is damaged or not a torch checkpoint ({kind})") from error
