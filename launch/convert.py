"""Turn a published σ-GPT PyTorch checkpoint into a sigma_jax run directory:
`python -m launch.convert --official=PATH/ckpt.pt --workdir=DIR [--task=NAME] [--data_path=P]`.

Reads the `ckpt.pt` of the published PyTorch text code (no torch needed; see
`sigma_jax.convert`) and writes DIR with `config.json` and an orbax checkpoint at the step the
file records (`iter_num`), so that `python -m launch.sample --workdir=DIR` and
`sigma_jax.checkpoint.load(DIR)` take it like a training run. The checkpoint holds the weights,
a fresh optimizer state and a training key (the published optimizer state is not converted).
config.json holds the model config, a train config that names the task (its other fields are
sigma_jax defaults), and under "converted_from" the source file, its iter_num and the published
run's own settings (its `config` dict).

The task recorded in config.json (the tokenizer of `launch.sample`) comes from --task, else from
the dataset the checkpoint names (`shakespeare_char` -> shakespeare_char; `openwebtext`,
`shakespeare` -> text_bpe), else from its vocabulary size (65 -> shakespeare_char, 50257 or the
padded 50304 -> text_bpe). The task must fit the vocabulary: a character task needs exactly its
characters; a token task needs the model's vocabulary to cover it.

Exit code 2 with one line on stderr, and nothing written to DIR, for: a missing flag or file, a
DIR that is not empty, a DIR that cannot be created (a file among its parents, a parent that is
not writable or takes no new directories), a file that is not a published checkpoint, a pickle
that asks for anything but tensors and plain containers, an architecture sigma_jax cannot express
(the message names the field), a damaged, truncated, compressed or otherwise crafted file, an
iter_num beyond the int32 step counter, a vocabulary that fits no known task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from launch import flags as launch_flags
from sigma_jax.torch_errors import short_repr

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the flags (done by `run`, so importing this module defines none)."""
    flags.DEFINE_string("official", None, "The published checkpoint (ckpt.pt) to convert.")
    flags.DEFINE_string("workdir", None, "The run directory to write (absent or empty).")
    flags.DEFINE_string("task", None, "Task of the run (its tokenizer); default: from the "
                        "checkpoint's dataset or vocabulary size.")
    flags.DEFINE_string("data_path", None, "The task's input file, if not its default.")


# The published code's dataset names (nanoGPT's data/ folders) and the sigma_jax task that has
# their tokenizer; and, for checkpoints that do not name a dataset, vocabulary sizes.
DATASET_TASKS = {"shakespeare_char": "shakespeare_char", "openwebtext": "text_bpe",
                 "shakespeare": "text_bpe"}
VOCAB_TASKS = {65: "shakespeare_char", 50257: "text_bpe", 50304: "text_bpe"}
CHARACTER_TASKS = ("shakespeare_char",)
TEXT_TASKS = ("shakespeare_char", "text_bpe")  # windowed: their sequence length is block_size
MAX_STEP = (1 << 31) - 1  # the train state's step is an int32


def choose_task(vocab_size: int, dataset: str | None, requested: str | None) -> str:
    """The task name for a checkpoint (see the module docstring); ValueError if none fits."""
    if requested:
        return requested
    if dataset in DATASET_TASKS:
        return DATASET_TASKS[dataset]
    if vocab_size in VOCAB_TASKS:
        return VOCAB_TASKS[vocab_size]
    named = f"dataset {short_repr(dataset)}, " if dataset else ""
    raise ValueError(f"the checkpoint's vocabulary ({named}{vocab_size} tokens) matches no known "
                     "task (shakespeare_char: 65 characters; text_bpe: GPT-2 BPE, 50257); pass "
                     "--task=NAME with a task whose tokens are the checkpoint's")


def check_vocabulary(model_cfg, task) -> None:
    """ValueError unless `task`'s tokens are the checkpoint's: the same characters for a
    character task, a vocabulary the model covers otherwise."""
    from sigma_jax.train import check_task

    if task.name in CHARACTER_TASKS and task.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"the checkpoint has {model_cfg.vocab_size} tokens but task "
                         f"{task.name} has {task.vocab_size} characters: its characters are not "
                         "the checkpoint's; pass --task or --data_path")
    check_task(model_cfg, task)


