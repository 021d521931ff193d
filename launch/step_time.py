"""Time the sharded train step: `python -m launch.step_time --config=<preset> --meshes=...`.

For each mesh (data:fsdp:tensor) of --meshes: build the sharded state (`init_state(mesh=...)`),
place one fixed batch of the preset's task, run --warmup steps (compilation included), then time
--steps steps one by one (each waits for its result) and print the median and the spread. One
JSON object per mesh goes to --json (appended) if given. The numbers of docs/scaling.md come
from this script. Bad flags (an empty --meshes, --steps or --warmup below 1, a --json path in no
writable folder) exit 2 with one line before any step runs.

Fake CPU devices must be set before JAX starts, so compare device counts across processes:
  python -m launch.step_time --config=tiny --meshes=1:1:1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m launch.step_time --config=tiny --meshes=1:1:1,8:1:1,2:2:2,1:2:4
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from launch import distributed
from launch import flags as launch_flags
from sigma_jax import sharding as sh
from sigma_jax.checks import check_int
from sigma_jax.train import check_batch_fits, checked_batch, init_state, make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset name (sigma_jax/presets.py).")
flags.DEFINE_string("meshes", "1:1:1", "Comma-separated meshes data:fsdp:tensor.")
flags.DEFINE_integer("steps", 30, "Timed steps per mesh.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).")
flags.DEFINE_string("json", None, "Append one JSON line per mesh to this file.")
launch_flags.define_set_flag()
distributed.define_axis_type_flag()


def time_mesh(model_cfg, train_cfg, batch: np.ndarray, mesh_text: str) -> dict:
    """Median seconds per train step on one mesh (see the module docstring)."""
    mesh = sh.make_mesh(sh.MeshConfig.parse(mesh_text, FLAGS.mesh_axis_type))
    check_batch_fits(train_cfg, mesh)
    with jax.set_mesh(mesh):
        state = init_state(model_cfg, train_cfg, mesh=mesh)
        placed = sh.place_local_batch(checked_batch(model_cfg, batch), mesh)
        step = make_train_step(model_cfg, train_cfg, mesh).unchecked  # the step alone, timed
        t0 = time.perf_counter()
        for _ in range(FLAGS.warmup):
            state, metrics = step(state, placed)
            jax.block_until_ready(metrics)
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(FLAGS.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, placed)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    times = np.asarray(times)
    return {"config": FLAGS.config, "mesh": mesh_text, "axis_type": FLAGS.mesh_axis_type,
            "devices": jax.device_count(), "platform": jax.default_backend(),
            "batch": int(batch.shape[0]), "seq_len": int(batch.shape[1]),
            "median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90)), "steps": FLAGS.steps,
            "warmup_s": warmup_s, "final_loss": float(metrics["loss"])}


def check_flags(meshes: list[str]) -> None:
    """One-line ValueErrors, before any step runs: no mesh, an empty or malformed one, --steps or
    --warmup below 1 (the first warm-up step compiles, so it must not be timed), a --json path
    that cannot be appended to."""
    if not meshes or not all(meshes):
        raise ValueError(f"--meshes must be comma-separated meshes data:fsdp:tensor (e.g. "
                         f"1:1:1,2:1:1), none empty; got {FLAGS.meshes!r}")
    for mesh_text in meshes:
        sh.MeshConfig.parse(mesh_text, FLAGS.mesh_axis_type)
    check_int("--steps", FLAGS.steps, 1)
    if FLAGS.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first step compiles and must not be "
                         f"timed); got {FLAGS.warmup}")
    if FLAGS.json:
        launch_flags.output_path(FLAGS.json, "json")


def main(argv) -> None:
    if len(argv) > 1:
        launch_flags.die(f"unexpected arguments: {' '.join(argv[1:])}")
    from launch.train import build
    from sigma_jax.data import make_iterator

    with launch_flags.usage_errors():
        model_cfg, train_cfg, task = build(FLAGS.config, FLAGS.set)
        meshes = [m.strip() for m in FLAGS.meshes.split(",")] if FLAGS.meshes.strip() else []
        check_flags(meshes)
    it = make_iterator(task, "train", train_cfg.global_batch, train_cfg.seed, num_threads=0)
    batch = np.asarray(next(it), np.int32)
    print(f"# {FLAGS.config}: {model_cfg.n_layer}x{model_cfg.n_embd} model, batch "
          f"{batch.shape[0]}x{batch.shape[1]}, {jax.device_count()} {jax.default_backend()} "
          f"devices; median of {FLAGS.steps} steps after {FLAGS.warmup} warm-up steps")
    for mesh_text in meshes:
        with launch_flags.usage_errors():
            row = time_mesh(model_cfg, train_cfg, batch, mesh_text)
        print(f"mesh {mesh_text:>7} ({row['axis_type']}): {1e3 * row['median_s']:8.2f} ms/step "
              f"(p10 {1e3 * row['p10_s']:.2f}, p90 {1e3 * row['p90_s']:.2f}), warm-up "
              f"{row['warmup_s']:.1f} s", flush=True)
        if FLAGS.json:
            with open(FLAGS.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
