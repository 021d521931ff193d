"""load_task / make_iterator: shapes, determinism, host shards, resume, lazy grain, errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sigma_jax.data import TASK_NAMES, DataError, data_dir, load_task, make_iterator

DATA = Path(os.environ.setdefault("SIGMA_JAX_DATA", "/work/shared/data"))
FILES = {"shakespeare_char": ["tinyshakespeare/input.txt"],
         "text_bpe": ["tinyshakespeare/input.txt", "gpt2/gpt2.tiktoken"],
         "flights": ["flights/quickstart.json.gz"]}
SMALL = {"shakespeare_char": {"seq_len": 64}, "text_bpe": {"seq_len": 128}, "maze": {},
         "product": {}, "step": {}, "permutation": {}, "flights": {}}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SIGMA_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "sigma_jax_cache"))


def _task(name, **options):
    missing = [f for f in FILES.get(name, []) if not (DATA / f).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not under {DATA} (set SIGMA_JAX_DATA)")
    return load_task(name, **{**SMALL[name], **options})


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_data_dir_reads_env():
    assert data_dir() == DATA


@pytest.mark.parametrize("name", TASK_NAMES)
def test_batches_shape_dtype_vocab(name):
    task = _task(name)
    it = make_iterator(task, "train", 4, seed=0, process_index=0, process_count=1)
    for batch in _take(it, 2):
        assert batch.shape == (4, task.seq_len) and batch.dtype == np.int32
        assert batch.min() >= 0 and batch.max() < task.vocab_size
    val = next(make_iterator(task, "val", 2, seed=0, process_index=1, process_count=2))
    assert val.shape == (1, task.seq_len) and val.dtype == np.int32
    assert 0 <= task.prompt_len < task.seq_len
    assert isinstance(task.decode(val[0]), str)


@pytest.mark.parametrize("name", ["shakespeare_char", "maze", "product"])
def test_same_seed_same_batches(name):
    task = _task(name)
    def first(seed):
        return np.stack(_take(make_iterator(task, "train", 4, seed, process_index=0,
                                            process_count=1), 3))
    a, b, c = first(0), first(0), first(1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_host_shards_are_disjoint_and_cover():
    task = load_task("permutation", n_train=40)  # every example distinct
    shards = []
    for pi in range(2):
        it = make_iterator(task, "train", 4, seed=3, process_index=pi, process_count=2,
                           repeat=False)
        shards.append({row.tobytes() for batch in it for row in batch})
    assert len(shards[0]) == len(shards[1]) == 20
    assert shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == {task.train[i].tobytes() for i in range(40)}


def test_unshuffled_single_epoch_is_source_order():
    task = load_task("step", n_val=10)
    it = make_iterator(task, "val", 5, 0, process_index=0, process_count=1, shuffle=False,
                       repeat=False, num_threads=0)
    batches = list(it)
    assert len(batches) == 2
    assert np.array_equal(np.concatenate(batches), np.stack([task.val[i] for i in range(10)]))


def test_epochs_reshuffle():
    task = load_task("permutation", n_train=8)
    batches = _take(make_iterator(task, "train", 8, 0, process_index=0, process_count=1), 2)
    key = [[row.tobytes() for row in b] for b in batches]
    assert set(key[0]) == set(key[1]) and key[0] != key[1]


@pytest.mark.parametrize("name", ["permutation", "shakespeare_char"])
def test_get_state_set_state_resumes(name):
    task = _task(name, **({"n_train": 10} if name == "permutation" else {}))
    kwargs = dict(process_index=0, process_count=1)
    it = make_iterator(task, "train", 4, 7, **kwargs)
    _take(it, 3)  # crosses an epoch boundary for the 10-example source
    state = it.get_state()
    expected = _take(it, 4)
    resumed = make_iterator(task, "train", 4, 7, **kwargs)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 4), strict=True):
        assert np.array_equal(want, got)


def test_default_process_index_and_count_from_jax():
    it = make_iterator(load_task("product"), "train", 2, 0)  # single process: 0 of 1
    assert next(it).shape == (2, 100)


def test_errors():
    with pytest.raises(DataError, match="valid tasks: shakespeare_char, text_bpe, maze"):
        load_task("mnist")
    with pytest.raises(DataError, match="dist_mim"):
        load_task("maze", dist_mim=12)
    task = load_task("product", n_val=3)
    with pytest.raises(DataError, match="process_count"):
        make_iterator(task, "train", 3, 0, process_index=0, process_count=2)
    with pytest.raises(DataError, match="process_index"):
        make_iterator(task, "train", 4, 0, process_index=2, process_count=2)
    with pytest.raises(DataError, match="split"):
        make_iterator(task, "test", 4, 0, process_index=0, process_count=1)
    with pytest.raises(DataError, match="fewer than one local batch"):
        make_iterator(task, "val", 8, 0, process_index=0, process_count=1, repeat=False)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("call, message", [
    (lambda task: make_iterator(task, "train", 4, -1),
     "seed must be an integer in [0, 9223372036854775807]; got -1"),
    (lambda task: make_iterator(task, "train", 4, 0.5),
     "seed must be an integer in [0, 9223372036854775807]; got 0.5"),
    (lambda task: make_iterator(task, "train", "4", 0), "batch_size must be an integer; got '4'"),
    (lambda task: load_task(["maze"]), "unknown task ['maze']; valid tasks: shakespeare_char"),
    (lambda task: make_iterator(task, "train", 4, 2**63),
     "seed must be an integer in [0, 9223372036854775807]; got 9223372036854775808"),
    (lambda task: make_iterator(task, "train", 4, 0, shuffle="no"),
     "shuffle must be True or False; got 'no'"),
    (lambda task: make_iterator(task, "train", 4, 0, repeat=None),
     "repeat must be True or False; got None"),
    (lambda task: make_iterator(task, "train", 4, 0, num_threads=-1),
     "num_threads must be an integer >= 0; got -1"),
    (lambda task: make_iterator(task, "train", 4, 0, prefetch_batches=1.5),
     "prefetch_batches must be an integer >= 0; got 1.5"),
    (lambda task: make_iterator(task, "train", 4, 0, process_index="0", process_count=1),
     "process_index must be an integer; got '0'"),
    (lambda task: make_iterator("product", "train", 4, 0),
     "task must be a Task (load_task(name)); got 'product'"),
])
def test_bad_arguments_raise_one_line(call, message):
    with pytest.raises(DataError) as e:
        call(load_task("product", n_val=3))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_numpy_flags_and_the_largest_seed_still_work():
    task = load_task("step", n_val=10)
    it = make_iterator(task, "val", 5, np.int64(2**63 - 1), process_index=0, process_count=1,
                       shuffle=np.bool_(False), repeat=False, num_threads=0)
    assert np.array_equal(np.concatenate(list(it)), np.stack([task.val[i] for i in range(10)]))


def test_grain_is_imported_lazily():
    code = ("import sys; import sigma_jax.data as d; "
            "import sigma_jax.data.text_char, sigma_jax.data.text_bpe, sigma_jax.data.maze, "
            "sigma_jax.data.synthetic, sigma_jax.data.flights, sigma_jax.data.fetch; "
            "d.load_task('maze').train[0]; assert 'grain' not in sys.modules, 'grain imported'")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
