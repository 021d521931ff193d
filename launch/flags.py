"""Flag helpers shared by the absl launchers (train, sample, bench, evaluate).

- `define_set_flag()`: the repeatable `--set key=value` flag.
- `apply_overrides(sets, groups)`: parse and type `--set` values against dataclass fields.
- `die(message)`: one line on stderr, exit code 2. `usage_errors()`: a context manager that turns
  ValueError / FileNotFoundError (DataError is a ValueError) into `die`.
- `positive_ints(name, values)`: a list flag of positive integers.
- `given(name, value, default)`: a flag's value or its default; an explicitly empty one refused.
- `output_path(path, flag)`: an output file (or folder) checked, its folder made, before any work.
- `one_line(text)`: an error message cut to one readable line.

Launchers validate everything (preset, overrides, configs, data) inside `usage_errors()` before
doing any work, so a user mistake costs one line and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import flags

USAGE_ERROR = 2
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def define_set_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define the repeatable --set flag (a no-op if it is already defined)."""
    if "set" in flag_values:
        return
    flags.DEFINE_multi_string(
        "set", [], "Override a config field: --set key=value (repeatable). Keys are field names "
        "of the configs; prefix with the group name (e.g. model.dropout, train.seed) when a name "
        "is ambiguous. Values are typed by the field: int, float, bool (true/false), str, none.",
        flag_values=flag_values)


