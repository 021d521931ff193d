"""sigma_jax data pipelines: tasks (`load_task`) and grain iterators over them (`make_iterator`).

    task = load_task("maze")                       # Task: vocab_size, seq_len, prompt_len, ...
    it = make_iterator(task, "train", batch_size=64, seed=0)
    batch = next(it)                               # np.int32[64 // process_count, task.seq_len]
    state = it.get_state(); ...; it.set_state(state)   # resume at the same batch

grain is imported lazily (inside `make_iterator`), so tasks, metrics and decoding work where grain
is not installed. Files are found through `data_path=`, `$SIGMA_JAX_DATA`, the cache
(`$SIGMA_JAX_CACHE` or ~/.cache/sigma_jax) or a verified download; see `fetch`.
"""

from __future__ import annotations

import importlib

from sigma_jax.checks import check_bool, check_int, short_repr
from sigma_jax.config import MAX_SEED
from sigma_jax.data.fetch import cache_dir, data_dir
from sigma_jax.data.task import DataError, Source, Task, data_check

__all__ = ["TASK_NAMES", "DataError", "Source", "Task", "cache_dir", "data_dir", "load_task",
           "make_iterator"]

TASK_NAMES = ("shakespeare_char", "text_bpe", "maze", "product", "step", "permutation", "flights")
_MODULES = {"shakespeare_char": "text_char", "text_bpe": "text_bpe", "maze": "maze",
            "product": "synthetic", "step": "synthetic", "permutation": "synthetic",
            "flights": "flights"}


def load_task(name: str, *, seq_len: int | None = None, data_path=None, **options) -> Task:
    """Build the task `name` (one of TASK_NAMES).

    Args:
      name: task name.
      seq_len: tokens per example; None = the task's default (shakespeare_char 256, text_bpe 1024,
        maze 2*height*width = 546 (fixed by the grid), product/step/permutation 100, flights 256).
      data_path: the task's input file where it reads one (text file, flights .json.gz).
      **options: task-specific options (e.g. maze `dist_min=12`); an unknown name raises DataError.
    Raises:
      DataError: unknown task or option, a missing file, or an invalid value.
    """
    if not isinstance(name, str) or name not in _MODULES:
        raise DataError(f"unknown task {short_repr(name)}; valid tasks: {', '.join(TASK_NAMES)}")
    module = importlib.import_module(f"sigma_jax.data.{_MODULES[name]}")
    if module.__name__.endswith(".synthetic"):
        return module.build(name, seq_len=seq_len, data_path=data_path, **options)
    return module.build(seq_len=seq_len, data_path=data_path, **options)


def make_iterator(task: Task, split: str, batch_size: int, seed: int, *,
                  process_index: int | None = None, process_count: int | None = None,
                  shuffle: bool = True, repeat: bool = True, num_threads: int = 2,
                  prefetch_batches: int = 4):
    """A grain iterator over `split` of `task`, yielding `np.int32[batch_size // process_count, N]`.

    This process reads the examples `process_index::process_count` of the split (disjoint across
    processes, together the whole split), shuffled with `seed` (a new order each epoch) when
    `shuffle`, repeated forever when `repeat`, and batched with the last partial batch dropped.
    The same arguments give the same batches. The iterator has grain's `get_state()` /
    `set_state(state)`: an iterator built with the same arguments and given a saved state continues
    at the batch that followed the save. `num_threads` / `prefetch_batches` set grain's background
    reading (0 threads reads in the calling thread).

    Raises:
      DataError: a task that is not a `Task`; a seed, batch_size, process_index, process_count,
        num_threads or prefetch_batches that is not an integer (seed in [0, MAX_SEED],
        num_threads and prefetch_batches >= 0); shuffle or repeat not True or False; batch_size
        not divisible by process_count, bad process_index, unknown split, or a shard with fewer
        examples than one local batch when `repeat` is False.
    """
    import grain  # lazily: grain is not installed on every machine

    if not isinstance(task, Task):
        raise DataError(f"task must be a Task (load_task(name)); got {short_repr(task)}")
    seed = data_check(check_int, "seed", seed, 0, MAX_SEED)
    shuffle = data_check(check_bool, "shuffle", shuffle)
    repeat = data_check(check_bool, "repeat", repeat)
    batch_size = data_check(check_int, "batch_size", batch_size)
    num_threads = data_check(check_int, "num_threads", num_threads, 0)
    prefetch_batches = data_check(check_int, "prefetch_batches", prefetch_batches, 0)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index = data_check(check_int, "process_index", process_index)
    process_count = data_check(check_int, "process_count", process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must lie in [0, process_count="
                        f"{process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"batch_size={batch_size} must be a positive multiple of process_count="
                        f"{process_count}; change the batch size")
    local = batch_size // process_count
    ds = grain.MapDataset.source(task.source(split))[process_index::process_count]
    if len(ds) < local:
        raise DataError(f"the {split} split of {task.name!r} has {len(ds)} examples per process, "
                        f"fewer than one local batch of {local}; lower batch_size")
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(local, drop_remainder=True)
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=prefetch_batches if num_threads else 0)
    return iter(ds.to_iter_dataset(options))
