"""The training loop, `train`: data, checkpoints, metrics files, TensorBoard, a progress line, a
loss plot and SIGTERM / SIGINT handling around the one compiled step of `sigma_jax.train.step`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from sigma_jax import metrics_log
from sigma_jax.checkpoint import CheckpointManager, error_line
from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.data import load_task, make_iterator
from sigma_jax.metrics_log import write_text_atomic
from sigma_jax.sharding import (
    as_mesh,
    check_batch,
    mesh_text,
    place_local_batch,
    to_host,
)
from sigma_jax.train.step import (
    EVAL_STREAM,
    checked_batch,
    evaluate,
    init_state,
    make_train_step,
)
from sigma_jax.train.workdir import (
    CONFIG_FILE,
    check_workdir,
    configs_dict,
    make_workdir,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # finish the step, save, stop


class SaveError(RuntimeError):
    """A checkpoint or the metrics could not be written (a full disk, a lost file system, ...):
    training stopped at once; the checkpoints saved before it are intact. The message is one
    line."""


def check_task(model_cfg: ModelConfig, task) -> None:
    """ValueError unless the model fits the task (vocabulary and sequence length)."""
    if model_cfg.vocab_size < task.vocab_size:
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} is smaller than task "
                         f"{task.name!r} vocabulary {task.vocab_size}")
    if task.seq_len > model_cfg.block_size:
        raise ValueError(f"task {task.name!r} has seq_len {task.seq_len} > model block_size "
                         f"{model_cfg.block_size}; set seq_len or block_size")


def val_batches(task, train_cfg: TrainConfig) -> np.ndarray:
    """A fixed sample of validation batches, int32 [eval_batches, batch_size, N] (the same sample
    at every evaluation, so evaluations are comparable)."""
    it = make_iterator(task, "val", train_cfg.batch_size, train_cfg.seed, process_index=0,
                       process_count=1, shuffle=True, repeat=True, num_threads=0)
    return np.stack([np.asarray(next(it), np.int32) for _ in range(train_cfg.eval_batches)])


def _install_stop_handlers():
    """Route SIGTERM and SIGINT (Ctrl-C) to a flag (main thread only): training finishes the step
    under way, saves it and stops. A SIGINT that is ignored (a background job of a shell without
    job control) stays ignored. Returns (flag dict, restore callable)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None

    def handler(signum, frame):
        flag["signal"] = signum

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
                if not (signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN)}

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, old)

    return flag, restore


