"""The `Task` record every data pipeline returns, the `Source` protocol, and `DataError`.

A task bundles what training, sampling and evaluation need to know about one data set: the
vocabulary size, the sequence length N, the prompt length used at evaluation time, two random-access
sources (train and val) of `np.int32[N]` examples, and the functions that print, encode and score
sequences.
This module imports neither grain nor jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


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


def check_options(task_name: str, given: dict, allowed: dict) -> dict:
    """`given` options merged over the `allowed` defaults; an unknown name raises DataError."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise DataError(
            f"unknown option(s) {', '.join(unknown)} for task {task_name!r}; valid options: {valid}"
        )
    return {**allowed, **given}
