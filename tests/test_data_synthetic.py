"""Synthetic tasks: runs test numbers, correctness checks, and the generated data."""

import math

import numpy as np
import pytest

from sigma_jax.data import DataError, load_task
from sigma_jax.data import synthetic as syn


def test_runs_test_hand_computed():
    seq = [0, 0, 1, 1, 0, 1, 0, 0, 0, 1]  # n=10, n0=6, n1=4, runs 00|11|0|1|000|1 = 6
    mu = 2 * 6 * 4 / 10 + 1  # 5.8
    var = 48 * (48 - 10) / (10**2 * 9)  # 1824 / 900
    z, p = syn.runs_test(seq)
    assert z == pytest.approx((6 - mu) / math.sqrt(var), abs=1e-12)
    assert z == pytest.approx(0.1404879, abs=1e-6)
    assert p == pytest.approx(0.8882745, abs=1e-6)
    # alternating: runs 10, n0 = n1 = 5, mu 6, var 2000/900, z = 4 / 1.490712 = 2.683282
    z, p = syn.runs_test([0, 1] * 5)
    assert z == pytest.approx(2.6832816, abs=1e-6)
    assert p == pytest.approx(math.erfc(2.6832816 / math.sqrt(2)), abs=1e-7)
    assert p == pytest.approx(0.0072903, abs=1e-6)


def test_runs_test_degenerate_and_sorted():
    assert syn.runs_test_pvalue(np.zeros(100, int)) == 1.0  # one symbol: no evidence, see docstring
    assert syn.runs_test_pvalue(np.ones(100, int)) == 1.0
    assert syn.runs_test_pvalue([1]) == 1.0
    sorted_seq = np.r_[np.zeros(90, int), np.ones(10, int)]  # 2 runs where ~19 are expected
    z, p = syn.runs_test(sorted_seq)
    assert z == pytest.approx((2 - 19) / math.sqrt(1800 * 1700 / (10**4 * 99)), abs=1e-9)
    assert p < 1e-12
    assert not syn.product_correct(sorted_seq)


def test_product_samples_pass_runs_test():
    task = load_task("product", n_val=500)
    samples = np.stack([task.val[i] for i in range(500)])  # [500, 100]
    assert samples.dtype == np.int32 and samples.shape == (500, 100)
    assert set(np.unique(samples)) <= {0, 1}
    assert abs(samples.mean() - 0.1) < 0.01
    rate = task.metrics(samples, samples)["correct_rate"]
    assert rate >= 0.99  # nominally 0.999; the normal approximation is coarse at n1 ~ 10
    assert task.metrics(np.sort(samples, axis=1), samples)["correct_rate"] < 0.05


def test_step_task_and_check():
    task = load_task("step")
    assert (task.vocab_size, task.seq_len, task.prompt_len) == (2, 100, 0)
    xs = np.stack([task.train[i] for i in range(200)])
    assert all(syn.step_correct(x) for x in xs)
    assert (xs.sum(axis=1) == 10).all()
    assert len({int(np.argmax(x)) for x in xs}) > 30  # offsets vary
    good = np.zeros(100, int)
    good[90:] = 1  # a run touching the end: 1 transition
    assert syn.step_correct(good)
    two_runs = np.zeros(100, int)
    two_runs[10:15] = two_runs[50:55] = 1
    eleven = np.zeros(100, int)
    eleven[20:31] = 1
    nonbinary = good.copy()
    nonbinary[0] = 2
    assert not syn.step_correct(two_runs)
    assert not syn.step_correct(eleven)
    assert not syn.step_correct(nonbinary)
    bad = np.stack([good, two_runs, eleven, nonbinary])
    assert task.metrics(bad, bad)["correct_rate"] == 0.25


def test_step_scales_with_length():
    task = load_task("step", seq_len=50)
    x = task.train[3]
    assert x.shape == (50,) and x.sum() == 5 and syn.step_correct(x)
    assert syn.step_run_len(100) == 10 and syn.step_run_len(7) == 1


def test_permutation_task_and_check():
    task = load_task("permutation")
    assert (task.vocab_size, task.seq_len) == (100, 100)
    xs = np.stack([task.train[i] for i in range(50)])
    assert all(syn.permutation_correct(x) for x in xs)
    assert len({x.tobytes() for x in xs}) == 50
    dup = xs[0].copy()
    dup[1] = dup[0]
    out_of_range = xs[0].copy()
    out_of_range[np.argmax(out_of_range)] = 100
    assert not syn.permutation_correct(dup)
    assert not syn.permutation_correct(out_of_range)
    assert syn.permutation_correct(xs[1], xs[0])
    metrics = task.metrics(np.stack([xs[0], dup, xs[2], out_of_range]), xs[:4])
    assert metrics == {"correct_rate": 0.5}


def test_generation_is_deterministic_per_index():
    a, b = load_task("product"), load_task("product")
    assert np.array_equal(a.train[7], b.train[7])
    assert not np.array_equal(a.train[7], a.train[8])
    assert not np.array_equal(a.train[7], a.val[7])
    c = load_task("permutation", data_seed=1)
    assert not np.array_equal(c.train[7], load_task("permutation").train[7])
    assert len(load_task("step", n_train=123).train) == 123
    with pytest.raises(IndexError):
        load_task("step", n_train=5).train[5]


def test_synthetic_errors():
    with pytest.raises(DataError, match="n_walls"):
        load_task("product", n_walls=3)
    with pytest.raises(DataError, match="data_path"):
        load_task("step", data_path="x.txt")


@pytest.mark.parametrize("options, message", [
    ({"n_train": -1}, "n_train must be an integer >= 1; got -1"),
    ({"n_train": 2.7}, "n_train must be an integer >= 1; got 2.7"),
    ({"n_val": "5"}, "n_val must be an integer >= 1; got '5'"),
    ({"data_seed": -1}, "data_seed must be an integer >= 0; got -1"),
    ({"seq_len": True}, "seq_len must be an integer >= 2; got True"),
    ({"seq_len": 1}, "seq_len must be an integer >= 2; got 1"),
])
def test_synthetic_bad_options_raise_one_line(options, message):
    with pytest.raises(DataError) as e:
        load_task("product", **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_synthetic_numpy_int_options_and_integer_decode():
    task = load_task("permutation", seq_len=np.int64(4), n_train=np.int64(3))
    assert type(task.seq_len) is int and task.seq_len == 4 and len(task.train) == 3
    assert task.decode([3, 1]) == "3 1" and load_task("step").decode([]) == ""
    for name in ("product", "permutation"):
        with pytest.raises(DataError, match=r"^tokens must hold integer token ids; got dtype "
                                            r"float64$"):
            load_task(name).decode([0.0, 1.0])
