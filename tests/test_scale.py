"""Sharded training, sampling and checkpoints on 8 fake CPU devices (tests/conftest.py), against
one-device runs; the launchers' mesh and multi-host flags.

The model is the tiny preset shrunk to 8 tokens (`build(PRESET, SETS)`, as launch.train builds
it), with 4 heads and an 11-token vocabulary so that heads, MLP width and vocabulary all split
over tensor=4. tests/test_multihost.py reuses these settings (with the task's own vocabulary).

Compile time dominates these tests, so they compile with `jax_disable_most_optimizations` (about
3x faster XLA compiles on CPU). It skips XLA's optimisation passes, not the SPMD partitioner:
the sharded programs keep their collectives, and sharded and unsharded runs are compared
under the same setting.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import subprocess_env
from sampler_helpers import peaked_params

from launch import distributed
from launch.train import build
from sigma_jax import checkpoint
from sigma_jax import sharding as sh
from sigma_jax.data import make_iterator
from sigma_jax.param_sharding import shard_params
from sigma_jax.sampling import SampleOptions, sample, sample_sharded
from sigma_jax.train import (
    check_batch_fits,
    configs_dict,
    init_state,
    place_state,
    state_shardings,
    train_step,
)

P = jax.P
pytestmark = [pytest.mark.multidevice, pytest.mark.integration]

PRESET = "tiny"
SETS = ["seq_len=8", "block_size=8", "n_head=4", "vocab_size=11", "max_steps=3", "batch_size=8",
        "warmup_steps=1", "learning_rate=1e-3", "min_lr=1e-4", "eval_every=0", "eval_batches=1",
        "checkpoint_every=0", "log_every=1"]
STEPS = 3
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    with less_optimization():
        yield


class less_optimization:
    """Context manager: XLA compiles without its optimisation passes, then the old setting."""

    def __enter__(self):
        self.previous = jax.config.read("jax_disable_most_optimizations")
        jax.config.update("jax_disable_most_optimizations", True)

    def __exit__(self, *exc):
        jax.config.update("jax_disable_most_optimizations", self.previous)


def mesh_of(shape: str, axis_type: str = "auto"):
    return sh.make_mesh(sh.MeshConfig.parse(shape, axis_type))


def global_batches(task, train_cfg, process_count: int = 1) -> list[np.ndarray]:
    """The first STEPS global batches of a run with `process_count` processes: process p reads
    rows p::process_count of the data and its rows come p-th in the global batch."""
    its = [make_iterator(task, "train", train_cfg.global_batch, train_cfg.seed, process_index=p,
                         process_count=process_count, num_threads=0)
           for p in range(process_count)]
    return [np.concatenate([np.asarray(next(it)) for it in its]) for _ in range(STEPS)]


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def run_sharded(model_cfg, train_cfg, mesh, batches, state=None):
    """Train on `mesh` from `init_state(mesh=...)` (or `state`): (state, losses)."""
    with jax.set_mesh(mesh):
        if state is None:
            state = init_state(model_cfg, train_cfg, mesh=mesh)
        losses = []
        for batch in batches:
            state, metrics = train_step(model_cfg, train_cfg, state,
                                        sh.place_local_batch(batch, mesh), mesh=mesh)
            losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def setup():
    model_cfg, train_cfg, task = build(PRESET, SETS)
    return model_cfg, train_cfg, task, global_batches(task, train_cfg)


@pytest.fixture(scope="module")
def one_device(setup):
    """The unsharded run: (initial state on host, per-step losses, params after each step)."""
    model_cfg, train_cfg, _, batches = setup
    start = init_state(model_cfg, train_cfg)
    initial = jax.device_get(dataclasses.replace(start, key=jax.random.key_data(start.key)))
    state, losses, states = start, [], []
    for batch in batches:
        state, metrics = train_step(model_cfg, train_cfg, state, batch)
        losses.append(float(metrics["loss"]))
        states.append(jax.device_get(state.params))
    return initial, losses, states


# ---------------------------------------------------------------------------------- training

KERNEL = ("h", "attn", "c_attn", "kernel")  # [L, D, 3D] = [2, 32, 96]: P(None, fsdp, tensor)
FC = ("h", "mlp", "c_fc", "kernel")  # [2, 32, 128]
WTE = ("wte", "embedding")  # [12, 32]: P(tensor, None)


def leaf(tree, path):
    for name in path:
        tree = tree[name]
    return tree


@pytest.mark.parametrize("shape, axis_type", [("8:1:1", "auto"), ("2:2:2", "auto"),
                                              ("1:2:4", "auto"), ("2:2:2", "explicit")])
def test_sharded_train_steps_match_one_device(setup, one_device, shape, axis_type):
    model_cfg, train_cfg, _, batches = setup
    initial, losses, states = one_device
    mesh = mesh_of(shape, axis_type)
    _, fsdp, tensor = sh.MeshConfig.parse(shape).shape
    with jax.set_mesh(mesh):
        start = init_state(model_cfg, train_cfg, mesh=mesh)
    assert max_diff(start.params, initial.params) < 1e-6  # sharded init == unsharded init
    first_kernel = leaf(start.params, KERNEL)
    state, got = run_sharded(model_cfg, train_cfg, mesh, batches, state=start)
    assert first_kernel.is_deleted()  # the state was donated
    np.testing.assert_allclose(got, losses, rtol=0, atol=ATOL)
    assert max_diff(state.params, states[-1]) < ATOL
    assert int(state.step) == STEPS
    # The params and Adam's moments really are split as the rules say.
    kernel = leaf(state.params, KERNEL)
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32 // fsdp, 96 // tensor)}
    assert leaf(state.params, FC).sharding.spec == P(None, "fsdp", "tensor")
    assert leaf(state.params, WTE).sharding.spec == P("tensor", None)
    assert leaf(state.params, ("ln_f", "scale")).sharding.spec == P("fsdp")
    mu = state.opt_state[1][0].mu  # clip_by_global_norm, then adamw's scale_by_adam
    assert leaf(mu, KERNEL).sharding.spec == P(None, "fsdp", "tensor")
    assert state.step.sharding.spec == P()
    assert all(s.mesh == mesh for s in jax.tree.leaves(
        state_shardings(model_cfg, train_cfg, mesh)))


def test_batch_must_split_over_the_batch_axes(setup):
    _, train_cfg, _, _ = setup
    check_batch_fits(train_cfg, mesh_of("2:2:2"))  # 8 rows over data x fsdp = 4
    with pytest.raises(ValueError, match="batch_size: batch 6 is not divisible by the 4 devices"):
        check_batch_fits(train_cfg.replace(batch_size=6), mesh_of("2:2:2"))
    with pytest.raises(ValueError, match="is not divisible by the 8 devices"):
        sh.place_local_batch(np.zeros((4, 8), np.int32), mesh_of("8:1:1"))


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoint_saved_on_one_mesh_resumes_on_another(setup, one_device, tmp_path):
    """Save after step 1 under (2,2,2); restore under (8,1,1) and finish: the one-device run.
    `load` puts the same params on any mesh, or on one device."""
    model_cfg, train_cfg, _, batches = setup
    initial, _, states = one_device
    mesh_a, mesh_b = mesh_of("2:2:2"), mesh_of("8:1:1")
    state_a, _ = run_sharded(model_cfg, train_cfg, mesh_a, batches[:1])
    configs = configs_dict(model_cfg, train_cfg)
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, state_a, configs=configs)
        manager.wait()
        with jax.set_mesh(mesh_b):
            target = init_state(model_cfg, train_cfg, mesh=mesh_b)
            state_b = manager.restore(1, target)
    assert max_diff(state_b.params, state_a.params) == 0
    assert max_diff(state_b.opt_state, state_a.opt_state) == 0
    assert jnp.array_equal(jax.random.key_data(state_b.key), jax.random.key_data(state_a.key))
    kernel = leaf(state_b.params, KERNEL)
    assert kernel.sharding.mesh == mesh_b and kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32, 96)}  # fsdp=tensor=1
    state_b, _ = run_sharded(model_cfg, train_cfg, mesh_b, batches[1:], state=state_b)
    assert int(state_b.step) == STEPS and max_diff(state_b.params, states[-1]) < ATOL

    mesh_c = mesh_of("1:2:4")
    _, on_mesh, step = checkpoint.load(tmp_path, mesh=mesh_c)
    _, on_device, _ = checkpoint.load(tmp_path)
    assert step == 1 and max_diff(on_mesh, states[0]) < ATOL and max_diff(on_device, on_mesh) == 0
    assert leaf(on_mesh, KERNEL).sharding.mesh == mesh_c
    assert {s.data.shape for s in leaf(on_mesh, KERNEL).addressable_shards} == {(2, 16, 24)}
    assert leaf(on_device, KERNEL).sharding.device_set == {jax.devices()[0]}
    # place_state: an unsharded state onto a mesh, as a copy that is safe to donate.
    host = init_state(model_cfg, train_cfg)
    placed = place_state(host, model_cfg, train_cfg, mesh_c)
    assert max_diff(placed.params, initial.params) == 0
    run_sharded(model_cfg, train_cfg, mesh_c, batches[:1], state=placed)  # donates `placed`
    assert leaf(placed.params, KERNEL).is_deleted() and not host.key.is_deleted()
    assert max_diff(host.params, initial.params) == 0


# ---------------------------------------------------------------------------------- sampling

SAMPLE_MODEL = dict(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def sampler_inputs():
    """A peaked random model (context-dependent conditionals) and 6 ragged rows: 6 is not a
    multiple of the 4 batch devices of (2,2,2), so the sharded path pads and strips."""
    from sigma_jax import ModelConfig

    cfg = ModelConfig(**SAMPLE_MODEL)
    params = peaked_params(cfg, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (6, 8)).astype(np.int32)
    known = rng.random((6, 8)) < 0.4
    known[[0, -1]] = False  # two rows generate everything; padding copies the last one
    return cfg, params, tokens, known


# The Explicit case reuses the burst reference (same call), so it costs one compile.
@pytest.mark.parametrize("options, shape, axis_type", [
    (SampleOptions("ar", order="random"), "2:2:2", "auto"),
    (SampleOptions("burst", window=4), "2:2:2", "auto"),
    (SampleOptions("burst", window=4), "1:2:4", "explicit"),
], ids=["ar-auto", "burst-auto", "burst-explicit"])
def test_sharded_samplers_give_the_unsharded_tokens(sampler_inputs, options, shape, axis_type):
    """Tokens and every statistic, for several seeds: the padding rows (6 rows on 4 batch
    devices) must not change how long the loop runs."""
    cfg, params, tokens, known = sampler_inputs
    mesh = mesh_of(shape, axis_type)
    placed = shard_params(params, mesh)
    for seed in range(6):
        key = jax.random.key(seed)
        want, want_stats = sample(cfg, params, key, tokens, known, options)
        out, stats = sample_sharded(cfg, placed, key, tokens, known, options, mesh=mesh)
        assert out.shape == (6, 8) and out.sharding.mesh == mesh
        got, got_stats = sh.to_host((out, stats))
        np.testing.assert_array_equal(got, want)
        for name in ("iterations", "generated", "forward_passes", "finished"):
            np.testing.assert_array_equal(getattr(got_stats, name), getattr(want_stats, name),
                                          err_msg=f"{name}, seed {seed}")
        assert (got[known] == tokens[known]).all() and len({tuple(r) for r in got}) > 1


@pytest.mark.parametrize("options, shape, axis_type", [
    (SampleOptions("ar", order="random"), "8:1:1", "auto"),
    (SampleOptions("burst_jacobi", order="spread", window=4), "4:1:1", "explicit"),
], ids=["ar-8-devices", "jacobi-4-devices-explicit"])
def test_per_device_loops_give_the_unsharded_tokens(sampler_inputs, options, shape, axis_type):
    """A data-parallel mesh runs one loop per device over its own rows, with no collective in
    the loops: the tokens and every statistic of the unsharded call, with ragged lengths and an
    explicit order, and with devices whose rows are all padding (6 rows on 8 devices)."""
    cfg, params, tokens, known = sampler_inputs
    mesh = mesh_of(shape, axis_type)
    lengths = np.array([8, 5, 8, 3, 7, 8], np.int32)
    known = known & (np.arange(8) < lengths[:, None])
    rng = np.random.default_rng(1)
    within = lambda row, mask: np.flatnonzero(mask & (np.arange(8) < lengths[row]))
    order = np.stack([np.concatenate([within(r, k), rng.permutation(within(r, ~k)),
                                      np.arange(lengths[r], 8)])
                      for r, k in enumerate(known)]).astype(np.int32)
    for seed, explicit in ((0, None), (1, order)):
        key = jax.random.key(seed)
        want, want_stats = sample(cfg, params, key, tokens, known, options, order=explicit,
                                  lengths=lengths)
        out, stats = sample_sharded(cfg, params, key, tokens, known, options, mesh=mesh,
                                    order=explicit, lengths=lengths)
        got, got_stats = sh.to_host((out, stats))
        np.testing.assert_array_equal(got, want)
        for name in ("iterations", "generated", "forward_passes", "finished"):
            np.testing.assert_array_equal(getattr(got_stats, name), getattr(want_stats, name),
                                          err_msg=f"{name}, seed {seed}")


def test_serving_on_several_devices_gives_the_one_shot_tokens(sampler_inputs):
    """serve(devices=...): 2 engines over 3 slots (shares 2 and 1), each on its own device; every
    request's tokens and statistics are the one-shot sampler's on it alone; bad arguments fail
    with one line."""
    from sigma_jax.sampling import Request, serve

    cfg, params, tokens, known = sampler_inputs
    options = SampleOptions("burst_jacobi", order="spread", window=4)
    requests = [Request(tokens[i % 6, :n], known[i % 6, :n], jax.random.key(100 + i))
                for i, n in enumerate([8, 5, 8, 5, 8, 8, 5])]
    devices = jax.devices()[:2]
    results = list(serve(cfg, params, requests, slots=3, options=options, devices=devices))
    assert sorted(r.index for r in results) == list(range(len(requests)))
    for r in results:
        req = requests[r.index]
        want, stats = sample(cfg, params, req.key[None], req.tokens[None], req.known[None],
                             options)
        np.testing.assert_array_equal(r.tokens, np.asarray(want)[0], err_msg=f"{r.index}")
        assert int(r.stats.iterations[0]) == int(stats.iterations[0])
    with pytest.raises(ValueError, match="not both"):
        next(serve(cfg, params, requests, slots=4, options=options, devices=devices,
                   mesh=mesh_of("2:1:1")))
    with pytest.raises(ValueError, match="at least the number of devices"):
        next(serve(cfg, params, requests, slots=1, options=options, devices=devices))


def test_per_device_loops_only_when_the_params_are_whole_on_every_device(sampler_inputs):
    """The data-parallel program's only collective is the final most of forward_passes; a mesh
    that splits the params keeps one loop over the mesh (a collective in every iteration)."""
    from sigma_jax.sampling.sharded import _sampler_kernel

    cfg, params, tokens, known = sampler_inputs
    options = SampleOptions("ar", order="random")
    traced = options.traced_arguments(8)
    lengths = np.full(8, 8, np.int32)
    keys = jax.random.split(jax.random.key(0), 8)
    rows = (np.zeros((8, 8), np.int32), np.zeros((8, 8), bool), lengths)

    def all_reduces(shape):
        mesh = mesh_of(shape)
        kernel = _sampler_kernel(cfg, mesh, options.static_part(), False, 8, 0)
        with jax.set_mesh(mesh):
            text = kernel.lower(params, keys, *rows, traced).compile().as_text()
        return text.count(" all-reduce(")

    assert all_reduces("8:1:1") == 1
    assert all_reduces("2:2:2") > 1


# ---------------------------------------------------------------------------------- launchers


def test_mesh_flag_auto_and_explicit():
    cfg = sh.mesh_config("auto", devices=8, platform="gpu", process_count=1)
    assert cfg == sh.MeshConfig(8, 1, 1)
    assert sh.mesh_config("auto", "explicit", devices=8, platform="tpu",
                          process_count=2) == sh.MeshConfig(8, 1, 1, "explicit")
    assert sh.mesh_config("auto", devices=8, platform="cpu", process_count=1,
                          host_devices=1).size == 1
    assert sh.mesh_config("auto", devices=8, platform="cpu", process_count=1,
                          host_devices=2) == sh.MeshConfig(2, 1, 1)  # --host_devices=2
    assert sh.mesh_config("auto", devices=8, platform="cpu", process_count=2).size == 8
    assert sh.mesh_config("1:2:4") == sh.MeshConfig(1, 2, 4)


@pytest.mark.parametrize("environ, tpu_vm, expected", [
    ({}, False, None),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8",
      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, False, "SLURM"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False, None),  # one task: single host
    ({"SLURM_JOB_ID": "1"}, False, None),  # salloc shell, not an srun step
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, False, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, False, "Cloud TPU"),
    ({"TPU_WORKER_HOSTNAMES": "h0"}, False, None),
    ({}, True, "Cloud TPU"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_detection(environ, tpu_vm, expected):
    assert distributed.cluster_environment(environ, lambda: tpu_vm) == expected
    args = distributed.distributed_args("auto", None, None, None, environ, lambda: tpu_vm)
    assert args == (None if expected is None else {})


def test_distributed_flag_values():
    args = lambda *a: distributed.distributed_args(*a, environ={}, tpu_vm=lambda: False)
    assert args("off", None, None, None) is None
    assert args("on", None, None, None) == {}
    explicit = dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
    assert args("auto", *explicit.values()) == explicit
    for bad, message in [(("sometimes", None, None, None), "auto, on or off"),
                         (("off", "h:1", None, None), "conflicts"),
                         (("on", "h:1", 2, 2), "process_id"),
                         (("on", "nohostport", 2, 0), "host:port"),
                         (("on", None, 0, None), "num_processes")]:
        with pytest.raises(ValueError, match=message):
            args(*bad)


def test_launchers_reject_bad_meshes_with_one_line(tmp_path):
    """Exit 2 and one line on stderr before any work (8 devices)."""
    repo = Path(__file__).resolve().parents[1]
    env = subprocess_env(8, PYTHONPATH=str(repo))
    cases = {
        "too big": (["launch.train", "--config=tiny", "--mesh=4:4:1"], "needs 16 devices"),
        "batch": (["launch.train", "--config=tiny", "--mesh=8:1:1", "--set", "batch_size=12"],
                  "batch 12 is not divisible by the 8 devices"),
        "axis type": (["launch.sample", "--mesh_axis_type=manual"], "auto or explicit"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *args, f"--workdir={tmp_path / name}"],
                                    cwd=repo, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            lines = err.strip().splitlines()
            assert proc.returncode == 2, (name, err)
            assert len(lines) == 1 and cases[name][1] in lines[0], (name, err)
            assert not (tmp_path / name).exists(), name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_engine_slots_shard_over_the_batch_axes_with_the_tokens_of_one_device(sampler_inputs):
    """The engine's slots spread over the data (and fsdp) axes; every request's tokens equal
    the unsharded engine's, and the state stays sharded through inserts and steps."""
    from sigma_jax.sampling import Request, SampleOptions, engine, serve

    cfg, params, tokens, known = sampler_inputs
    mesh = mesh_of("2:2:2")
    options = SampleOptions("burst_jacobi", order="spread", window=3)
    requests = [Request(tokens[i % 6, :8 - i % 3], known[i % 6, :8 - i % 3],
                        jax.random.key(40 + i)) for i in range(10)]
    want = {r.index: r.tokens for r in serve(cfg, params, requests, slots=8, options=options)}
    with jax.set_mesh(mesh):
        got = {r.index: r.tokens for r in serve(cfg, shard_params(params, mesh), requests,
                                                  slots=8, options=options, mesh=mesh)}
        state = engine.init(cfg, options, 8, 8, mesh=mesh)
        state = engine.insert(cfg, shard_params(params, mesh), state, jnp.int32(5),
                              tokens[0], known[0], 8, jax.random.key(0))
        state = engine.step(cfg, shard_params(params, mesh), state)
    assert sorted(got) == list(range(10))
    for i in want:
        np.testing.assert_array_equal(got[i], want[i])
    assert tuple(state.rows.tokens.sharding.spec[0]) == ("data", "fsdp")
