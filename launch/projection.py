"""A roofline projection of the sampler passes: `python -m launch.projection`.

    python -m launch.projection --preset=gpt2_small --devices=h100,tpu-v5e --batches=1,16

Prints, for each device and batch, every pass's FLOPs (XLA's cost analysis of the lowered pass),
minimum bytes, arithmetic intensity and projected time per call under the device's published
peaks (bench/projection.py), then the calls per sequence below which exact burst and
burst_jacobi would beat cached AR on it. A PROJECTION, not a measurement: nothing runs on the
device. Runs on a CPU-only machine in seconds (lowering only). Exit 2 with one line on bad
flags (an --out path in no writable folder included), before anything is computed.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from launch.flags import die, output_path, positive_ints, usage_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "gpt2_small", "Model preset (sigma_jax/presets.py).")
flags.DEFINE_list("devices", ["h100", "tpu-v5e"], "Devices (bench/projection.py DEVICES).")
flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
flags.DEFINE_integer("length", 1024, "Sequence length N.")
flags.DEFINE_integer("window", 64, "Burst window W.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute and storage dtype.")
flags.DEFINE_boolean("measure", False, "Also time every pass on this machine's default device "
                     "and print it beside the projections (meaningful on the device projected).")
flags.DEFINE_string("out", None, "Write the rows as JSON lines to this file.")


def main(argv) -> None:
    absl_logging.set_verbosity(absl_logging.ERROR)
    if len(argv) > 1:
        die(f"unexpected arguments: {' '.join(argv[1:])}")
    from bench import projection
    from bench.models import preset_model_config

    with usage_errors():
        unknown = [d for d in FLAGS.devices if d not in projection.DEVICES]
        if not FLAGS.devices or unknown:
            what = f"unknown device {unknown[0]!r}" if unknown else "--devices names no device"
            raise ValueError(f"{what}; devices: {', '.join(projection.DEVICES)}")
        batches = list(positive_ints("batches", FLAGS.batches))
        projection.check_sizes(FLAGS.length, FLAGS.window)
        cfg = preset_model_config(FLAGS.preset, FLAGS.length).replace(
            dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
        if FLAGS.out:
            output_path(FLAGS.out, "out")
    rows = projection.projection_rows(cfg, FLAGS.devices, batches, FLAGS.length, FLAGS.window,
                                      measure=FLAGS.measure)
    if FLAGS.measure:
        import jax

        print(f"# measured on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"# PROJECTION (not measured): {FLAGS.preset} {FLAGS.dtype}, N = {FLAGS.length}, "
          f"W = {FLAGS.window}; time = max(FLOPs / peak FLOP/s, bytes / peak bandwidth)")
    for row in rows:
        head = f"{row['device']:8s} B={row['batch']:<4d} {row['name']:15s}"
        if row["kind"] == "pass":
            measured = ("" if row["measured_ms"] is None
                        else f"  measured {row['measured_ms']:8.3f} ms/call")
            print(f"{head} {row['flops'] / 1e9:10.1f} GFLOP {row['bytes'] / 1e9:7.3f} GB "
                  f"{row['intensity']:8.1f} FLOP/B  {row['projected_ms']:8.3f} ms/call{measured}")
        else:
            print(f"{head} beats cached AR below {row['calls']:7.1f} calls per sequence")
    if FLAGS.out:
        Path(FLAGS.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