def check_workdir(workdir: Path) -> None:
    """ValueError unless `workdir` is an empty directory, or absent with a writable directory as
    its nearest existing parent (`train.check_workdir_path`). Reads only."""
    from sigma_jax.train import check_workdir_path

    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ValueError(f"--workdir {workdir} exists and is not an empty directory; choose a "
                         "new one")
    check_workdir_path(workdir)


def write_run(workdir: Path, ckpt, task, data_path: str | None, source: str) -> None:
    """Write the run of `ckpt` (an OfficialCheckpoint read from `source`) into a temporary
    sibling of `workdir`, then rename it to `workdir` (absent or empty). ValueError naming
    `workdir` if that sibling cannot be created."""
    import jax.numpy as jnp

    from sigma_jax import checkpoint
    from sigma_jax import train as train_lib
    from sigma_jax.metrics_log import write_text_atomic

    train_cfg = train_lib.TrainConfig(task=task.name, seq_len=task.seq_len, data_path=data_path)
    configs = train_lib.configs_dict(ckpt.model_cfg, train_cfg)
    configs["task"] = {"name": task.name, "vocab_size": task.vocab_size,
                       "seq_len": task.seq_len, "prompt_len": task.prompt_len}
    configs["converted_from"] = {"official": str(Path(source).resolve()),
                                 "iter_num": ckpt.iter_num, "config": ckpt.config}
    tmp = workdir.with_name(f".{workdir.name}.tmp{os.getpid()}")
    try:
        workdir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed conversion with this pid
        tmp.mkdir()
    except OSError as error:
        raise ValueError(f"--workdir {workdir} cannot be created ({error.strerror or error}); "
                         "choose a directory you can write") from None
    try:
        state = dataclasses.replace(train_lib.init_state(ckpt.model_cfg, train_cfg),
                                    params=ckpt.params, step=jnp.int32(ckpt.iter_num))
        write_text_atomic(tmp / "config.json", json.dumps(configs, indent=2, sort_keys=True))
        with checkpoint.CheckpointManager(tmp, keep=1, async_save=False) as manager:
            manager.save(ckpt.iter_num, state, configs=configs)
        if workdir.exists():
            workdir.rmdir()  # empty (checked): replaced by the finished run
        os.rename(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs every save at INFO
    if len(argv) > 1:
        launch_flags.die(f"unexpected arguments: {' '.join(argv[1:])}")
    with launch_flags.usage_errors():
        if not FLAGS.official or not FLAGS.workdir:
            raise ValueError("give --official=PATH/ckpt.pt (a published checkpoint) and "
                             "--workdir=DIR (the run directory to write)")
        workdir = Path(FLAGS.workdir)
        check_workdir(workdir)
        from sigma_jax.convert import read_official
        from sigma_jax.data import load_task

        ckpt = read_official(FLAGS.official)
        if ckpt.iter_num > MAX_STEP:
            raise ValueError(f"the checkpoint's iter_num {ckpt.iter_num} does not fit the run's "
                             f"step counter (int32, at most {MAX_STEP})")
        cfg = ckpt.model_cfg
        name = choose_task(cfg.vocab_size, ckpt.config.get("dataset"), FLAGS.task)
        task = load_task(name, seq_len=cfg.block_size if name in TEXT_TASKS else None,
                         data_path=FLAGS.data_path)
        check_vocabulary(cfg, task)
        write_run(workdir, ckpt, task, FLAGS.data_path, FLAGS.official)
    print(f"{FLAGS.official}: {cfg.n_layer}x{cfg.n_embd} model, {cfg.n_head} heads, block "
          f"{cfg.block_size}, V={cfg.vocab_size}, bias={cfg.bias}, iter {ckpt.iter_num} -> "
          f"{workdir} (task {task.name}, step {ckpt.iter_num})")


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
