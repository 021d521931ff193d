"""The training loop, `train`: data, checkpoints, metrics files, TensorBoard, a progress line, a
loss plot and SIGTERM handling around the one compiled step of `sigma_jax.train.step`.
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
from sigma_jax.checkpoint import CheckpointManager
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
from sigma_jax.train.step import EVAL_STREAM, evaluate, init_state, make_train_step


def configs_dict(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """Both configs as JSON-ready dicts: {"model": {...}, "train": {...}}."""
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg)}


def check_task(model_cfg: ModelConfig, task) -> None:
    """ValueError unless the model fits the task (vocabulary and sequence length)."""
    if model_cfg.vocab_size < task.vocab_size:
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} is smaller than task "
                         f"{task.name!r} vocabulary {task.vocab_size}")
    if task.seq_len > model_cfg.block_size:
        raise ValueError(f"task {task.name!r} has seq_len {task.seq_len} > model block_size "
                         f"{model_cfg.block_size}; set seq_len or block_size")


def check_workdir(workdir, model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[str]:
    """A workdir holds one model. ValueError if its config.json records a different model
    config; otherwise the names of the train fields that changed since (possibly none)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # unreadable: it is rewritten atomically by `train`
    new = configs_dict(model_cfg, train_cfg)
    if old.get("model") != new["model"]:
        changed = sorted(k for k in new["model"] if old.get("model", {}).get(k)
                         != new["model"][k])
        raise ValueError(f"workdir {workdir} holds a run of a different model ({', '.join(changed)}"
                         " differ); use a new --workdir or the same model settings")
    return sorted(k for k in new["train"] if old.get("train", {}).get(k) != new["train"][k])


def val_batches(task, train_cfg: TrainConfig) -> np.ndarray:
    """A fixed sample of validation batches, int32 [eval_batches, batch_size, N] (the same sample
    at every evaluation, so evaluations are comparable)."""
    it = make_iterator(task, "val", train_cfg.batch_size, train_cfg.seed, process_index=0,
                       process_count=1, shuffle=True, repeat=True, num_threads=0)
    return np.stack([np.asarray(next(it), np.int32) for _ in range(train_cfg.eval_batches)])


