"""The `Task` record every data pipeline returns, the `Source` protocol, and `DataError`.

A task bundles what training, sampling and evaluation need to know about one data set: the
vocabulary size, the sequence length N, the prompt length used at evaluation time, two random-access
sources (train and val) of `np.int32[N]` examples, and the functions that print, encode and score
sequences. The options and arguments of the tasks are checked by `sigma_jax.checks`, their
one-line errors raised as `DataError` (`data_check`).
This module does not import grain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from sigma_jax.checks import check_float, short_repr, token_ids


class DataError(ValueError):
    """A data problem the user can fix; its one-line message says what is wrong and what to do."""


@runtime_checkable
class Source(Protocol):
    """Random access: `len(src)` examples, `src[i]` -> `np.int32[seq_len]` for 0 <= i < len(src)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One data set, ready for training, sampling and evaluation.

    Attributes:
      name: the task name passed to `load_task`.
      vocab_size: V; every token id lies in [0, V).
      seq_len: N, tokens per example.
      prompt_len: length of the known prefix at evaluation/sampling time (0 = unconditional).
      train, val: sources of `np.int32[N]` examples.
      decode: tokens `[N]` -> printable string.
      encode: text tasks only: string -> `np.int32[n]`; raises DataError on unknown characters.
      metrics: `metrics(samples[B, N], references[B, N]) -> {name: float}`; None when the task has
        no task-specific metric (text: use the model's cross-entropy).
    """

    name: str
    vocab_size: int
    seq_len: int
    prompt_len: int
    train: Source
    val: Source
    decode: Callable[[np.ndarray], str]
    encode: Callable[[str], np.ndarray] | None = None
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None

    def source(self, split: str) -> Source:
        """The source for `split` ("train" or "val"); anything else raises DataError."""
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise DataError(f"unknown split {split!r} for task {self.name!r}; use 'train' or 'val'")


def data_check(check: Callable, *args, **kwargs):
    """`check(*args, **kwargs)`, a one-line check of `sigma_jax.checks` (its result returned),
    with its ValueError raised as DataError."""
    try:
        return check(*args, **kwargs)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e)) from None


def check_fraction(name: str, value) -> float:
    """`value` as a float in the open interval (0, 1), else DataError."""
    return data_check(check_float, name, value, 0.0, 1.0, low_open=True, high_open=True)


def check_text(text) -> str:
    """`text` for a task's `encode`: a string, else DataError."""
    if not isinstance(text, str):
        raise DataError(f"text must be a string; got {short_repr(text)}")
    return text


def token_row(tokens) -> np.ndarray:
    """`tokens` for a task's `decode`: one sequence of integer ids `[N]` (a list, a numpy or a
    jax array; `checks.token_ids`) as a numpy array, else DataError."""
    if not hasattr(tokens, "dtype"):
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            tokens = tokens.astype(np.int32)  # an empty list reads as float64
    tokens = np.asarray(data_check(token_ids, tokens))
    if tokens.ndim != 1:
        raise DataError(f"tokens must be one sequence [N]; got shape {tokens.shape}")
    return tokens


def check_options(task_name: str, given: dict, allowed: dict) -> dict:
    """`given` options merged over the `allowed` defaults; an unknown name raises DataError."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise DataError(
            f"unknown option(s) {', '.join(unknown)} for task {task_name!r}; valid options: {valid}"
        )
    return {**allowed, **given}
