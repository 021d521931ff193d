"""Ship a trained character model: evaluate it on the whole validation split and write its weights.

    python -m launch.train --config=shakespeare_char_ref --workdir=workdirs/shakespeare_char_ref
    python -m experiments.reference_model --workdir=workdirs/shakespeare_char_ref

Reads the run's latest checkpoint, measures the validation loss (nats/char) with `log_prob` over
every non-overlapping 256-character window of the validation split, in one uniformly random order
per window and left to right, writes the weights file that `sigma_jax.pretrained.load` reads
(`--weights`, default the packaged one) and, under `--out`, results.json and the training
curve (loss.png), with the wall time read from the run's metrics. Prints the file's sha256,
which `sigma_jax.pretrained.MODELS` must record.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from sigma_jax import log_prob, pretrained
from sigma_jax.data import load_task

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/shakespeare_char_ref", "The training run to ship.")
flags.DEFINE_string("weights", str(pretrained.WEIGHTS_DIR / "shakespeare_char.msgpack"),
                    "Where to write the weights file.")
flags.DEFINE_string("out", "experiments/results/reference_model", "Results directory.")
flags.DEFINE_integer("batch", 32, "Validation windows per forward pass.")
flags.DEFINE_integer("seed", 0, "Seed of the random orders.")


def validation_loss(cfg, params, windows: np.ndarray, key, batch: int) -> dict:
    """Mean negative log-likelihood per token (nats) of windows int32 [W, N]: one uniformly
    random order per window, and left to right. The last partial batch is padded and dropped."""
    n = windows.shape[1]
    known = jnp.zeros((batch, n), bool)
    l2r = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    totals = {"random": 0.0, "left_to_right": 0.0}
    for start in range(0, len(windows), batch):
        rows = windows[start:start + batch]
        tokens = jnp.asarray(np.pad(rows, ((0, batch - len(rows)), (0, 0))))
        sub = jax.random.fold_in(key, start)
        random_lp = np.asarray(log_prob(cfg, params, tokens, known, sub))[:len(rows), 0]
        l2r_lp = np.asarray(log_prob(cfg, params, tokens, known, order=l2r))[:len(rows), 0]
        totals["random"] -= float(random_lp.sum())
        totals["left_to_right"] -= float(l2r_lp.sum())
    count = windows.shape[0] * n
    return {name: total / count for name, total in totals.items()}


def unigram_entropy(tokens: np.ndarray, vocab: int) -> float:
    p = np.bincount(tokens.reshape(-1), minlength=vocab) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"unexpected arguments: {' '.join(argv[1:])}")
    from sigma_jax import checkpoint

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs every restore at INFO
    workdir = Path(FLAGS.workdir)
    cfg, params, step = checkpoint.load(workdir)
    run = json.loads((workdir / "config.json").read_text())
    task = load_task(run["train"]["task"], seq_len=run["train"]["seq_len"])
    val = task.val
    windows = np.stack([val[i] for i in range(len(val))])  # [W, N]
    losses = validation_loss(cfg, params, windows, jax.random.key(FLAGS.seed), FLAGS.batch)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    wall_s = max((m.get("elapsed_s", 0.0) for m in metrics), default=None)

    chars = task.decode(np.arange(task.vocab_size))
    digest = pretrained.save(FLAGS.weights, cfg, params, chars)
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    if (workdir / "loss.png").exists():
        shutil.copy(workdir / "loss.png", out / "loss.png")
    result = dict(
        step=int(step), model=run["model"], train=run["train"],
        val_windows=int(windows.shape[0]), val_tokens=int(windows.size),
        val_loss_random=losses["random"], val_loss_left_to_right=losses["left_to_right"],
        unigram_entropy=unigram_entropy(windows, task.vocab_size), train_wall_s=wall_s,
        weights_file=Path(FLAGS.weights).name, weights_bytes=Path(FLAGS.weights).stat().st_size,
        sha256=digest, seed=FLAGS.seed,
    )
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("step", "val_loss_random", "val_loss_left_to_right",
                                             "unigram_entropy", "train_wall_s", "weights_bytes",
                                             "sha256")}, indent=1))


if __name__ == "__main__":
    app.run(main)
