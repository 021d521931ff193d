"""Checkpoints with orbax-checkpoint (the only module of sigma_jax that imports orbax).

Layout: <workdir>/checkpoints/<step>/ with four items:
  params       the parameter dict (StandardSave), restorable on its own by `load`;
  train_state  {"step", "opt_state", "key"} (the key as `jax.random.key_data`);
  data         the grain iterator state (one JSON file per process), when an iterator is given;
  config       the run's configs as JSON ({"model": ..., "train": ..., "task": ...});
  digest       checksums of params and train_state, taken when they were saved (JSON).

A restore recomputes the checksums of what it read and refuses a checkpoint whose files changed
after they were written (a flipped bit in the array data would otherwise load as a silently
different weight). Checkpoints without a digest restore unchecked.

Orbax writes a step into a temporary directory and renames it when complete, so a kill during a
save leaves the previous checkpoints untouched and the half-written one invisible. A finalised
checkpoint that fails to restore (e.g. a truncated file) is skipped with a warning, and moved to
<workdir>/corrupt_checkpoints/ (never deleted) once an older checkpoint has restored.

Meshes and hosts: a restore takes the shardings of its target (`restore`: the target state's
arrays; `load`: the params of `mesh`, or one local device), so a checkpoint saved under one mesh
restores under any other. Under multi-host (`jax.distributed.initialize()`) every process calls
save and restore (orbax coordinates them; each writes its own shards and its own data-iterator
state) and the workdir must be on a file system that every host sees.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sigma_jax.checks import check_int
from sigma_jax.config import ModelConfig
from sigma_jax.model import init_params
from sigma_jax.param_sharding import param_shardings
from sigma_jax.sharding import check_mesh

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


def _abstract(tree):
    """ShapeDtypeStructs (with shardings) for a tree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


DIGEST_ITEM = "digest"


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist, but none restores (every one is torn, corrupt or of another model);
    the message is one line naming the directory and the latest error."""


@jax.jit
def _checksums(tree):
    """Two uint32 checksums per leaf, over the leaf's bits as uint32 words w_i (bools as 0/1):
    sum(w_i) and sum((i + 1) w_i), both mod 2^32. Any single changed bit changes the first;
    moved words change the second. Computed where the arrays lie (sharded arrays included)."""
    def sums(x):
        if x.dtype == jnp.bool_:
            words = x.astype(jnp.uint32)
        else:
            unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
            words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
        words = words.reshape(-1)
        index = jnp.arange(1, words.shape[0] + 1, dtype=jnp.uint32)
        return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * index, dtype=jnp.uint32)
    return [sums(x) for x in jax.tree.leaves(tree)]


def digest(tree) -> list[list[int]]:
    """`_checksums` of every leaf of `tree`, in leaf order, as JSON-ready ints (0-d results,
    whole on every device, so each process reads its own copy)."""
    return [[int(np.asarray(s.addressable_data(0))) for s in pair]
            for pair in _checksums(tree)]


def _verify(stored: dict, restored: dict, step: int) -> None:
    """RuntimeError unless every restored item's digest equals the stored one."""
    for name, tree in restored.items():
        if stored.get(name) is not None and digest(tree) != stored[name]:
            raise RuntimeError(f"checkpoint {step} fails its {name} checksum: its files "
                               f"changed after they were written")