def check_batch_fits(train_cfg: TrainConfig, mesh) -> None:
    """One-line ValueError unless the batch can be split on `mesh`: batch_size (one micro-batch,
    and one evaluation batch) must divide over the batch axes, and the global batch
    (batch_size * grad_accum) over the processes, which each read their share of it."""
    try:
        check_batch(train_cfg.batch_size, mesh)
    except ValueError as error:
        raise ValueError(f"batch_size: {error} (mesh {mesh_text(mesh)})") from None
    processes = jax.process_count()
    if train_cfg.global_batch % processes:
        raise ValueError(f"batch_size * grad_accum = {train_cfg.global_batch} is not divisible "
                         f"by the {processes} processes; use a multiple of {processes}")


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, workdir, *, task=None,
          log: Callable[[str], None] = print, mesh=None) -> dict:
    """Train (or resume training) in `workdir` up to train_cfg.max_steps. Returns the final
    metrics row (step, loss, val losses, ...), plus 'preempted', 'signal' (the stop signal this
    process received, or None) and 'resumed_from'.

    Before anything is written, `check_workdir` (ValueError) checks the workdir against the
    configs; config.json is written only once the checkpoint (if any) has restored.

    Files in workdir: config.json (both configs; atomic), checkpoints/ (orbax; the latest
    keep_checkpoints), metrics.jsonl (one JSON object per logged step), tb/ (TensorBoard, if
    tensorboardX is installed) and loss.png (at the end).

    Resume: an existing checkpoint in workdir is restored (params, optimizer, step, key and data
    iterator) and the run continues as if never interrupted; metric rows past the restored step
    are dropped, since they are recomputed identically. SIGTERM or SIGINT (Ctrl-C): finish the
    current step, save a checkpoint, wait for it, and return with preempted=True.

    A checkpoint that cannot be written (its background write failed: a full disk, ...) raises
    SaveError (one line) at the next step, or at the next save or the end, whichever comes
    first; so does a metrics row that cannot be written. The checkpoints saved before are left
    as they were.

    mesh: a `jax.sharding.Mesh` or a `sharding.MeshConfig` (None: `sharding.local_mesh()`, one
    device). The whole loop runs under `jax.set_mesh(mesh)`: the state is created sharded
    (`init_state(mesh=...)`), each process's batch becomes one global batch
    (`sharding.place_local_batch`), the step is `make_train_step(mesh=...)`, and checkpoints
    restore onto the mesh's shardings (so a run saved under one mesh resumes under another).
    Multi-host (after `jax.distributed.initialize()`, every process calling `train` with the
    same arguments): each process reads its own share of every batch, checkpoints are saved
    collectively, and only process 0 logs and writes config.json, metrics and plots; a stop
    signal on any process, or a failed save, stops all of them at the next logged step (they
    agree on it collectively).
    """
    mesh = as_mesh(mesh)
    check_batch_fits(train_cfg, mesh)
    if task is None:
        task = load_task(train_cfg.task, seq_len=train_cfg.seq_len, data_path=train_cfg.data_path)
    check_task(model_cfg, task)
    with jax.set_mesh(mesh):
        return _train_loop(model_cfg, train_cfg, Path(workdir), task, log, mesh)


def _stop_requested(flag, agree: bool) -> bool:
    """Whether to stop now. agree: every process takes part, and all stop if any got a signal."""
    stop = flag["signal"] is not None
    if agree and jax.process_count() > 1:
        stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
    return stop


class _SaveWatch:
    """Waits in a background thread for the checkpoint save under way, so that a save that fails
    after `CheckpointManager.save` returned (the files are written in the background) is known
    at the next step. The main thread joins it before its own save, wait or close."""

    def __init__(self, manager: CheckpointManager):
        self.manager = manager
        self.failure: tuple[int, BaseException] | None = None  # (step, error)
        self._thread: threading.Thread | None = None

    def watch(self, step: int) -> None:
        self.join()
        self._thread = threading.Thread(target=self._wait, args=(step,), daemon=True,
                                        name=f"checkpoint-{step}-watch")
        self._thread.start()

    def _wait(self, step: int) -> None:
        try:
            self.manager.wait()
        except Exception as error:  # any failure of the background write
            if self.failure is None:
                self.failure = (step, error)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def error(self, at_step: int, other_process: bool = False) -> SaveError:
        if self.failure is None and other_process:
            return SaveError(f"a checkpoint save failed on another process; training stopped at "
                             f"step {at_step}; the checkpoints saved before it are intact")
        step, error = self.failure
        return SaveError(
            f"checkpoint {step} could not be saved in {self.manager.directory} "
            f"({error_line(error)}); training stopped at step {at_step}; the checkpoints "
            "saved before it are intact: fix the cause (e.g. free disk space) and rerun the "
            "same command to resume")


