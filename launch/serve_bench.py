"""Serving throughput of the engine against static batches: `python -m launch.serve_bench`.

    python -m launch.serve_bench --pretrained=shakespeare_char --requests=256 --slots=16 \
        --samplers=burst_jacobi,ar --order=spread --window=16

For each sampler, the same mixed workload (bench/serving.py: lengths from --min_length to
--max_length, half unconditional, half infilling real text) runs through the engine and as
static batches of --slots consecutive requests, interleaved for --rounds rounds (engine, static,
engine, static, ...). Prints one line per run (requests/s, tokens/s, p50/p99 latency in model
calls and seconds, slot occupancy) and the engine/static ratio of each round; writes
serving.jsonl and serving.png to --out. Every engine request's tokens are checked to equal its
static batch's. --host_devices=N (N > 1, dividing --slots): N CPU devices, the engine one per
device with its share of the slots (`serve(devices=...)`), each static batch split over them
with one loop per device (`sample_sharded`). Exit 2 with one line on bad flags (an --out that
is not a folder that exists or can be made included), before any run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from launch import distributed
from launch.flags import die, output_path, usage_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained", "shakespeare_char", "A shipped model (sigma_jax.pretrained).")
flags.DEFINE_integer("requests", 256, "Requests in the workload.")
flags.DEFINE_integer("slots", 16, "Engine slots = static batch size.")
flags.DEFINE_list("samplers", ["burst_jacobi", "ar"], "Samplers to compare.")
flags.DEFINE_enum("order", "spread", ["random", "left_to_right", "fractal", "spread"],
                  "Generation order of the burst samplers (AR uses random).")
flags.DEFINE_integer("window", 16, "Burst window (0: all remaining positions).")
flags.DEFINE_integer("min_length", 32, "Shortest request.")
flags.DEFINE_integer("max_length", 256, "Longest request (the engine's capacity).")
flags.DEFINE_integer("steps_per_call", 4, "Engine iterations per call (amortizes dispatch; a slot "
                     "finished mid-call idles until the call ends).")
flags.DEFINE_boolean("infill", True, "Half the requests infill real text (else all are "
                     "unconditional: with --min_length=--max_length, the uniform workload).")
distributed.define_host_devices_flag()
flags.DEFINE_integer("rounds", 2, "Interleaved rounds of engine and static runs.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("out", "experiments/results/serving", "Output directory ('none': nothing).")


def _options(name: str):
    from sigma_jax.sampling import SampleOptions

    if name.startswith("burst"):
        return SampleOptions(name, order=FLAGS.order, window=FLAGS.window or None)
    return SampleOptions(name)


def main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)
    if len(argv) > 1:
        die(f"unexpected arguments: {' '.join(argv[1:])}")
    with usage_errors():
        cfg, params, encode, options, out = _checked_setup()
    import jax

    from bench import serving

    devices = jax.devices()[:FLAGS.host_devices] if FLAGS.host_devices > 1 else None

    text = Path(os.environ.get("SIGMA_JAX_DATA", "../shared/data")) / "tinyshakespeare/input.txt"
    ids = encode(text.read_text()[:200_000]) if text.is_file() else np.tile(
        np.arange(cfg.vocab_size), 4096)
    work = serving.mixed_workload(np.asarray(ids), FLAGS.requests, FLAGS.min_length,
                                  FLAGS.max_length, seed=FLAGS.seed, infill=FLAGS.infill)
    print(f"# {FLAGS.requests} requests, lengths {FLAGS.min_length}-{FLAGS.max_length}, "
          f"{int(work.generated.sum())} tokens to generate, {FLAGS.slots} slots, "
          f"{FLAGS.host_devices} host device(s)")
    rows = [row for o in options for row in _rounds(cfg, params, work, o, devices)]
    if out is not None:
        (out / "serving.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        serving.plot(rows, out / "serving.png")
        print(f"# wrote {out}/serving.jsonl and serving.png")


def _checked_setup():
    """(cfg, params, encode, sampler options, output folder or None) after every flag check
    (one-line ValueErrors), before any measurement."""
    distributed.use_host_devices(FLAGS.host_devices)  # first: before any other JAX call
    for name in ("requests", "slots", "min_length", "steps_per_call", "rounds"):
        if getattr(FLAGS, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(FLAGS, name)}")
    if FLAGS.window < 0:
        raise ValueError(f"--window must be >= 0 (0: all remaining positions); got "
                         f"{FLAGS.window}")
    from bench.serving import check_seed

    check_seed(FLAGS.seed, FLAGS.requests, "--seed")
    if not FLAGS.min_length <= FLAGS.max_length:
        raise ValueError("--min_length must not exceed --max_length")
    if FLAGS.slots % FLAGS.host_devices:
        raise ValueError(f"--slots ({FLAGS.slots}) must divide over the --host_devices "
                         f"({FLAGS.host_devices})")
    options = [_options(name) for name in FLAGS.samplers]
    if "ar_nocache" in FLAGS.samplers:
        raise ValueError("--samplers: the engine does not run ar_nocache (the uncached "
                         "oracle); choose among ar, burst, burst_jacobi, burst_paper")
    from sigma_jax import pretrained
    from sigma_jax.sampling.engine import check_init

    cfg, params, encode, _ = pretrained.load(FLAGS.pretrained)
    if FLAGS.max_length > cfg.block_size:
        raise ValueError(f"--max_length must be <= the model's block_size {cfg.block_size}")
    for o in options:  # what the engine takes: no ar_nocache; fit for the model
        check_init(cfg, o, FLAGS.slots, FLAGS.max_length)
    out = None if FLAGS.out == "none" else output_path(FLAGS.out, "out", folder=True)
    return cfg, params, encode, options, out


def _rounds(cfg, params, work, options, devices) -> list[dict]:
    """--rounds rounds of the engine and static batches on `work` with `options`, printed as they
    come; the engine's tokens checked equal to the static batches'."""
    from bench import serving

    rows = []
    for round_ in range(FLAGS.rounds):
        engine_row = serving.run_engine(cfg, params, work, options, FLAGS.slots,
                                        FLAGS.max_length, FLAGS.steps_per_call, devices)
        static_row = serving.run_static(cfg, params, work, options, FLAGS.slots,
                                        FLAGS.max_length, devices)
        for i, tokens in engine_row.pop("tokens").items():
            if not np.array_equal(tokens, static_row["tokens"][i]):
                raise AssertionError(f"request {i}: the engine's tokens differ from static")
        static_row.pop("tokens")
        for row in (engine_row, static_row):
            rows.append(dict(row, round=round_))
            print(_line(row), flush=True)
        print(f"  round {round_}: engine/static tokens/s = "
              f"{engine_row['tokens_per_s'] / static_row['tokens_per_s']:.2f}x", flush=True)
    return rows


def _line(row: dict) -> str:
    return (f"{row['label']:28s} {row['kind']:6s} {row['requests_per_s']:7.2f} req/s "
            f"{row['tokens_per_s']:8.0f} tok/s  calls p50/p99 {row['calls_p50']:.0f}/"
            f"{row['calls_p99']:.0f}  s p50/p99 {row['seconds_p50']:.2f}/{row['seconds_p99']:.2f}"
            f"  occupancy {row['occupancy']:.0%}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
