"""Random-access sources shared by the tasks (all picklable, none import grain).

- `WindowSource`: fixed-length windows of one long token array (text).
- `ArraySource`: the rows of a pre-built `[n, N]` array (flights).
- `GeneratedSource`: example i is a pure function of (data_seed, split, i) (maze, synthetic tasks),
  so nothing is generated ahead of time and every host or worker sees the same example i.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.data.task import data_check

SPLIT_IDS = {"train": 0, "val": 1}


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} examples")
    return index


class WindowSource:
    """Windows `tokens[i*stride : i*stride + seq_len]` as `np.int32[seq_len]`.

    stride 1 gives every start offset (train); stride seq_len gives non-overlapping windows (val).
    `tokens` may be a read-only memmap; windows are copied out as int32.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int):
        if len(tokens) < seq_len:
            raise ValueError(f"{len(tokens)} tokens are fewer than one window of {seq_len}")
        self.tokens = tokens  # [T]
        self.seq_len = int(seq_len)
        self.stride = int(stride)
        self._len = (len(tokens) - self.seq_len) // self.stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        start = _check_index(index, self._len) * self.stride
        return np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int32)  # [N]


class ArraySource:
    """The rows of an `[n, N]` array, returned as `np.int32[N]` copies."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int32)  # [n, N]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.rows[_check_index(index, len(self.rows))].copy()  # [N]


def example_rng(data_seed: int, split: str, index: int) -> random.Random:
    """A Python RNG that depends only on (data_seed, split, index), mixed by numpy's SeedSequence.

    Python's Mersenne Twister seeded from an int, read only through `random()`, gives the same
    stream on every platform and Python version.
    """
    state = np.random.SeedSequence([int(data_seed), SPLIT_IDS[split], int(index)]).generate_state(4)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


def generated_options(opts: dict) -> dict:
    """The options of a generated task with n_train and n_val (integers >= 1) and data_seed (an
    integer >= 0) checked and made Python ints; a bad value raises DataError."""
    minimum = {"n_train": 1, "n_val": 1, "data_seed": 0}
    return {**opts, **{name: data_check(check_int, name, opts[name], low)
                       for name, low in minimum.items()}}


class GeneratedSource:
    """`n` examples; example i is `make(example_rng(data_seed, split, i))` -> `np.int32[N]`.

    `make` must be picklable (a module-level function or a functools.partial of one).
    """

    def __init__(self, make: Callable[[random.Random], np.ndarray], n: int, data_seed: int,
                 split: str):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        self.make = make
        self.n = int(n)
        self.data_seed = int(data_seed)
        self.split = split

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        index = _check_index(index, self.n)
        return np.asarray(self.make(example_rng(self.data_seed, self.split, index)), np.int32)
