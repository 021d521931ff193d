"""Benchmark the samplers, the train step and decode bandwidth: `python -m launch.bench [flags]`.

Also installed as the console script `sigma-bench`. With no flags it runs a small CPU-sized
benchmark (random weights of the `shakespeare_char_cpu` preset) in a few minutes and writes
experiments/results/bench_cpu/{sampling,training,roofline}.jsonl, env.json and PNG plots; on a GPU
the defaults switch to the GPT-2-small preset in bfloat16 and experiments/results/bench_gpu.
`--suite=memory` alone compiles without running (bench/memory.py) and defaults to GPT-2 small in
bfloat16, N = 1024, B = 1, 16, 64, W = 64, no time budget, experiments/results/memory.
`--suite=shipped` alone measures cached AR, exact burst and jacobi burst on the shipped
`shakespeare_char` model in interleaved rounds (bench/shipped.py) and defaults to N = 256,
B = 1, 16, 5 repeats, no time budget, experiments/results/shipped.

Exit codes: 0 done; 2 bad usage (one line on stderr, before any work).

Examples:
  python -m launch.bench
  python -m launch.bench --suite=sampling --lengths=64,128 --batches=1,16 --windows=8,none
  python -m launch.bench --workdir=workdirs/shakespeare_char_cpu --weights=checkpoint,product
  python -m launch.bench --suite=memory --preset=tiny --lengths=32 --batches=1,4 --burst_window=8
  python -m launch.bench --suite=shipped --batches=1 --repeats=3
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from launch.flags import die, given, output_path, positive_ints, usage_errors

FLAGS = flags.FLAGS
# What to run and where the results go.
flags.DEFINE_list("suite", ["sampling", "training", "roofline"],
                  "Suites to run: sampling, training, roofline, memory (compile only), shipped "
                  "(the shipped model); memory or shipped alone: its own defaults (see the "
                  "module docstring).")
flags.DEFINE_string("preset", None, "Preset for random weights (sigma_jax/presets.py); default "
                    "shakespeare_char_cpu on CPU, gpt2_small on GPU.")
flags.DEFINE_string("workdir", None, "Training run whose latest checkpoint to benchmark "
                    "(instead of random weights).")
flags.DEFINE_integer("step", None, "Checkpoint step (with --workdir); default the latest.")
flags.DEFINE_string("dtype", None, "float32 or bfloat16: inference copies of the weights in this "
                    "dtype; bfloat16 trains in mixed precision (default: the preset's on CPU, "
                    "bfloat16 on GPU).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and sampler keys.")
flags.DEFINE_string("out", None, "Output directory (default experiments/results/bench_cpu on CPU, "
                    "experiments/results/bench_gpu on GPU); 'none' writes nothing.")
flags.DEFINE_float("budget_s", None, "Skip configurations not started within this many seconds "
                   "of the start (recorded as skipped; default 150 on CPU so the default run "
                   "stays within 3 minutes on a busy 2-core machine, none on GPU; inf = none).")

# The sampling suite's grid.
flags.DEFINE_list("lengths", None, "Sequence lengths N (default CPU 32,64; GPU 64,256,1024).")
flags.DEFINE_list("batches", None, "Batch sizes (default CPU 1,4; GPU 1,16,256).")
flags.DEFINE_enum("grid", "axes", ["axes", "cross"], "axes: every length at the first batch and "
                  "every batch at the last length; cross: every (length, batch) pair.")
flags.DEFINE_list("samplers", ["ar", "ar_nocache", "burst", "burst_paper"],
                  "Samplers of the main grid (sigma_jax.samplers: ar, ar_nocache, burst, "
                  "burst_jacobi, burst_paper).")
flags.DEFINE_list("batch_samplers", None, "Samplers measured at the batch sizes after the first "
                  "(default CPU ar,burst; GPU all of --samplers).")
flags.DEFINE_list("orders", ["random"], "Generation orders of the main grid's exact burst rows "
                  "(random, left_to_right, fractal, spread); AR and burst_paper use random.")
flags.DEFINE_list("windows", None, "Exact-burst windows swept at (last length, first batch); "
                  "'none' = all remaining positions (default CPU 8,none; GPU 16,none).")
flags.DEFINE_string("burst_window", None, "Window of the main-grid burst rows: an integer or "
                    "'none' (default none on CPU, 64 on GPU).")
flags.DEFINE_list("n_orders", ["1", "5"], "Paper-mode order counts swept (at --burst_window); "
                  "the last one is used for the main grid.")
flags.DEFINE_integer("repeats", 3, "Timed calls per configuration (after 2 warm-up calls); "
                     "default 5 for --suite=shipped alone.")
flags.DEFINE_list("weights", None, "Weights for the burst sweep; the first also runs the main "
                  "grid: init, peaked, product, checkpoint (default: init or checkpoint, then "
                  "product, peaked).")
flags.DEFINE_integer("max_uncached_tokens", None, "Skip uncached AR where B*N*(N+1) exceeds this "
                     "(default CPU 10000, GPU 4300000).")

# The training suite.
flags.DEFINE_integer("train_batch", None, "Training suite batch (default CPU 4, GPU 16).")
flags.DEFINE_integer("train_length", None, "Training sequence length (default: the longest "
                     "sampling length, at most block_size).")
flags.DEFINE_boolean("train_reference", True, "Also time the fixed reference train step "
                     "(4x128, block 256, batch 32, random order, float32).")


def _window(name: str, text: str) -> int | None:
    if text.strip().lower() in ("none", "all"):
        return None
    return positive_ints(name, [text])[0]


def build_config(on_gpu: bool):
    """BenchConfig from the flags and the platform defaults. Raises ValueError (one line); a flag
    given explicitly empty (`--weights=`) is refused, never replaced by its default."""
    from bench.config import BenchConfig
    from sigma_jax.presets import get_preset

    suites = tuple(s.strip() for s in FLAGS.suite)
    memory, shipped = suites == ("memory",), suites == ("shipped",)
    big = on_gpu or memory  # GPT-2-small defaults
    workdir = given("workdir", FLAGS.workdir, None, "a training run's directory")
    preset = given("preset", FLAGS.preset, None if workdir else
                   ("gpt2_small" if big else "shakespeare_char_cpu"), "a preset name")
    if preset:
        get_preset(preset)  # ValueError listing the presets
    if workdir and not os.path.isdir(workdir):
        raise FileNotFoundError(f"no workdir {workdir}")
    out = given("out", FLAGS.out, "experiments/results/memory" if memory else
                "experiments/results/shipped" if shipped else
                "experiments/results/bench_gpu" if on_gpu else
                "experiments/results/bench_cpu", "a folder or 'none'")
    return BenchConfig(
        suites=suites, preset=preset, workdir=workdir, step=FLAGS.step,
        dtype=given("dtype", FLAGS.dtype, "bfloat16" if big else None, "float32 or bfloat16"),
        **_grid_fields(on_gpu, memory, shipped, primary="checkpoint" if workdir else "init"),
        repeats=5 if shipped and not FLAGS["repeats"].present else FLAGS.repeats,
        seed=FLAGS.seed,
        max_uncached_tokens=given("max_uncached_tokens", FLAGS.max_uncached_tokens,
                                  4_300_000 if on_gpu else 10_000),
        train_batch=given("train_batch", FLAGS.train_batch, 16 if on_gpu else 4),
        train_length=FLAGS.train_length, train_reference=FLAGS.train_reference,
        matmul_n=8192 if on_gpu else 1024, copy_bytes=(1 << 30) if on_gpu else (128 << 20),
        budget_s=given("budget_s", FLAGS.budget_s, None if big or shipped else 150.0),
        out=None if out.lower() == "none" else out,
    )


def _grid_fields(on_gpu: bool, memory: bool, shipped: bool, primary: str) -> dict:
    """The sampling grid's BenchConfig fields (lengths, batches, windows, samplers, orders,
    weights, ...) from the flags and the platform defaults. Raises ValueError (one line)."""
    from sigma_jax.sampling import SAMPLERS

    big = on_gpu or memory
    lengths = positive_ints("lengths", given("lengths", FLAGS.lengths, ["1024"] if memory else
                                             ["256"] if shipped else
                                             ["64", "256", "1024"] if on_gpu else
                                             ["32", "64"], "positive integers"))
    batches = positive_ints("batches", given("batches", FLAGS.batches,
                                             ["1", "16", "64"] if memory else
                                             ["1", "16"] if shipped else
                                             ["1", "16", "256"] if on_gpu else
                                             ["1", "4"], "positive integers"))
    windows = tuple(_window("windows", w) for w in given(
        "windows", FLAGS.windows, ["16", "none"] if on_gpu else ["8", "none"],
        "positive integers or 'none'"))
    burst_window = _window("burst_window", given("burst_window", FLAGS.burst_window,
                                                 "64" if big else "none",
                                                 "an integer or 'none'"))
    weights = tuple(given("weights", FLAGS.weights, (primary, "product", "peaked"),
                          "weights (init, peaked, product, checkpoint)"))
    if weights[0] != primary:
        raise ValueError(f"the first --weights entry must be {primary} (the main grid's weights)")
    samplers_text = f"samplers ({', '.join(SAMPLERS)})"
    batch_samplers = given("batch_samplers", FLAGS.batch_samplers,
                           None if on_gpu else ("ar", "burst"), samplers_text)
    return dict(lengths=lengths, batches=batches, grid=FLAGS.grid, windows=windows,
                n_orders=positive_ints("n_orders", FLAGS.n_orders), burst_window=burst_window,
                weights=weights, samplers=tuple(given("samplers", FLAGS.samplers, None,
                                                      samplers_text)),
                batch_samplers=None if batch_samplers is None else tuple(batch_samplers),
                orders=tuple(given("orders", FLAGS.orders, None,
                                   "orders (random, left_to_right, fractal, spread)")))


def main(argv):
    if not FLAGS["verbosity"].present:
        # jax logs backend probing at INFO through absl: keep stderr to warnings and errors.
        absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        die(f"unexpected arguments: {' '.join(argv[1:])}")
    with usage_errors():
        import jax

        from bench.config import load_model

        on_gpu = jax.default_backend() != "cpu"
        config = build_config(on_gpu)
        model = load_model(config)  # checkpoint / preset errors are usage errors too
        if config.out:
            output_path(config.out, "out", folder=True)
    from bench import memory, report, shipped, suites

    argv0 = sys.argv[0].replace("\\", "/")
    command = (["python", "-m", "launch.bench"] if argv0.endswith("launch/bench.py") else
               [argv0]) + sys.argv[1:]
    result = suites.run(config, argv=command, model=model)
    report.print_tables(result["rows"])
    memory.print_memory_table(result["rows"].get("memory"))
    shipped.print_shipped_table(result["rows"].get("shipped"))
    if config.out:
        print(f"\nwrote {config.out}: " + ", ".join(
            sorted(f"{s}.jsonl" for s in result["rows"]) + ["env.json"] +
            [p.rsplit("/", 1)[-1] for p in result["plots"]]))
    skipped = result["env"]["skipped_for_time"]
    note = (f"; {skipped} configuration(s) skipped by the time budget (--budget_s="
            f"{config.budget_s:g})" if skipped else "")
    print(f"wall time {result['env']['wall_s']:.1f} s{note}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