@dataclasses.dataclass
class _Run:
    """What a training run carries from step to step (mutated by the actions below)."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    mesh: jax.sharding.Mesh
    log: Callable[[str], None]
    configs: dict
    state: object
    step_fn: Callable
    data_iter: object
    validation: np.ndarray  # int32 [eval_batches, batch_size, N]
    eval_key: jax.Array
    prompt_len: int
    tokens_per_step: int
    manager: CheckpointManager
    watch: _SaveWatch
    writer: metrics_log.MetricsWriter
    flag: dict  # {"signal": None or the stop signal received}
    resumed_from: int | None
    step: int
    start_step: int
    saved_step: int | None
    last: dict
    t_start: float
    t_mark: float
    interval: list = dataclasses.field(default_factory=list)  # device metrics since the last row
    stopped: bool = False


def _train_loop(model_cfg, train_cfg, workdir: Path, task, log, mesh) -> dict:
    """`train` under its mesh: the checks, the run's files, then one action per step, then the
    last save."""
    primary = jax.process_index() == 0
    if not primary:
        log = lambda line: None  # noqa: E731 (only process 0 reports)
    changed = check_workdir(workdir, model_cfg, train_cfg)
    make_workdir(workdir)
    if changed:
        log(f"note: train settings changed since the last run in {workdir}: {', '.join(changed)}")
    configs = configs_dict(model_cfg, train_cfg)
    configs["task"] = {"name": task.name, "vocab_size": task.vocab_size,
                       "seq_len": task.seq_len, "prompt_len": task.prompt_len}
    manager = CheckpointManager(workdir, every=train_cfg.checkpoint_every,
                                keep=train_cfg.keep_checkpoints)
    watch = _SaveWatch(manager)
    flag, restore_handler = _install_stop_handlers()
    run, failed = None, False
    try:
        run = _start(model_cfg, train_cfg, workdir, task, log, mesh, configs, manager, watch,
                     flag)
        while run.step < train_cfg.max_steps and not run.stopped:
            _train_step(run)
        _finish(run)
    except BaseException:
        failed = True
        raise
    finally:
        restore_handler()
        watch.join()
        try:
            _close(manager.close, quiet=failed)
        finally:
            if run is not None:
                _close(run.writer.close, quiet=failed)
    if primary:
        metrics_log.plot_losses(metrics_log.read_metrics(workdir / "metrics.jsonl"),
                                workdir / "loss.png")
    return {**run.last, "step": run.step, "preempted": run.stopped or flag["signal"] is not None,
            "signal": flag["signal"], "resumed_from": run.resumed_from}


def _close(close: Callable[[], None], quiet: bool) -> None:
    """close(); quiet: ignore its error (another error is under way, and it is the one to
    report)."""
    try:
        close()
    except Exception:
        if not quiet:
            raise


def _start(model_cfg, train_cfg, workdir, task, log, mesh, configs, manager, watch,
           flag) -> _Run:
    """The state, step, data and validation of the run, restored from the latest checkpoint;
    then config.json (process 0, atomic) and the metrics writer."""
    state = init_state(model_cfg, train_cfg, mesh=mesh)
    data_iter = make_iterator(task, "train", train_cfg.global_batch, train_cfg.seed)
    state, resumed_from = manager.restore_latest(state, data_iter)
    step = int(state.step)
    if jax.process_index() == 0:
        write_text_atomic(workdir / CONFIG_FILE, json.dumps(configs, indent=2, sort_keys=True))
    writer = metrics_log.MetricsWriter(workdir, start_step=step, enabled=jax.process_index() == 0)
    if resumed_from is not None:
        log(f"resumed from step {resumed_from} in {workdir}")
    now = time.perf_counter()
    return _Run(
        model_cfg=model_cfg, train_cfg=train_cfg, mesh=mesh, log=log, configs=configs,
        state=state, step_fn=make_train_step(model_cfg, train_cfg, mesh,
                                             prompt_len=task.prompt_len),
        data_iter=data_iter, validation=val_batches(task, train_cfg),
        eval_key=jax.random.fold_in(jax.random.key(train_cfg.seed), EVAL_STREAM),
        prompt_len=task.prompt_len, tokens_per_step=train_cfg.global_batch * task.seq_len,
        manager=manager, watch=watch, writer=writer, flag=flag, resumed_from=resumed_from,
        step=step, start_step=step, saved_step=resumed_from, last={"step": step}, t_start=now,
        t_mark=now)


def _train_step(run: _Run) -> None:
    """One update, then what is due at its step: a metrics row (with an evaluation), a save, a
    stop agreed by every process."""
    cfg = run.train_cfg
    if jax.process_count() == 1 and run.watch.failure is not None:
        raise run.watch.error(run.step)
    rows = checked_batch(run.model_cfg, next(run.data_iter))  # this process's rows, on host
    run.state, metrics = run.step_fn.unchecked(run.state, place_local_batch(rows, run.mesh))
    run.step += 1
    run.interval.append(metrics)
    first = run.step == run.start_step + 1
    done = run.step == cfg.max_steps
    row_due = first or run.step % cfg.log_every == 0
    # Multi-host: processes agree on stopping at logged steps only (one tiny collective).
    stop = (_stop_requested(run.flag, agree=row_due) if jax.process_count() > 1
            else run.flag["signal"] is not None)
    if row_due and jax.process_count() > 1:  # a failed save stops every process together
        mine = run.watch.failure is not None
        if np.any(multihost_utils.process_allgather(np.int32(mine))):
            raise run.watch.error(run.step, other_process=not mine)
    eval_due = done or (cfg.eval_every and run.step % cfg.eval_every == 0)
    if row_due or eval_due or stop:
        _log_row(run, first, eval_due)
    if done or stop or run.manager.should_save(run.step):
        _save(run)
    if stop:
        run.stopped = True
        got = run.flag["signal"] if run.flag["signal"] is not None else "on another process"
        run.log(f"signal {got} at step {run.step}: checkpoint saved; exiting")


def _log_row(run: _Run, first: bool, eval_due: bool) -> None:
    """The metrics row of the steps since the last one (the interval's one host sync): losses,
    throughput (or the compile time of the first interval), and the evaluation when due."""
    host = to_host(run.interval)
    seconds = time.perf_counter() - run.t_mark
    row = {"step": run.step, **{k: float(v) for k, v in host[-1].items()},
           "loss_avg": float(np.mean([h["loss"] for h in host]))}
    if first:  # this interval is dominated by compilation: no throughput
        row["compile_s"] = seconds
    else:
        row["tokens_per_s"] = len(host) * run.tokens_per_step / max(seconds, 1e-9)
        row["eta_s"] = (run.train_cfg.max_steps - run.step) * seconds / len(host)
    row["elapsed_s"] = time.perf_counter() - run.t_start
    if eval_due:
        row.update(_evaluate(run))
    try:
        run.writer.write(row)
    except OSError as error:
        raise SaveError(f"the metrics could not be written in {run.writer.path.parent} "
                        f"({error_line(error)}); training stopped at step {run.step}; the "
                        "checkpoints saved before it are intact: fix the cause (e.g. free disk "
                        "space) and rerun the same command to resume") from None
    run.log(metrics_log.progress_line(row, run.train_cfg.max_steps))
    run.last = row
    run.t_mark, run.interval = time.perf_counter(), []


def _evaluate(run: _Run) -> dict:
    """The validation losses of the current params."""
    return evaluate(run.model_cfg, run.train_cfg, run.state.params, run.validation, run.eval_key,
                    run.step, prompt_len=run.prompt_len, mesh=run.mesh)


def _save(run: _Run) -> None:
    """Checkpoint the step (state and data iterator); its blocking time stays out of tokens/s.
    SaveError if the previous save failed, or this one fails before returning."""
    t_save = time.perf_counter()
    run.watch.join()
    if run.watch.failure is not None:
        raise run.watch.error(run.step)
    try:
        run.manager.save(run.step, run.state, data_iter=run.data_iter, configs=run.configs)
    except Exception as error:  # orbax raises a failure of the previous write here too
        run.watch.failure = run.watch.failure or (run.step, error)
        raise run.watch.error(run.step) from error
    run.watch.watch(run.step)
    run.saved_step = run.step
    run.t_mark += time.perf_counter() - t_save


def _finish(run: _Run) -> None:
    """After the last step: evaluate a run that had nothing to train, save an unsaved last step,
    and wait for the checkpoints to be written."""
    if run.step == run.start_step:
        run.last = {"step": run.step, **_evaluate(run)}
    elif run.saved_step != run.step:
        _save(run)
    run.watch.join()
    if run.watch.failure is None:
        try:
            run.manager.wait()
        except Exception as error:
            run.watch.failure = (run.step, error)
    if run.watch.failure is not None:
        raise run.watch.error(run.step)
