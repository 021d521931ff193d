"""Unconditional synthetic tasks of the σ-GPT paper (arXiv 2404.09562): `product`, `step`,
`permutation`.

- product: i.i.d. Bernoulli(p = 0.1) bits, length 100, V = 2. Correct: Wald-Wolfowitz runs test
  p-value > 0.001 (`runs_test_pvalue`).
- step: bits, length 100, all zero except one run of `run_len` ones at a uniform offset, V = 2.
  run_len = max(1, round(seq_len / 10)), i.e. 10 at the default length: the run keeps a tenth of
  the sequence when seq_len changes. Correct: <= 2 transitions and exactly run_len ones.
- permutation: a uniform permutation of 0..N-1, V = N (100). Correct: a permutation of 0..N-1.
Every task has prompt_len 0 and `metrics(...) -> {"correct_rate": fraction of correct samples}`.
Example i of a split is a pure function of (data_seed, split, i).
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.data.sources import GeneratedSource, generated_options
from sigma_jax.data.task import DataError, Task, check_options, data_check, token_row

TASKS = ("product", "step", "permutation")
OPTIONS = {"n_train": 250_000, "n_val": 10_000, "data_seed": 0}
PRODUCT_P = 0.1
RUNS_ALPHA = 0.001
DEFAULT_SEQ_LEN = 100


def runs_test(seq) -> tuple[float, float]:
    """Wald-Wolfowitz runs test of a binary sequence with the observed counts n0, n1.

    runs = 1 + number of changes; mu = 2 n0 n1 / N + 1;
    var = 2 n0 n1 (2 n0 n1 - N) / (N^2 (N - 1)); z = (runs - mu) / sqrt(var);
    p = erfc(|z| / sqrt 2).
    Degenerate case: when var == 0 (one symbol only, or N <= 2) the number of runs is fixed by
    (n0, n1), so the test has no evidence against independence: it returns (0.0, 1.0). A
    sequence of one symbol is therefore judged by its counts alone, which this test does not test.
    Returns (z, two-sided p-value).
    """
    x = np.asarray(seq).ravel()
    n = x.size
    n1 = int(np.count_nonzero(x))
    n0 = n - n1
    runs = 1 + int(np.count_nonzero(x[1:] != x[:-1])) if n else 0
    prod2 = 2 * n0 * n1
    var = prod2 * (prod2 - n) / (n * n * (n - 1)) if n > 1 else 0.0
    if var <= 0:
        return 0.0, 1.0
    z = (runs - (prod2 / n + 1)) / math.sqrt(var)
    return z, math.erfc(abs(z) / math.sqrt(2))


def runs_test_pvalue(seq) -> float:
    """Two-sided p-value of `runs_test` (1.0 for degenerate sequences, see there)."""
    return runs_test(seq)[1]


def product_correct(seq) -> bool:
    """Binary, and the runs test does not reject independence at level 0.001."""
    x = np.asarray(seq)
    return bool(np.isin(x, (0, 1)).all()) and runs_test_pvalue(x) > RUNS_ALPHA


def step_run_len(seq_len: int) -> int:
    """Ones in a `step` sequence: a tenth of seq_len (10 at the default 100)."""
    return max(1, round(seq_len / 10))


def step_correct(seq, run_len: int | None = None) -> bool:
    """Binary, <= 2 transitions and exactly `run_len` ones (default `step_run_len(len(seq))`)."""
    x = np.asarray(seq).ravel()
    k = step_run_len(x.size) if run_len is None else run_len
    if not np.isin(x, (0, 1)).all():
        return False
    return int(np.count_nonzero(x[1:] != x[:-1])) <= 2 and int(x.sum()) == k


def permutation_correct(seq, ref=None) -> bool:
    """sorted(seq) == sorted(ref); without `ref`, seq must be a permutation of 0..len(seq)-1."""
    x = np.sort(np.asarray(seq).ravel())
    target = np.arange(x.size) if ref is None else np.sort(np.asarray(ref).ravel())
    return bool(np.array_equal(x, target))


def make_product(rng: random.Random, seq_len: int) -> np.ndarray:
    return np.asarray([rng.random() < PRODUCT_P for _ in range(seq_len)], dtype=np.int32)


def make_step(rng: random.Random, seq_len: int) -> np.ndarray:
    k = step_run_len(seq_len)
    start = int(rng.random() * (seq_len - k + 1))
    x = np.zeros(seq_len, np.int32)
    x[start:start + k] = 1
    return x


def make_permutation(rng: random.Random, seq_len: int) -> np.ndarray:
    x = list(range(seq_len))
    for i in range(seq_len - 1, 0, -1):  # Fisher-Yates through random() only (stable stream)
        j = int(rng.random() * (i + 1))
        x[i], x[j] = x[j], x[i]
    return np.asarray(x, dtype=np.int32)


def correct_rate(samples, references, *, check) -> dict[str, float]:
    """{"correct_rate": fraction of rows of samples[B, N] for which check(sample, reference)}."""
    s, r = np.asarray(samples), np.asarray(references)
    ok = [check(a, b) for a, b in zip(s, r, strict=True)]
    return {"correct_rate": float(np.mean(ok)) if ok else 0.0}


def _product_check(sample, ref):
    return product_correct(sample)


def _step_check(sample, ref):
    return step_correct(sample)


def decode_bits(tokens) -> str:
    """Integer ids [N] -> '0' / '1' per id ('?' for other ids)."""
    return "".join("01"[t] if t in (0, 1) else "?" for t in token_row(tokens).tolist())


def decode_ints(tokens) -> str:
    """Integer ids [N] -> the ids, space separated."""
    return " ".join(str(t) for t in token_row(tokens).tolist())


_SPECS = {  # name -> (make, check(sample, ref), decode)
    "product": (make_product, _product_check, decode_bits),
    "step": (make_step, _step_check, decode_bits),
    "permutation": (make_permutation, permutation_correct, decode_ints),
}


def build(name: str, seq_len=None, data_path=None, **options) -> Task:
    opts = generated_options(check_options(name, options, OPTIONS))
    if data_path is not None:
        raise DataError(f"task {name!r} is generated and reads no file; drop data_path")
    n = data_check(check_int, "seq_len", DEFAULT_SEQ_LEN if seq_len is None else seq_len, 2)
    make, check, decode = _SPECS[name]
    make = functools.partial(make, seq_len=n)
    return Task(
        name=name,
        vocab_size=n if name == "permutation" else 2,
        seq_len=n,
        prompt_len=0,
        train=GeneratedSource(make, opts["n_train"], opts["data_seed"], "train"),
        val=GeneratedSource(make, opts["n_val"], opts["data_seed"], "val"),
        decode=decode,
        metrics=functools.partial(correct_rate, check=check),
    )