def error_line(error: BaseException) -> str:
    """'Type: first line of the message', without the tensorstore spec that orbax errors carry."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class CheckpointManager:
    """Saves and restores a `TrainState` (any frozen dataclass with step, params, opt_state and a
    typed PRNG key) plus the data iterator and configs, under <workdir>/checkpoints.

    every: the save interval `should_save` follows (0 = never periodic: only explicit saves).
    keep: how many of the latest checkpoints survive (orbax LatestN). Saves are asynchronous: the
    arrays are copied to host before `save` returns, the files are written in the background;
    `wait()` blocks until every pending save is on disk. Use as a context manager or call close().
    """

    def __init__(self, workdir, *, every: int = 0, keep: int = 3, async_save: bool = True):
        self.workdir = Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.every = every
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(every if every > 0 else 2**62)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            save_decision_policy=policy,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        )
        self._mngr = ocp.CheckpointManager(self.directory.absolute(), options=options)

    # -- queries

    def steps(self) -> list[int]:
        """Finalised checkpoint steps, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether the interval policy saves at `step`."""
        return self.every > 0 and self._mngr.should_save(step)

    # -- save

    def save(self, step: int, state, *, data_iter=None, configs: dict | None = None) -> bool:
        """Save `state` as checkpoint `step` (asynchronously). Returns False if that step exists.

        data_iter: a grain iterator (its get_state() is taken now, before save returns).
        configs: a JSON-ready dict stored with the checkpoint (what `load` rebuilds the model from).
        """
        if step in self._mngr.all_steps():
            return False
        items = {
            "params": ocp.args.StandardSave(state.params),
            "train_state": ocp.args.StandardSave(self._rest(state)),
        }
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if configs is not None:
            items["config"] = ocp.args.JsonSave(configs)
        items[DIGEST_ITEM] = ocp.args.JsonSave({"params": digest(state.params),
                                                "train_state": digest(self._rest(state))})
        return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

    @staticmethod
    def _rest(state) -> dict:
        return {"step": state.step, "opt_state": state.opt_state,
                "key": jax.random.key_data(state.key)}

    # -- restore

    def restore(self, step: int, target, data_iter=None):
        """Checkpoint `step` restored onto the structure, dtypes and shardings of `target` (a
        state of the same model and optimizer); `data_iter` is set to the saved position."""
        items = {
            "params": ocp.args.StandardRestore(_abstract(target.params)),
            "train_state": ocp.args.StandardRestore(_abstract(self._rest(target))),
        }
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        if _has_digest(self.directory, step):
            items[DIGEST_ITEM] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        _verify(out.get(DIGEST_ITEM) or {}, {"params": out["params"],
                                             "train_state": out["train_state"]}, step)
        rest = out["train_state"]
        key = jax.random.wrap_key_data(rest["key"], impl=jax.random.key_impl(target.key))
        return dataclasses.replace(target, step=rest["step"], params=out["params"],
                                   opt_state=rest["opt_state"], key=key)

    def restore_latest(self, target, data_iter=None):
        """Restore the newest checkpoint that restores. Returns (state, step), or (target, None)
        when there is no checkpoint.

        A checkpoint that fails to restore is skipped with a RuntimeWarning; once an older one has
        restored, the skipped ones are moved to <workdir>/corrupt_checkpoints/ so that the resumed
        run can save those steps again. If none restores, NoUsableCheckpoint (nothing is moved).
        """
        failed, last_error = [], None
        for step in reversed(self.steps()):
            try:
                state = self.restore(step, target, data_iter)
            except Exception as error:  # any failure means an unusable checkpoint
                warnings.warn(f"checkpoint {step} in {self.directory} cannot be restored "
                              f"({error_line(error)}); trying the previous one",
                              RuntimeWarning, stacklevel=2)
                failed.append(step)
                last_error = error
                continue
            for bad in failed:
                self._quarantine(bad)
            return state, step
        if failed:
            raise NoUsableCheckpoint(
                f"no checkpoint in {self.directory} can be restored (latest error: "
                f"{error_line(last_error)}); move them away or use a new --workdir"
            ) from last_error
        return target, None

    def _quarantine(self, step: int) -> None:
        """Move checkpoint `step` aside (never delete it)."""
        if jax.process_index() == 0:
            dest = self.workdir / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(dest)
            warnings.warn(f"moved unrestorable checkpoint {step} to {dest}", RuntimeWarning,
                          stacklevel=3)
        self._mngr.reload()

    # -- lifecycle

    def wait(self) -> None:
        """Block until every pending save is finalised on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _has_digest(directory: Path, step: int) -> bool:
    return (directory / str(step) / DIGEST_ITEM).exists()


