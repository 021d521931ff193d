"""Sample from a trained run or a shipped model: `python -m launch.sample --workdir=DIR ...` or
`python -m launch.sample --pretrained=shakespeare_char ...`.

Also installed as the console script `sigma-sample`. Restores the latest checkpoint of --workdir
(or loads the shipped model named by --pretrained, which needs no data), builds the prompt
(literal text with `<missing>N</missing>` gaps, or `FILE:path`), fills every unknown position
with the chosen sampler, and prints each sample with its iterations and model calls. `--animate`
redraws the sequence in the terminal as burst iterations fill it in.

Sharded and multi-host (launch/distributed.py, docs/scaling.md): `--mesh=data:fsdp:tensor`
(default auto), `--mesh_axis_type`, `--distributed`. The params are restored straight onto the
mesh, each batch is padded to a multiple of the batch axes and sampled by one sharded kernel
(`sigma_jax.sampling.sample_sharded`), and the samples are gathered from every process and
printed by process 0 only. `--animate` runs on a single process.

Exit code 2 with one line on stderr, before any sampling and before the header, for: a missing
checkpoint, a config.json or checkpoint that cannot be read or loaded (naming the file, or the
workdir and step), an unknown shipped model, both or neither of --workdir and --pretrained,
--step with --pretrained, a --seed outside [0, 2^63 - 1], a prompt longer than --length or the
block size, a malformed `<missing>` gap, a prompt file that is not a UTF-8 text file,
characters outside the vocabulary, a sampler option the samplers reject (`SampleOptions`,
checked against the model and the length), or a mesh that the devices cannot hold. A latest
checkpoint that cannot be loaded, with an older one that can, costs one `warning:` line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from launch import distributed
from launch import flags as launch_flags
from launch.prompt import parse_prompt, read_prompt
from sigma_jax.checks import check_int
from sigma_jax.config import MAX_SEED
from sigma_jax.orders import KNOWN_ORDERS, ORDER_KINDS
from sigma_jax.param_sharding import shard_params
from sigma_jax.sampling import SAMPLERS, SampleOptions, sample_sharded
from sigma_jax.sampling.options import DRAFT_SUPPORT, FIRST_DRAFTS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
flags.DEFINE_string("pretrained", None, "A shipped model instead of --workdir "
                    "(sigma_jax.pretrained.MODELS: shakespeare_char).")
flags.DEFINE_enum("sampler", "burst", SAMPLERS, "ar: cached any-order AR; ar_nocache: the "
                  "uncached oracle; burst: exact burst sampling (draft + verify per iteration); "
                  "burst_jacobi: exact, one model call per iteration; burst_paper: the published "
                  "rule (not exact).")
flags.DEFINE_enum("order", "random", ORDER_KINDS, "Generation order (every sampler but "
                  "burst_paper, which draws random orders): exact burst samples the AR law along "
                  "it; spread accepts most.")
flags.DEFINE_enum("known_order", "random", KNOWN_ORDERS, "With --order=random: feed "
                  "the known tokens in a uniformly random order, or ascending.")
flags.DEFINE_integer("n_orders", 5, "Candidate orders of burst_paper.")
flags.DEFINE_integer("draft_support", DRAFT_SUPPORT, "burst_jacobi: each first draft is drawn "
                     "from this many most probable tokens (exact for any value; fewer: less "
                     "memory).")
flags.DEFINE_enum("first_drafts", "known", FIRST_DRAFTS, "burst_jacobi: draw the first drafts "
                  "given each row's known tokens, or given the start token alone, once for the "
                  "batch (exact either way; 'start' is faster where rows know different "
                  "tokens).")
flags.DEFINE_integer("window", None, "Burst samplers: positions drafted per iteration "
                     "(default: all remaining).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
flags.DEFINE_integer("num_samples", 4, "Samples to draw.")
flags.DEFINE_integer("batch_size", None, "Samples per kernel call (default: num_samples); "
                     "below --num_samples, the slots of the serving engine that draws them.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_string("prompt", "", "Prompt text with <missing>N</missing> gaps, or FILE:path.")
flags.DEFINE_integer("length", None, "Sequence length (default: the task's sequence length).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_boolean("animate", False, "Redraw the sequence as burst iterations fill it in.")
distributed.define_flags()
distributed.define_host_devices_flag()


def load_run_config(workdir: str):
    """(model_cfg, task) recorded in a run's config.json; the task gives encode/decode.

    No config.json: FileNotFoundError. A config.json that is not the one launch.train writes
    (unreadable, not UTF-8, not JSON, not an object with "model" and "train" objects, a "train"
    without "task", model fields that ModelConfig refuses): ValueError, one line naming the file.
    The task's own errors (an unknown task, missing data) are raised as they are.
    """
    from sigma_jax.config import ModelConfig
    from sigma_jax.data import load_task

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no training run in {workdir} (no config.json); train first: "
                                f"python -m launch.train --config=<preset> --workdir={workdir}")
    fix = "restore the config.json that launch.train wrote, or train a new run"
    try:
        configs = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; {fix}") from None
    except ValueError as error:  # json.JSONDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from None
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error.strerror or error}); {fix}") from None
    if not (isinstance(configs, dict) and isinstance(configs.get("model"), dict)
            and isinstance(configs.get("train"), dict) and "task" in configs["train"]):
        raise ValueError(f'{path} is not a run config: it needs a JSON object with "model" and '
                         f'"train" objects, the train one naming the "task"; {fix}')
    model, train = configs["model"], configs["train"]
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [k for k in model if k not in fields]
    if unknown:
        raise ValueError(f"{path}: unknown model field {unknown[0]!r} (fields: "
                         f"{', '.join(fields)}); {fix}")
    try:
        model_cfg = ModelConfig(**model)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad model config ({launch_flags.one_line(error)}); "
                         f"{fix}") from None
    task = load_task(train["task"], seq_len=train.get("seq_len"),
                     data_path=train.get("data_path"))
    return model_cfg, task


def load_checkpoint(workdir: str, step: int | None, mesh):
    """`checkpoint.load(workdir, step, mesh=mesh)` with every failure as one line.

    No workdir or checkpoint: its FileNotFoundError. A checkpoint that cannot be loaded (step
    given), or none that can (step None): ValueError naming the workdir and the step, with the
    first line of the cause, cut (`one_line`), and no other line. A checkpoint skipped for an
    older one that loads prints one `warning:` line on stderr. The "Event loop is closed"
    reports of reads still in flight when orbax gives up a restore are dropped
    (`flags.drop_closed_loop_reports`).
    """
    from sigma_jax import checkpoint

    launch_flags.drop_closed_loop_reports()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            loaded = checkpoint.load(workdir, step, mesh=mesh)
    except FileNotFoundError:
        raise
    except Exception as error:  # any failure to restore: unusable checkpoints
        if step is not None:
            raise ValueError(f"cannot load checkpoint {step} of {workdir}: "
                             f"{_cause(error)}; pick another --step, or drop --step for the "
                             "latest that loads") from None
        raise ValueError(f"cannot load any checkpoint of {workdir}: "
                         f"{_cause(error.__cause__ or error)}; retrain, or move the broken "
                         f"checkpoints out of {Path(workdir) / 'checkpoints'}") from None
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            launch_flags.print_warning(w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def _cause(error: BaseException) -> str:
    """The first line of `error`'s message, cut (a KeyError's message without its quotes)."""
    args = error.args
    text = args[0] if isinstance(error, KeyError) and len(args) == 1 else str(error)
    return launch_flags.one_line(text or type(error).__name__)


def load_model(mesh):
    """(cfg, params, encode, decode, source text, default length) of --pretrained or of
    --workdir's checkpoint, params placed on `mesh` (None: the first device). encode is None for
    tasks without text."""
    if FLAGS.pretrained:
        from sigma_jax import pretrained

        cfg, params, encode, decode = pretrained.load(FLAGS.pretrained)
        if mesh is not None:
            params = shard_params(params, mesh)
        return cfg, params, encode, decode, f"pretrained {FLAGS.pretrained}", cfg.block_size
    _, task = load_run_config(FLAGS.workdir)
    cfg, params, step = load_checkpoint(FLAGS.workdir, FLAGS.step, mesh)
    from sigma_jax.train import check_task

    try:  # a config.json naming another task would decode the samples with its vocabulary
        check_task(cfg, task)
    except ValueError as error:
        raise ValueError(f"{FLAGS.workdir}/config.json does not match checkpoint {step}: "
                         f"{error}") from None
    return (cfg, params, task.encode, task.decode, f"{FLAGS.workdir} step {step}",
            min(task.seq_len, cfg.block_size))


def check_flags() -> SampleOptions:
    """Every flag checked before any work: the sampler options of the flags."""
    if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
        raise ValueError("give exactly one of --workdir (a directory written by launch.train) "
                         "and --pretrained (a shipped model, e.g. shakespeare_char)")
    if FLAGS.pretrained and FLAGS.step is not None:
        raise ValueError("--step picks a checkpoint of --workdir; a --pretrained model has "
                         "none: drop --step")
    for name in ("num_samples", "batch_size", "length"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")
    check_int("--seed", FLAGS.seed, 0, MAX_SEED)  # the seeds jax.random.key takes
    if FLAGS.animate and not FLAGS.sampler.startswith("burst"):
        raise ValueError("--animate needs a burst sampler (burst, burst_jacobi, burst_paper)")
    if FLAGS.animate and jax.process_count() > 1:
        raise ValueError("--animate runs on a single process; drop it for multi-host sampling")
    return chosen_options()


def chosen_options() -> SampleOptions:
    """The sampler options of the flags (a one-line ValueError for any value they reject)."""
    return SampleOptions(FLAGS.sampler, order=FLAGS.order, window=FLAGS.window,
                         n_orders=FLAGS.n_orders, top_k=FLAGS.top_k, known_order=FLAGS.known_order,
                         draft_support=FLAGS.draft_support, first_drafts=FLAGS.first_drafts,
                         temperature=FLAGS.temperature,
                         top_p=FLAGS.top_p)


def run_sampler(cfg, params, key, tokens, known, mesh, options: SampleOptions):
    """One batch through the chosen sampler, sharded on `mesh`: (tokens [B, N], SampleStats) as
    host numpy arrays, gathered from every process (every process must call this)."""
    from sigma_jax import sharding as sh

    return sh.to_host(sample_sharded(cfg, params, key, tokens, known, options, mesh=mesh))


def animate(cfg, params, key, tokens, known, decode, options: SampleOptions) -> None:
    """Burst sampling one iteration at a time (`sigma_jax.burst_states`), redrawing the first row
    after each."""
    from sigma_jax import burst_states

    n = tokens.shape[1]
    for iteration, (state, _) in enumerate(burst_states(cfg, params, key, tokens, known,
                                                        options=options)):
        filled = np.asarray(state.filled[0])
        text = decode(np.where(filled, np.asarray(state.tokens[0]), 0))
        shown = "".join(c if f else "_" for c, f in zip(text, filled, strict=False)) \
            if len(text) == n else text
        sys.stdout.write(f"\x1b[2J\x1b[H[iteration {iteration}, {int(filled.sum())}/{n} "
                         f"filled]\n{shown}\n")
        sys.stdout.flush()
        if not filled.all():
            time.sleep(0.3)


def main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs every restore at INFO
    if len(argv) > 1:
        launch_flags.die(f"unexpected arguments: {' '.join(argv[1:])}")
    with launch_flags.usage_errors():
        distributed.initialize()  # first: before any other JAX call
        options = check_flags()
        mesh = distributed.build_mesh()
        # --animate samples one row step by step on one device; everything else on the mesh.
        cfg, params, encode, decode, source, default_length = load_model(
            None if FLAGS.animate else mesh)
        length = FLAGS.length or default_length
        text = read_prompt(FLAGS.prompt)
        if text and encode is None:
            raise ValueError("this task takes no text prompt; drop --prompt")
        tokens, known = parse_prompt(text, encode or (lambda s: []), length, cfg.block_size)
        if not cfg.bos and not known.any():
            raise ValueError("this model has no start token: give a non-empty --prompt")
        options.check_for(cfg, length)
    batch = FLAGS.batch_size or FLAGS.num_samples
    key = jax.random.key(FLAGS.seed)
    primary = distributed.is_primary()
    if primary:
        print(f"# {source}: sampler={FLAGS.sampler} length={length} "
              f"known={int(known.sum())} mesh={distributed.mesh_text(mesh)}")
    if FLAGS.animate:
        animate(cfg, params, key, jnp.asarray(tokens)[None], jnp.asarray(known)[None], decode,
                options)
        return
    devices = list(mesh.devices.flat)
    if (FLAGS.num_samples > batch and jax.process_count() == 1 and options.sampler != "ar_nocache"
            and (len(devices) == 1 or FLAGS.host_devices > 1)):
        engines = devices[:batch]  # one engine per device, each with a slot at least
        serve_samples(cfg, params, key, tokens, known, batch, options, decode,
                      engines if len(engines) > 1 else None)
        return
    every_key = sample_keys(key, FLAGS.num_samples, batch)
    done = 0
    while done < FLAGS.num_samples:
        b = min(batch, FLAGS.num_samples - done)
        keys = jnp.stack(every_key[done:done + b])
        tok = np.broadcast_to(np.asarray(tokens), (b, length))
        kn = np.broadcast_to(np.asarray(known), (b, length))
        start = time.perf_counter()
        out, stats = run_sampler(cfg, params, keys, tok, kn, mesh, options)
        wall = time.perf_counter() - start
        its, calls = stats.iterations, int(stats.forward_passes)
        compiled = " incl. compilation" if done == 0 else ""
        for i in range(b if primary else 0):
            print(f"--- sample {done + i}: {int(stats.generated[i])} tokens, {its[i]} iterations, "
                  f"{calls} model calls (batch), {wall:.2f} s (batch{compiled})")
            print(decode(out[i]))
        done += b


def sample_keys(key, count: int, batch: int) -> list:
    """The key of each sample: batch-sized groups split from the key folded with the group's
    first index (so the engine and the static batches draw the same samples)."""
    return [k for done in range(0, count, batch)
            for k in jax.random.split(jax.random.fold_in(key, done), min(batch, count - done))]


def serve_samples(cfg, params, key, tokens, known, slots: int, options, decode,
                  devices=None) -> None:
    """--num_samples above the batch size: every sample through the serving engine with
    `slots` slots (a finished sample's slot takes the next one at once), printed as it
    completes, in completion order. devices (--host_devices > 1): one engine per device, with
    its share of the slots."""
    from sigma_jax.sampling import Request, serve

    keys = sample_keys(key, FLAGS.num_samples, slots)
    requests = [Request(np.asarray(tokens), np.asarray(known), k) for k in keys]
    for result in serve(cfg, params, requests, slots=slots, options=options, devices=devices):
        stats = result.stats
        print(f"--- sample {result.index}: {int(stats.generated[0])} tokens, "
              f"{int(stats.iterations[0])} iterations, {int(stats.forward_passes)} model calls, "
              f"{result.seconds:.2f} s (engine, {slots} slots, since the start)")
        print(decode(result.tokens))


def run() -> None:
    jax.config.config_with_absl()
    app.run(main)


if __name__ == "__main__":
    run()