def die(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print `error: <message>` as exactly one line on stderr and exit with `code` (2)."""
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn ValueError (incl. DataError) and FileNotFoundError into a one-line `die`."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        die(str(error) or type(error).__name__)


def positive_ints(name: str, values: Sequence[str]) -> tuple[int, ...]:
    """The strings of the list flag --`name` as positive ints. Raises ValueError (one line, naming
    the flag) for an empty list or an item that is not an integer >= 1."""
    out = []
    for text in values:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"--{name} takes positive integers; got {text!r}") from None
        if value < 1:
            raise ValueError(f"--{name} takes positive integers; got {text!r}")
        out.append(value)
    if not out:
        raise ValueError(f"--{name} must not be empty: give positive integers or leave the flag "
                         "out")
    return tuple(out)


def given(name: str, value, default, what: str = "a value"):
    """The value of the flag --`name`, or `default` when the flag is left out (None). An empty
    value (`--name=`: an empty list or a blank string) raises ValueError (one line, naming the
    flag and `what` it takes) rather than standing for the default."""
    if value is None:
        return default
    if isinstance(value, str | list | tuple) and not "".join(value).strip():
        raise ValueError(f"--{name} must not be empty: give {what}, or leave the flag out")
    return value


def output_path(path, flag: str, *, folder: bool = False) -> Path:
    """The output path of --`flag`, checked before any work so that no result is lost at the end.

    folder=False: a file path that is not a directory (an existing file is writable), whose
    folder exists or is created now. folder=True: a folder that exists or is created now (not a
    file). Raises ValueError (one line, naming the flag and the path) otherwise. Nothing is
    written but the missing folders.
    """
    path = Path(path)
    where = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"--{flag}={path} is a file, not a folder; give a folder (existing or "
                         "new)")
    if not folder and path.is_dir():
        raise ValueError(f"--{flag}={path} is a folder; give a file path")
    above = next((p for p in (where, *where.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"--{flag}={path}: {above} is a file, not a folder; give a path in a "
                         "folder")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--{flag}={path}: cannot create the folder {where} "
                         f"({error.strerror or error}); give a path in a writable folder") from None
    if not os.access(where, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--{flag}={path} is not writable; give a path in a writable folder")
    return path


_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec(\[\d+\])?='.*?'\]")


def one_line(text, limit: int = 300) -> str:
    """The first line of `text` (e.g. an exception's message) with its whitespace collapsed and
    the `[tensorstore_spec='...']` JSON that orbax errors carry dropped, its middle elided to
    `limit` characters so that it stays readable in a one-line error."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    line = " ".join(_TENSORSTORE_SPEC.sub("", lines[0] if lines else "").split())
    if len(line) <= limit:
        return line
    tail = limit // 3
    return f"{line[:limit - tail - 5]} ... {line[-tail:]}"


def print_warning(message) -> None:
    """A warning (e.g. a checkpoint skipped for an older one) as one `warning:` line on stderr."""
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def drop_closed_loop_reports() -> None:
    """Drop the "RuntimeError: Event loop is closed" reports that reach `sys.unraisablehook` when
    orbax closes the event loop of a failed restore or write while tensorstore's reads and
    callbacks are still in flight (their late results are discarded, nothing is lost); every
    other report goes to the hook installed before. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(report):
        if not (isinstance(report.exc_value, RuntimeError)
                and str(report.exc_value) == "Event loop is closed"):
            previous(report)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation))


def parse_value(text: str, annotation, name: str = "value"):
    """Parse the string `text` as `annotation` (int, float, bool, str, or a union of them with
    None, e.g. `int | None`). Raises ValueError naming `name` and the expected type."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or (
        typing.get_origin(annotation) is typing.Union) else (annotation,)
    if type(None) in options and text.strip().lower() in _NONE_WORDS:
        return None
    for kind in (t for t in options if t is not type(None)):
        word = text.strip()
        if kind is bool:
            if word.lower() in _TRUE_WORDS:
                return True
            if word.lower() in _FALSE_WORDS:
                return False
        elif kind is int:
            try:
                return int(word)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(word)
            except ValueError:
                pass
        elif kind is str:
            return text
        else:
            raise ValueError(f"{name} has type {_type_name(kind)}, which --set cannot parse")
    expected = " or ".join("none" if t is type(None) else _type_name(t) for t in options)
    raise ValueError(f"{name} must be {expected}; got {text!r}")


def apply_overrides(sets: Sequence[str],
                    groups: Mapping[str, tuple[type, Mapping[str, Any]]]) -> dict[str, dict]:
    """Apply `--set key=value` strings to groups of dataclass field values.

    groups: {group name: (dataclass type, current field values)}, e.g.
      {"model": (ModelConfig, {...}), "train": (TrainConfig, {...})}.
    A key is a field name of exactly one group's dataclass, or `group.field`. Values are typed by
    the field's annotation (see parse_value). Returns {group name: updated field values} (copies;
    the configs are then built, and validated, by the caller). Raises ValueError (one line) for a
    malformed item, an unknown or ambiguous key, or an ill-typed value.
    """
    out = {name: dict(values) for name, (_, values) in groups.items()}
    hints = {name: typing.get_type_hints(cls) for name, (cls, _) in groups.items()}
    fields = {name: [f.name for f in dataclasses.fields(cls)] for name, (cls, _) in groups.items()}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value; got {item!r}")
        group, dot, field = key.rpartition(".")
        if dot:
            if group not in groups:
                raise ValueError(f"unknown group {group!r} in --set {key}; groups: "
                                 f"{', '.join(groups)}")
            if field not in fields[group]:
                raise ValueError(f"unknown key {key!r}: {group} has no field {field!r}; valid: "
                                 f"{', '.join(fields[group])}")
            owners = [group]
        else:
            owners = [g for g in groups if key in fields[g]]
            if not owners:
                valid = sorted({f for names in fields.values() for f in names})
                raise ValueError(f"unknown key {key!r} in --set; valid keys: {', '.join(valid)}")
            if len(owners) > 1:
                raise ValueError(f"ambiguous key {key!r} (a field of {' and '.join(owners)}); "
                                 f"write {' or '.join(f'{g}.{key}' for g in owners)}")
            field = key
        owner = owners[0]
        out[owner][field] = parse_value(text, hints[owner][field], f"{owner}.{field}")
    return out