def _reader(directory: Path) -> ocp.CheckpointManager:
    """A manager that only restores: no directory creation, no root metadata, no deletions
    (preservation is "keep all" without a policy), so nothing in the workdir is written.
    (read_only=True would do the same but logs three warnings per call.)"""
    options = ocp.CheckpointManagerOptions(create=False, save_root_metadata=False,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def stored_configs(workdir) -> tuple[int, dict] | None:
    """The configs saved with the newest checkpoint in <workdir>/checkpoints whose config item
    reads as a JSON object: (step, configs), or None when no checkpoint has one (no
    checkpoints directory, no finalised step, or only unreadable config items). Reads only:
    nothing in the workdir is created or changed."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    with _reader(directory) as mngr:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            except Exception:  # no readable config item: try the previous checkpoint
                continue
            if isinstance(out["config"], dict):
                return step, out["config"]
    return None


def load(workdir, step: int | None = None, *, mesh=None) -> tuple[ModelConfig, dict, int]:
    """The model of a training run, for samplers: (model_cfg, params, step).

    params is the plain nested dict of arrays (no optimizer state is read), placed on this
    process's first device, or, with `mesh` (a jax.sharding.Mesh), restored directly onto the
    mesh by `param_shardings`, whatever mesh the checkpoint was saved from; every process
    of a multi-host run must call it. step: None takes the latest checkpoint that restores
    (skipping unusable ones with a warning), else an integer >= 0. Missing workdir or
    checkpoint: FileNotFoundError; a bad step or mesh, an unknown step, or an explicit step
    saved without a model config: one-line ValueError.
    """
    if step is not None:
        step = check_int("step", step, 0)
    if mesh is not None:
        check_mesh(mesh, allowed="a jax.sharding.Mesh or None")
    workdir = Path(workdir)
    hint = f"train first: python -m launch.train --config=<preset> --workdir={workdir}"
    if not workdir.is_dir():
        raise FileNotFoundError(f"no workdir {workdir}; {hint}")
    directory = workdir / CHECKPOINT_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}; {hint}")
    with _reader(directory) as mngr:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {directory}; {hint}")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {directory}; available: "
                             f"{', '.join(map(str, steps))}")
        candidates = [step] if step is not None else list(reversed(steps))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        last_error = None
        for s in candidates:
            try:
                model_cfg = _saved_model_config(mngr, directory, s)
                shapes = jax.eval_shape(init_params, model_cfg, jax.random.key(0))
                shardings = (jax.tree.map(lambda _: device, shapes) if mesh is None else
                             param_shardings(shapes, mesh))
                target = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                    shardings)
                items = {"params": ocp.args.StandardRestore(target)}
                if _has_digest(directory, s):
                    items[DIGEST_ITEM] = ocp.args.JsonRestore()
                out = mngr.restore(s, args=ocp.args.Composite(**items))
                _verify(out.get(DIGEST_ITEM) or {}, {"params": out["params"]}, s)
                return model_cfg, out["params"], s
            except Exception as error:  # try the previous checkpoint
                if step is not None:
                    raise
                warnings.warn(f"checkpoint {s} in {directory} cannot be loaded "
                              f"({error_line(error)}); trying the previous one",
                              RuntimeWarning, stacklevel=2)
                last_error = error
        raise RuntimeError(f"no checkpoint in {directory} can be loaded (latest error: "
                           f"{error_line(last_error)})") from last_error


def _saved_model_config(mngr, directory: Path, step: int) -> ModelConfig:
    """The ModelConfig saved with checkpoint `step` (its config item's "model"); one-line
    ValueError when the checkpoint has none."""
    if (directory / str(step) / "config").exists():
        config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        model = config["config"].get("model") if isinstance(config["config"], dict) else None
        if isinstance(model, dict):
            return ModelConfig(**model)
    raise ValueError(f"checkpoint {step} in {directory} holds no model config (saved without "
                     f"configs={{'model': ...}}), so load cannot rebuild its model")
