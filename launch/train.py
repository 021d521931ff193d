"""Train a preset: `python -m launch.train --config=<preset> [--set key=value ...] [--workdir=DIR]`.

Also installed as the console script `sigma-train`. Presets live in `sigma_jax/presets.py`;
`--set` overrides any ModelConfig or TrainConfig field (prefix `model.` / `train.` if ambiguous).
Running again with the same workdir resumes from its latest checkpoint (under any mesh: the
checkpoint is resharded onto the new one). `--jax_*` flags work.

Sharding and multi-host (launch/distributed.py): `--mesh=data:fsdp:tensor` (default auto: every
device on data; one device on a single CPU host), `--mesh_axis_type=auto|explicit`,
`--distributed=auto|on|off` (+ `--coordinator_address`, `--num_processes`, `--process_id`).
Every process of a multi-host job runs this same command; process 0 prints and writes the
metrics, all processes write the checkpoints together (the workdir must be on a file system
that every host sees). See docs/scaling.md.

Exit codes: 0 done; 2 bad usage (unknown preset, unknown or ill-typed key, invalid value, missing
data, a mesh the devices cannot hold, a batch the mesh cannot split, an empty --workdir, a workdir
that cannot be used or created, a workdir that holds a different model, or checkpoints whose
optimizer state the train settings do not match, or a malformed config.json), reported as one
line on stderr before any work or write; 1 a checkpoint could not be saved (one line; training
stops at once and the earlier checkpoints are intact); 128 + N stopped by signal N, SIGTERM (143)
or SIGINT / Ctrl-C (130), after saving a checkpoint (rerun the same command to resume); 130 also
for a Ctrl-C outside the training steps (one line; nothing saved, nothing lost).

Examples:
  python -m launch.train --config=tiny --workdir=/tmp/tiny
  python -m launch.train --config=shakespeare_char_cpu --set order_policy=curriculum
  python -m launch.train --config=shakespeare_char --mesh=2:2:2   # 8 devices
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
import warnings

import jax
from absl import app, flags
from absl import logging as absl_logging

from launch import distributed
from launch import flags as launch_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define --config, --workdir and --set (done by `run`, so importing this module for `build`
    defines no flags and cannot clash with another launcher's)."""
    if "config" not in FLAGS:
        flags.DEFINE_string("config", None, "Preset name (sigma_jax/presets.py).")
        flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); default "
                            "(flag omitted) workdirs/<preset>.")
    launch_flags.define_set_flag()
    distributed.define_flags()

PREEMPTED_EXIT = 128 + 15  # the conventional status of a process ended by SIGTERM
SAVE_FAILED_EXIT = 1


def build(preset_name: str | None, sets):
    """(model_cfg, train_cfg, task) for a preset with --set overrides. Raises ValueError,
    DataError or FileNotFoundError with a one-line message."""
    from sigma_jax.config import ModelConfig
    from sigma_jax.presets import PRESETS, build_model_config, get_preset
    from sigma_jax.train import TrainConfig, check_task

    if not preset_name:
        raise ValueError(f"--config is required; presets: {', '.join(PRESETS)}")
    preset = get_preset(preset_name)
    model_fields = {"vocab_size": None, **preset.model}
    groups = {"model": (ModelConfig, model_fields),
              "train": (TrainConfig, dataclasses.asdict(preset.train))}
    fields = launch_flags.apply_overrides(sets, groups)
    train_cfg = TrainConfig(**fields["train"])
    # Validate the model fields now (placeholder vocabulary), before any data is read.
    build_model_config(fields["model"], fields["model"]["vocab_size"] or 1)
    from sigma_jax.data import load_task

    task = load_task(train_cfg.task, seq_len=train_cfg.seq_len, data_path=train_cfg.data_path)
    model_cfg = build_model_config(fields["model"], task.vocab_size)
    check_task(model_cfg, task)
    return model_cfg, train_cfg, task


def main(argv):
    if not FLAGS["verbosity"].present:
        # orbax logs every checkpoint step at INFO through absl: show warnings and up unless
        # --verbosity is given (--verbosity=0 brings the INFO lines back).
        absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        launch_flags.die(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.workdir == "":
        launch_flags.die("--workdir is empty; give a directory, or omit the flag for "
                         "workdirs/<preset>")
    try:
        _train(FLAGS.workdir or os.path.join("workdirs", FLAGS.config or ""))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves, then stops)
        launch_flags.die("interrupted (Ctrl-C) outside the training steps; the workdir is as it "
                         "was: rerun the same command to resume", code=128 + signal.SIGINT)


class _QuietSaveErrors(logging.Filter):
    """Drops the ERROR records that orbax and asyncio log while a checkpoint write fails (each
    array's failure, with its traceback, some after training has stopped): the failure is
    reported once, as the SaveError line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        return not (record.name == "asyncio" and "orbax" in record.getMessage())


def _quiet_failed_writes() -> None:
    """For the rest of the process (a failed write's threads outlive `train`): drop orbax's and
    asyncio's ERROR records (`_QuietSaveErrors`) and the "Event loop is closed" errors that
    tensorstore's callbacks raise into the event loops of a failed write
    (`flags.drop_closed_loop_reports`)."""
    quiet = _QuietSaveErrors()
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(quiet)
    launch_flags.drop_closed_loop_reports()


def _train(workdir: str) -> None:
    from sigma_jax.checkpoint import NoUsableCheckpoint
    from sigma_jax.train import (
        SaveError,
        check_batch_fits,
        check_workdir,
        make_workdir,
        train,
    )

    log = functools.partial(print, flush=True)
    with launch_flags.usage_errors():
        distributed.initialize(log)  # first: before any other JAX call
        if not distributed.is_primary():
            log = lambda line: None  # noqa: E731 (process 0 reports for everyone)
        model_cfg, train_cfg, task = build(FLAGS.config, FLAGS.set)
        mesh = distributed.build_mesh()
        check_batch_fits(train_cfg, mesh)
        check_workdir(workdir, model_cfg, train_cfg)
        make_workdir(workdir)  # the first write, once every check has passed
    log(f"preset {FLAGS.config}: task {task.name} (V={task.vocab_size}, N={task.seq_len}), "
        f"{model_cfg.n_layer}x{model_cfg.n_embd} model, {train_cfg.max_steps} steps, "
        f"workdir {workdir}, mesh {distributed.mesh_text(mesh)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)")
    _quiet_failed_writes()
    warnings.showwarning = lambda message, *_, **__: launch_flags.print_warning(message)
    try:
        result = train(model_cfg, train_cfg, workdir, task=task, log=log, mesh=mesh)
    except SaveError as error:
        launch_flags.die(str(error), code=SAVE_FAILED_EXIT)
    except NoUsableCheckpoint as error:  # the workdir's checkpoints, not the flags
        launch_flags.die(launch_flags.one_line(error))
    summary = {k: result[k] for k in ("step", "loss", "val_loss_train_order",
                                      "val_loss_left_to_right", "val_loss_random")
               if k in result}
    log("final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in summary.items()))
    if result.get("preempted"):
        sys.exit(128 + result["signal"] if result.get("signal") else PREEMPTED_EXIT)


def run():
    """Console-script entry point (`sigma-train`)."""
    define_flags()
    jax.config.config_with_absl()
    app.run(main)


if __name__ == "__main__":
    run()
