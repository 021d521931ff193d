"""Checkpoints in process: SIGTERM saves and stops, a corrupt latest checkpoint falls back to the
previous one with a warning, a half-written one is ignored, and the resumed run is bit-exact.
(The real SIGKILL of a training process is in test_launch_train.py.)"""

from __future__ import annotations

import dataclasses
import os
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax import checkpoint, metrics_log
from sigma_jax.data import load_task, make_iterator
from sigma_jax.presets import PRESETS, build_model_config
from sigma_jax.train import init_state, train, train_step


@pytest.fixture(scope="module")
def tiny():
    preset = PRESETS["tiny"]
    task = load_task(preset.train.task, seq_len=preset.train.seq_len)
    return build_model_config(preset.model, task.vocab_size), preset.train, task


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _corrupt(step_dir):
    """Truncate every file of the params item to half its size (a torn write)."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.integration
def test_sigterm_then_corrupt_latest_resumes_from_previous_exactly(tiny, tmp_path):
    model_cfg, train_cfg, task = tiny
    cfg = train_cfg.replace(checkpoint_every=10, eval_every=0, log_every=5)
    quiet = lambda line: None
    reference = train(model_cfg, cfg, tmp_path / "ref", task=task, log=quiet)

    # Run A: SIGTERM arrives while step 20 is being logged; the step in flight finishes, a
    # checkpoint is saved and waited for, and train returns.
    def sigterm_at_20(line):
        if line.startswith("step 20/"):
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    stopped = train(model_cfg, cfg, run, task=task, log=sigterm_at_20)
    assert stopped["preempted"] and stopped["step"] == 21
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the old handler is back
    ckpts = run / checkpoint.CHECKPOINT_DIR
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [10, 20, 21]
    assert checkpoint.load(run)[2] == 21

    # Damage the latest checkpoint, and leave a half-written one (killed during its save).
    _corrupt(ckpts / "21")
    (ckpts / "30.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
    (ckpts / "30.orbax-checkpoint-tmp" / "params" / "junk").write_bytes(b"\0" * 7)

    with pytest.warns(RuntimeWarning, match="checkpoint 21 .* cannot be restored"):
        lines = []
        resumed = train(model_cfg, cfg, run, task=task, log=lines.append)
    assert resumed["resumed_from"] == 20 and resumed["step"] == 50 and not resumed["preempted"]
    assert "resumed from step 20" in lines[0]
    moved = list((run / checkpoint.CORRUPT_DIR).iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["21"]  # kept aside, not deleted
    assert not (ckpts / "30.orbax-checkpoint-tmp").exists()  # replaced by the real step 30

    # Bit-exact: params, optimizer-driven trajectory and metrics equal the uninterrupted run.
    _, ref_params, ref_step = checkpoint.load(tmp_path / "ref")
    _, params, step = checkpoint.load(run)
    assert step == ref_step == 50 and _leaves_equal(params, ref_params)
    assert resumed["loss"] == reference["loss"]
    assert resumed["val_loss_left_to_right"] == reference["val_loss_left_to_right"]
    ref_rows = {r["step"]: r for r in metrics_log.read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    rows = metrics_log.read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))  # no duplicated steps after the resume
    for row in rows:
        if row["step"] in ref_rows:
            assert row["loss"] == ref_rows[row["step"]]["loss"], row["step"]


def test_every_checkpoint_unusable_is_an_error_and_moves_nothing(tiny, tmp_path):
    model_cfg, train_cfg, task = tiny
    state = init_state(model_cfg, train_cfg)
    with checkpoint.CheckpointManager(tmp_path, every=1, keep=2) as manager:
        manager.save(3, state)
    _corrupt(tmp_path / checkpoint.CHECKPOINT_DIR / "3")
    with checkpoint.CheckpointManager(tmp_path, every=1, keep=2) as manager:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(RuntimeError, match="no checkpoint .* can be restored"):
                manager.restore_latest(init_state(model_cfg, train_cfg))
    assert (tmp_path / checkpoint.CHECKPOINT_DIR / "3").is_dir()


def test_load_checks_the_step_first_and_names_a_missing_model_config(tiny, tmp_path):
    for step, given in [(2.0, "2.0"), ("2", "'2'"), (-1, "-1"), (True, "True")]:
        with pytest.raises(ValueError, match=f"^step must be an integer >= 0; got {given}$"):
            checkpoint.load(tmp_path / "nowhere", step=step)  # before the workdir is looked at
    model_cfg, train_cfg, _ = tiny
    with checkpoint.CheckpointManager(tmp_path, every=1) as manager:
        manager.save(3, init_state(model_cfg, train_cfg))  # no configs
    with pytest.raises(ValueError, match="^checkpoint 3 in .* holds no model config .*, so load "
                                         "cannot rebuild its model$"):
        checkpoint.load(tmp_path, step=3)


def test_manager_round_trip_restores_state_key_and_data_position(tiny, tmp_path):
    model_cfg, train_cfg, task = tiny
    it = make_iterator(task, "train", train_cfg.global_batch, seed=4, num_threads=0)
    state = init_state(model_cfg, train_cfg)
    for _ in range(3):
        state, _ = train_step(model_cfg, train_cfg, state, next(it))
    saved = jax.tree.map(np.asarray, (state.step, state.params, state.opt_state))
    key_data = np.asarray(jax.random.key_data(state.key))
    with checkpoint.CheckpointManager(tmp_path, every=5, keep=1) as manager:
        assert manager.should_save(5) and not manager.should_save(3)
        assert manager.save(3, state, data_iter=it, configs={"note": "x"})
        assert not manager.save(3, state)  # an existing step is never overwritten
    expected_next = np.asarray(next(it))

    fresh = make_iterator(task, "train", train_cfg.global_batch, seed=4, num_threads=0)
    target = init_state(model_cfg, train_cfg.replace(seed=99))  # other values, same structure
    with checkpoint.CheckpointManager(tmp_path, every=5, keep=1) as manager:
        assert manager.steps() == [3] and manager.latest_step() == 3
        restored, step = manager.restore_latest(target, fresh)
    assert step == 3
    assert _leaves_equal(jax.tree.map(np.asarray, (restored.step, restored.params,
                                                   restored.opt_state)), saved)
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), key_data)
    np.testing.assert_array_equal(next(fresh), expected_next)  # the data stream continues


def test_empty_workdir_restores_nothing(tiny, tmp_path):
    model_cfg, train_cfg, _ = tiny
    state = init_state(model_cfg, train_cfg)
    with checkpoint.CheckpointManager(tmp_path, every=0) as manager:
        restored, step = manager.restore_latest(state)
        assert step is None and restored is state and not manager.should_save(100)


def test_a_flipped_bit_in_saved_weights_is_caught_and_the_previous_checkpoint_loads(tiny,
                                                                                   tmp_path):
    """One bit flipped in the middle of the largest params data file of the latest checkpoint:
    its checksum no longer matches, so `load` and `restore_latest` fall back to the previous
    checkpoint (which is bitwise what was saved) instead of returning a changed weight."""
    model_cfg, train_cfg, _ = tiny
    first = init_state(model_cfg, train_cfg)
    second = init_state(model_cfg, train_cfg.replace(seed=7))
    configs = {"model": dataclasses.asdict(model_cfg)}
    with checkpoint.CheckpointManager(tmp_path, every=1, keep=2) as manager:
        manager.save(2, first, configs=configs)
        manager.save(3, second, configs=configs)
    data = max((p for p in (tmp_path / checkpoint.CHECKPOINT_DIR / "3" / "params").rglob("*")
                if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))

    with pytest.warns(RuntimeWarning, match="checkpoint 3 .*fails its params checksum"):
        _, params, step = checkpoint.load(tmp_path)
    assert step == 2 and _leaves_equal(params, first.params)
    with checkpoint.CheckpointManager(tmp_path, every=1, keep=2) as manager:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            restored, step = manager.restore_latest(init_state(model_cfg, train_cfg))
    assert step == 2 and _leaves_equal(restored.params, first.params)