def _install_sigterm():
    """Route SIGTERM to a flag (main thread only). Returns (flag dict, restore callable)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None

    def handler(signum, frame):
        flag["signal"] = signum

    previous = signal.signal(signal.SIGTERM, handler)
    return flag, lambda: signal.signal(signal.SIGTERM, previous)


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
    metrics row (step, loss, val losses, ...), plus 'preempted' and 'resumed_from'.

    Files in workdir: config.json (both configs; atomic), checkpoints/ (orbax; the latest
    keep_checkpoints), metrics.jsonl (one JSON object per logged step), tb/ (TensorBoard, if
    tensorboardX is installed) and loss.png (at the end).

    Resume: an existing checkpoint in workdir is restored (params, optimizer, step, key and data
    iterator) and the run continues as if never interrupted; metric rows past the restored step
    are dropped, since they are recomputed identically. SIGTERM: finish the current step, save a
    checkpoint, wait for it, and return with preempted=True.

    mesh: a `jax.sharding.Mesh` or a `sharding.MeshConfig` (None: `sharding.local_mesh()`, one
    device). The whole loop runs under `jax.set_mesh(mesh)`: the state is created sharded
    (`init_state(mesh=...)`), each process's batch becomes one global batch
    (`sharding.place_local_batch`), the step is `make_train_step(mesh=...)`, and checkpoints
    restore onto the mesh's shardings (so a run saved under one mesh resumes under another).
    Multi-host (after `jax.distributed.initialize()`, every process calling `train` with the
    same arguments): each process reads its own share of every batch, checkpoints are saved
    collectively, and only process 0 logs and writes config.json, metrics and plots; a SIGTERM
    on any process stops all of them at the next logged step (they agree on it collectively).
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


def _train_loop(model_cfg, train_cfg, workdir: Path, task, log, mesh) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    configs = configs_dict(model_cfg, train_cfg)
    configs["task"] = {"name": task.name, "vocab_size": task.vocab_size,
                       "seq_len": task.seq_len, "prompt_len": task.prompt_len}
    primary = jax.process_index() == 0
    if not primary:
        log = lambda line: None  # noqa: E731 (only process 0 reports)
    multi = jax.process_count() > 1
    changed = check_workdir(workdir, model_cfg, train_cfg)
    if changed:
        log(f"note: train settings changed since the last run in {workdir}: {', '.join(changed)}")
    if primary:
        write_text_atomic(workdir / "config.json", json.dumps(configs, indent=2, sort_keys=True))

    state = init_state(model_cfg, train_cfg, mesh=mesh)
    step_fn = make_train_step(model_cfg, train_cfg, mesh, prompt_len=task.prompt_len)
    data_iter = make_iterator(task, "train", train_cfg.global_batch, train_cfg.seed)
    validation = val_batches(task, train_cfg)
    eval_key = jax.random.fold_in(jax.random.key(train_cfg.seed), EVAL_STREAM)
    prompt_len = task.prompt_len
    tokens_per_step = train_cfg.global_batch * task.seq_len

    manager = CheckpointManager(workdir, every=train_cfg.checkpoint_every,
                                           keep=train_cfg.keep_checkpoints)
    flag, restore_handler = _install_sigterm()
    writer = None
    try:
        state, resumed_from = manager.restore_latest(state, data_iter)
        step = start_step = int(state.step)
        writer = metrics_log.MetricsWriter(workdir, start_step=step, enabled=primary)
        if resumed_from is not None:
            log(f"resumed from step {resumed_from} in {workdir}")
        last = {"step": step}
        saved_step, stopped = resumed_from, False
        t_start = t_mark = time.perf_counter()
        interval = []  # device metrics of the steps since the last row
        while step < train_cfg.max_steps:
            batch = next(data_iter)
            batch = place_local_batch(batch, mesh)  # this process's rows -> one global batch
            state, metrics = step_fn(state, batch)
            step += 1
            interval.append(metrics)
            first = step == start_step + 1
            done = step == train_cfg.max_steps
            row_due = first or step % train_cfg.log_every == 0
            # Multi-host: processes agree on stopping at logged steps only (one tiny collective).
            stop = _stop_requested(flag, agree=row_due) if multi else flag["signal"] is not None
            eval_due = done or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
            if row_due or eval_due or stop:
                host = to_host(interval)  # the host sync of this interval
                seconds = time.perf_counter() - t_mark
                row = {"step": step, **{k: float(v) for k, v in host[-1].items()},
                       "loss_avg": float(np.mean([h["loss"] for h in host]))}
                if first:  # this interval is dominated by compilation: no throughput
                    row["compile_s"] = seconds
                else:
                    row["tokens_per_s"] = len(host) * tokens_per_step / max(seconds, 1e-9)
                    row["eta_s"] = (train_cfg.max_steps - step) * seconds / len(host)
                row["elapsed_s"] = time.perf_counter() - t_start
                if eval_due:
                    row.update(evaluate(model_cfg, train_cfg, state.params, validation,
                                        eval_key, step, prompt_len=prompt_len, mesh=mesh))
                writer.write(row)
                log(metrics_log.progress_line(row, train_cfg.max_steps))
                last = row
                t_mark, interval = time.perf_counter(), []
            if done or stop or manager.should_save(step):
                t_save = time.perf_counter()
                manager.save(step, state, data_iter=data_iter, configs=configs)
                saved_step = step
                t_mark += time.perf_counter() - t_save  # keep the blocking save out of tokens/s
            if stop:
                stopped = True
                got = flag["signal"] if flag["signal"] is not None else "on another process"
                log(f"signal {got} at step {step}: checkpoint saved; exiting")
                break
        if step == start_step:  # nothing to train: report the evaluation of the checkpoint
            last = {"step": step, **evaluate(model_cfg, train_cfg, state.params, validation,
                                             eval_key, step, prompt_len=prompt_len, mesh=mesh)}
        elif saved_step != step:
            manager.save(step, state, data_iter=data_iter, configs=configs)
        manager.wait()
    finally:
        restore_handler()
        manager.close()
        if writer is not None:
            writer.close()
    if primary:
        metrics_log.plot_losses(metrics_log.read_metrics(workdir / "metrics.jsonl"),
                                workdir / "loss.png")
    return {**last, "step": step, "preempted": stopped or flag["signal"] is not None,
            "resumed_from": resumed_from}
