"""Training: schedule, weight-decay mask, orders inside the step, curriculum, gradient
accumulation, recompilation, and a real 50-step run of the `tiny` preset whose loss must fall.

Most tests share the tiny preset's compiled step (the jit cache ignores TrainConfig fields that do
not change the step), so the module compiles the model only a few times.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sigma_jax import checkpoint, metrics_log, orders
from sigma_jax import train as train_lib
from sigma_jax.config import ModelConfig
from sigma_jax.data import load_task, make_iterator
from sigma_jax.model import forward, init_params
from sigma_jax.presets import PRESETS, build_model_config
from sigma_jax.train import (
    TrainConfig,
    decay_mask,
    evaluate,
    init_state,
    learning_rate,
    loss_fn,
    make_optimizer,
    step_orders,
    train,
    train_step,
)


@pytest.fixture(scope="module")
def tiny():
    """(model_cfg, train_cfg, task) of the tiny preset (product law, N = 32)."""
    preset = PRESETS["tiny"]
    task = load_task(preset.train.task, seq_len=preset.train.seq_len)
    return build_model_config(preset.model, task.vocab_size), preset.train, task


@pytest.fixture(scope="module")
def batch(tiny):
    _, train_cfg, task = tiny
    it = make_iterator(task, "train", train_cfg.global_batch, seed=123, num_threads=0)
    return np.asarray(next(it))  # int32 [16, 32]


def _key(seed):
    """An rbg key for the pure order tests: step_orders works with any key implementation, and
    rbg compiles several times faster than threefry on CPU (the train state keeps threefry)."""
    return jax.random.key(seed, impl="rbg")


def _copy(state):
    return jax.tree.map(jnp.copy, state)  # train_step donates its state


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """The tiny preset trained for its 50 steps: (result dict, workdir, logged lines)."""
    model_cfg, train_cfg, task = tiny
    workdir = tmp_path_factory.mktemp("tiny_run")
    lines = []
    result = train(model_cfg, train_cfg, workdir, task=task, log=lines.append)
    return result, workdir, lines


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("changes, field", [
    (dict(max_steps=0), "max_steps"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(min_lr=1.0, learning_rate=0.1), "min_lr"),
    (dict(beta2=1.0), "beta2"),
    (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(order_policy="sideways"), "order_policy"),
    (dict(order_policy="randcur:150"), "order_policy"),
    (dict(per_row_curriculum="yes"), "per_row_curriculum"),
    (dict(warmup_steps=20, max_steps=10), "warmup_steps"),
    (dict(task=""), "task"),
])
def test_train_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**changes)


def test_train_config_is_static_and_hashable():
    a, b = TrainConfig(learning_rate=1), TrainConfig(learning_rate=1.0)
    assert a == b and hash(a) == hash(b) and isinstance(a.learning_rate, float)
    assert jax.tree_util.tree_leaves(a) == []  # a static pytree: no leaves


# ---------------------------------------------------------------- optimiser


def test_learning_rate_schedule_at_start_mid_and_end():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1100)
    lr = lambda s: float(learning_rate(cfg, s))
    assert lr(0) == pytest.approx(1e-3 / 101, rel=1e-6)  # (step + 1) / (warmup + 1)
    assert lr(49) == pytest.approx(1e-3 * 50 / 101, rel=1e-6)
    assert lr(100) == pytest.approx(1e-3, rel=1e-6)  # warmup done: the peak
    assert lr(600) == pytest.approx(5.5e-4, rel=1e-6)  # half-way down the cosine
    assert lr(1099) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 999 / 1000)) * 9e-4,
                                     rel=1e-5)  # the last update
    assert lr(1100) == pytest.approx(1e-4, rel=1e-6) and lr(5000) == pytest.approx(1e-4, rel=1e-6)
    no_warmup = TrainConfig(learning_rate=2e-3, min_lr=0.0, warmup_steps=0, max_steps=10)
    assert float(learning_rate(no_warmup, 0)) == pytest.approx(2e-3)
    assert float(learning_rate(no_warmup, 5)) == pytest.approx(1e-3, rel=1e-6)


def test_weight_decay_covers_exactly_the_dense_kernels(tiny):
    model_cfg, _, _ = tiny
    params = init_params(model_cfg, jax.random.key(0))
    mask = decay_mask(params)
    decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert decayed == {
        "['h']['attn']['c_attn']['kernel']", "['h']['attn']['c_proj']['kernel']",
        "['h']['mlp']['c_fc']['kernel']", "['h']['mlp']['c_proj']['kernel']",
    }  # not: biases (2-D when layer-stacked), LayerNorm scales, wte, wpe
    untied = decay_mask({"lm_head": {"kernel": 0}, "wte": {"embedding": 0}})
    assert untied == {"lm_head": {"kernel": True}, "wte": {"embedding": False}}
    # The optimizer really decays only those leaves: with zero gradients Adam moves nothing, so
    # the update is -lr * weight_decay * p on the masked leaves and exactly 0 elsewhere.
    cfg = TrainConfig(learning_rate=1e-2, min_lr=0.0, warmup_steps=0, weight_decay=0.5,
                      max_steps=10, grad_clip=1.0)
    tx = make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for (path, u), p, m in zip(jax.tree_util.tree_leaves_with_path(updates),
                               jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        expected = -1e-2 * 0.5 * np.asarray(p) if m else np.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-12,
                                   err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- orders and loss


def _ce(logits, targets):
    """Mean cross-entropy in numpy (float64), independent of optax."""
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    return float(np.mean(logz - picked))


def test_left_to_right_loss_without_bos_is_plain_gpt_loss(tiny, batch):
    model_cfg, _, _ = tiny
    cfg = model_cfg.replace(bos=False)
    # bos=False params are the bos=True ones without the start token's and start position's rows.
    params = init_params(model_cfg, jax.random.key(1))
    params = {**params, "wte": {"embedding": params["wte"]["embedding"][:cfg.vocab_size]},
              "pos": {"wpe": params["pos"]["wpe"][:cfg.block_size]}}
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, jax.eval_shape(init_params, cfg, jax.random.key(1)))
    b, n = batch.shape
    got = loss_fn(cfg, params, jnp.asarray(batch), orders.left_to_right(b, n))
    # Plain GPT: slot t sees x_0..x_t at positions 0..t and predicts x_{t+1} at position t+1.
    steps = np.broadcast_to(np.arange(n - 1, dtype=np.int32), (b, n - 1))
    logits = forward(cfg, params, jnp.asarray(batch[:, :-1]), jnp.asarray(steps),
                     jnp.asarray(steps + 1))
    assert float(got) == pytest.approx(_ce(logits, batch[:, 1:]), rel=1e-5)


def test_train_step_loss_uses_the_orders_drawn_in_the_step(tiny, batch):
    """The order type reaches the loss (defect B7): the step's loss equals loss_fn on the orders
    that step_orders draws from fold_in(key, step), and differs from the left-to-right loss."""
    model_cfg, train_cfg, _ = tiny
    state = init_state(model_cfg, train_cfg)
    k_orders, _ = jax.random.split(jax.random.fold_in(state.key, state.step))
    drawn = step_orders(train_cfg, k_orders, state.step, 16, 32)  # [1, 16, 32]
    assert not np.array_equal(drawn[0], orders.left_to_right(16, 32))
    jit_loss = jax.jit(loss_fn)
    expected = jit_loss(model_cfg, state.params, batch, drawn[0])
    left_to_right = jit_loss(model_cfg, state.params, batch, orders.left_to_right(16, 32))
    _, metrics = train_step(model_cfg, train_cfg, _copy(state), batch)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["loss"]) != pytest.approx(float(left_to_right), rel=1e-6)
    assert float(metrics["frac_random"]) == 1.0


def test_fixed_policies_draw_the_requested_orders():
    key, n = _key(3), 12
    fractal = step_orders(TrainConfig(order_policy="fractal", grad_accum=2), key, 0, 3, n)
    np.testing.assert_array_equal(fractal, np.broadcast_to(orders.fractal_order(n), (2, 3, n)))
    kept = step_orders(TrainConfig(order_policy="fractal", keep_prompt_first=True), key, 0, 3, n,
                       prompt_len=4)
    np.testing.assert_array_equal(kept[0, 0], np.r_[np.arange(4), 4 + orders.fractal_order(8)])
    l2r = step_orders(TrainConfig(order_policy="left_to_right"), key, 7, 3, n)
    np.testing.assert_array_equal(l2r, np.broadcast_to(np.arange(n), (1, 3, n)))
    rand = np.asarray(step_orders(TrainConfig(order_policy="random"), key, 0, 64, n))[0]
    np.testing.assert_array_equal(np.sort(rand, axis=1), np.broadcast_to(np.arange(n), (64, n)))
    assert len({tuple(r) for r in rand}) == 64  # independent permutations per row


def test_keep_prompt_first_puts_the_prompt_first():
    key, n, p = _key(4), 10, 4
    for policy in ("random", "curriculum", "randcur:50"):
        cfg = TrainConfig(order_policy=policy, keep_prompt_first=True, max_steps=10,
                          warmup_steps=0)
        got = np.asarray(step_orders(cfg, key, 5, 200, n, prompt_len=p)).reshape(-1, n)
        np.testing.assert_array_equal(got[:, :p], np.broadcast_to(np.arange(p), (200, p)))
        np.testing.assert_array_equal(np.sort(got[:, p:], 1),
                                      np.broadcast_to(np.arange(p, n), (200, n - p)))
    loose = np.asarray(step_orders(TrainConfig(order_policy="random"), key, 0, 200, n,
                                   prompt_len=p))[0]
    assert (loose[:, :p] >= p).any()  # without the flag the prompt is shuffled like the rest


@pytest.mark.parametrize("policy, per_row", [("curriculum", False), ("randcur:20", False),
                                             ("curriculum", True)])
@pytest.mark.integration
def test_curriculum_fraction_of_random_batches_matches_the_schedule(policy, per_row):
    """Method doc 4.1: P(random) = s / max_steps (curriculum), P + (1 - P) s / max_steps
    (randcur:P); one coin per micro-batch, or per row with per_row_curriculum."""
    cfg = TrainConfig(order_policy=policy, per_row_curriculum=per_row, max_steps=100,
                      grad_accum=4, warmup_steps=0)
    n_keys, micro, n = 1000, 2, 6
    draw = jax.jit(jax.vmap(lambda k, s: step_orders(cfg, k, s, micro, n), in_axes=(0, None)))
    keys = jax.random.split(_key(5), n_keys)
    start = 0.2 if policy == "randcur:20" else 0.0
    for step in (0, 30, 75, 100):
        got = np.asarray(draw(keys, jnp.int32(step)))  # [keys, accum, micro, n]
        shuffled = (got != np.arange(n)).any(-1)  # a random row equals arange w.p. 1/720
        if not per_row:  # the whole micro-batch shares its coin
            assert (shuffled.all(-1) | ~shuffled.any(-1)).mean() > 0.99
            shuffled = shuffled.any(-1)
        p = start + (1 - start) * step / 100
        assert shuffled.mean() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 4000) + 0.01)


# ---------------------------------------------------------------- the step


def test_gradient_accumulation_matches_one_big_batch(tiny, batch):
    """2 micro-batches of 8 == 1 batch of 16 (dropout 0; same orders, since row permutations do
    not depend on the split)."""
    model_cfg, train_cfg, _ = tiny
    assert model_cfg.dropout == 0
    state = init_state(model_cfg, train_cfg)
    one, m_one = train_step(model_cfg, train_cfg, _copy(state), batch)
    split_cfg = train_cfg.replace(batch_size=8, grad_accum=2)
    two, m_two = train_step(model_cfg, split_cfg, _copy(state), batch)
    assert float(m_two["loss"]) == pytest.approx(float(m_one["loss"]), rel=1e-6)
    assert float(m_two["grad_norm"]) == pytest.approx(float(m_one["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert int(one.step) == int(two.step) == 1


def test_train_step_compiles_once_per_shape(tiny, batch):
    model_cfg, train_cfg, _ = tiny
    state = init_state(model_cfg, train_cfg)
    state, _ = train_step(model_cfg, train_cfg, state, batch)
    compiled = train_lib.make_train_step(model_cfg, train_cfg)._cache_size()
    # New data, new steps, and TrainConfig fields that do not change the step: no new compile.
    other = train_cfg.replace(seed=9, eval_every=7, log_every=3, checkpoint_every=11,
                              task="anything", eval_batches=5)
    for i, cfg in enumerate([train_cfg, other, train_cfg]):
        state, metrics = train_step(model_cfg, cfg, state, (batch + i) % 2)
    assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))
    assert train_lib.make_train_step(model_cfg, other)._cache_size() == compiled


def test_train_step_donates_the_state(tiny, batch):
    model_cfg, train_cfg, _ = tiny
    state = init_state(model_cfg, train_cfg)
    train_step(model_cfg, train_cfg, state, batch)
    assert jax.tree.leaves(state.params)[0].is_deleted()


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_a_bad_batch_raises_in_one_line_and_keeps_the_state(tiny, batch):
    """Ids outside [0, V), N outside [1, block_size] (N = 1 without bos), another rank, an empty
    batch, floats: one line before the step runs (the state is not donated), at trace time for
    the shape; loss_fn and evaluate check their batches the same way."""
    model_cfg, train_cfg, _ = tiny
    state = init_state(model_cfg, train_cfg)
    step = train_lib.make_train_step(model_cfg, train_cfg)
    shape = r"must be \[B, N\] with B >= 1 and 1 <= N <= block_size 32; got shape"
    cases = [(batch + 2, r"batch must hold token ids in \[0, 2\); got values in \[2, 3\]"),
             (batch - 1, r"got values in \[-1, 0\]"), ((batch - 1).tolist(), r"\[0, 2\)"),
             (np.zeros((16, 33), np.int32), shape + r" \(16, 33\)"),
             (batch[0], shape + r" \(32,\)"), (batch[:0], shape + r" \(0, 32\)"),
             (batch[:, :0], shape), (batch * 1.0, "batch must hold integer token ids")]
    for bad, match in cases:
        _one_line_error(lambda bad=bad: step(state, bad), match)
    assert not jax.tree.leaves(state.params)[0].is_deleted()
    _one_line_error(lambda: step.trace(state, jax.ShapeDtypeStruct((16, 33), jnp.int32)), shape)
    no_bos = model_cfg.replace(bos=False)
    _one_line_error(lambda: train_lib.make_train_step(no_bos, train_cfg)(state, batch[:, :1]),
                    r"2 <= N <= block_size 32 \(bos=False")
    params, order = state.params, orders.left_to_right(16, 32)
    _one_line_error(lambda: loss_fn(model_cfg, params, batch + 2, order), r"tokens must hold")
    _one_line_error(lambda: loss_fn(model_cfg, params, batch, order[:, :4]),
                    r"order must be \[B, N\] like tokens")
    for batches, match in [([], "batches must hold at least one batch"),
                           ([batch, batch * 1.0], r"batches\[1\] must hold integer token ids"),
                           ([batch, batch + 2], r"batches\[1\] must hold token ids in")]:
        _one_line_error(lambda batches=batches: evaluate(model_cfg, train_cfg, params, batches,
                                                         jax.random.key(0), 0), match)


# ---------------------------------------------------------------- the loop


@pytest.mark.integration
def test_tiny_preset_trains_and_its_loss_falls(trained):
    result, workdir, lines = trained
    rows = metrics_log.read_metrics(workdir / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 50 == result["step"]
    first = rows[0]["loss"]  # the loss of the initial parameters (before any update)
    # Product law, Bernoulli(0.1): entropy 0.325 nats/token. The initial model is far from it.
    assert first > 0.5
    for name in ("val_loss_left_to_right", "val_loss_random", "val_loss_train_order"):
        assert result[name] < 0.37 and result[name] < first - 0.15, name
    assert not result["preempted"] and result["resumed_from"] is None
    for row in rows[1:]:
        assert {"step", "loss", "tokens_per_s", "lr"} <= set(row)
    evals = [r for r in rows if "val_loss_left_to_right" in r]
    assert [r["step"] for r in evals] == [25, 50]
    assert any(line.startswith("step 50/50 | loss") and "ETA" in line for line in lines)
    config = json.loads((workdir / "config.json").read_text())
    model_cfg = build_model_config(PRESETS["tiny"].model, 2)
    assert config["model"] == dataclasses.asdict(model_cfg)
    assert config["train"] == dataclasses.asdict(PRESETS["tiny"].train)
    assert (workdir / "loss.png").stat().st_size > 1000
    assert list((workdir / "tb").iterdir())  # TensorBoard event files
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [25, 50]


@pytest.mark.integration
def test_load_returns_the_trained_params(tiny, trained):
    model_cfg, train_cfg, task = tiny
    result, workdir, _ = trained
    cfg, params, step = checkpoint.load(workdir)
    assert cfg == model_cfg and step == 50
    assert jax.tree.structure(params) == jax.tree.structure(init_params(cfg, jax.random.key(0)))
    # The loaded params reproduce the run's final evaluation exactly.
    val = train_lib.val_batches(task, train_cfg)
    key = jax.random.fold_in(jax.random.key(train_cfg.seed), train_lib.EVAL_STREAM)
    again = evaluate(cfg, train_cfg, params, val, key, 50)
    for name, value in again.items():
        assert value == result[name], name
    _, params25, step25 = checkpoint.load(workdir, step=25)
    assert step25 == 25
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(params), jax.tree.leaves(params25), strict=True))


@pytest.mark.integration
def test_load_errors_say_what_to_run(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="launch.train"):
        checkpoint.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="launch.train"):
        checkpoint.load(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint for step 7.*25, 50"):
        checkpoint.load(trained[1], step=7)


@pytest.mark.integration
def test_resuming_a_finished_run_trains_no_more(tiny, trained):
    model_cfg, train_cfg, task = tiny
    result, workdir, _ = trained
    before = (workdir / "metrics.jsonl").read_text()
    again = train(model_cfg, train_cfg, workdir, task=task, log=lambda line: None)
    assert again["resumed_from"] == 50 and again["step"] == 50
    assert again["val_loss_left_to_right"] == result["val_loss_left_to_right"]
    assert (workdir / "metrics.jsonl").read_text() == before


@pytest.mark.integration
def test_a_workdir_refuses_a_different_model(tiny, trained):
    model_cfg, train_cfg, task = tiny
    with pytest.raises(ValueError, match="different model.*n_layer"):
        train(model_cfg.replace(n_layer=3), train_cfg, trained[1], task=task)


@pytest.fixture(scope="module")
def saved_run(tiny, tmp_path_factory):
    """A workdir as `train` leaves it, without training: config.json, and checkpoint 5 holding
    the tiny preset's initial state and its configs."""
    model_cfg, train_cfg, _ = tiny
    workdir = tmp_path_factory.mktemp("saved_run")
    configs = train_lib.configs_dict(model_cfg, train_cfg)
    (workdir / "config.json").write_text(json.dumps(configs))
    with checkpoint.CheckpointManager(workdir, async_save=False) as manager:
        manager.save(5, init_state(model_cfg, train_cfg), configs=configs)
    return workdir


def _copy_run(saved_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    return workdir


def test_a_missing_config_json_still_refuses_a_different_model(tiny, saved_run, tmp_path):
    """The model is checked against the config stored in the checkpoint, and nothing is written
    when it differs: the run stays resumable with its own settings."""
    model_cfg, train_cfg, task = tiny
    workdir = _copy_run(saved_run, tmp_path)
    (workdir / "config.json").unlink()
    with pytest.raises(ValueError, match="different model.*n_embd.*checkpoint 5"):
        train(model_cfg.replace(n_embd=64), train_cfg, workdir, task=task)
    assert not (workdir / "config.json").exists()
    assert train_lib.check_workdir(workdir, model_cfg, train_cfg) == []
    # A config.json of another model (written by an older trainer) does not lock the run out.
    other = train_lib.configs_dict(model_cfg.replace(n_embd=64), train_cfg)
    (workdir / "config.json").write_text(json.dumps(other))
    assert train_lib.check_workdir(workdir, model_cfg, train_cfg) == []
    with pytest.raises(ValueError, match="different model.*n_embd"):
        train_lib.check_workdir(workdir, model_cfg.replace(n_embd=64), train_cfg)


@pytest.mark.parametrize("content", ["[]", '{"model": 3}', "{}", "{not json", b"\xff\xfe{}",
                                     "directory"])
def test_a_malformed_config_json_is_a_one_line_error_naming_it(tiny, saved_run, tmp_path,
                                                               content):
    model_cfg, train_cfg, _ = tiny
    workdir = _copy_run(saved_run, tmp_path)
    path = workdir / "config.json"
    path.unlink()
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match="config.json") as info:
        train_lib.check_workdir(workdir, model_cfg, train_cfg)
    assert "\n" not in str(info.value) and "new --workdir" in str(info.value)
    if content != "directory":
        assert path.read_bytes() == (content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("name, make", [
    ("metrics.jsonl", lambda p: p.mkdir()),
    ("checkpoints", lambda p: p.write_text("")),
    ("config.json", lambda p: p.mkdir()),
])
def test_a_run_file_of_the_wrong_kind_is_a_one_line_error(tiny, tmp_path, name, make):
    model_cfg, train_cfg, _ = tiny
    make(tmp_path / name)
    with pytest.raises(ValueError, match=f"{tmp_path / name} is not a"):
        train_lib.check_workdir(tmp_path, model_cfg, train_cfg)


def test_unusable_workdirs_are_one_line_errors(tiny, tmp_path):
    model_cfg, train_cfg, _ = tiny
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="afile exists and is not a directory"):
        train_lib.check_workdir(afile, model_cfg, train_cfg)
    with pytest.raises(ValueError, match=f"afile/sub/run cannot be created: {afile} is not a "):
        train_lib.check_workdir(afile / "sub" / "run", model_cfg, train_cfg)
    assert train_lib.check_workdir(tmp_path / "new" / "run", model_cfg, train_cfg) == []
    assert not (tmp_path / "new").exists()  # checking writes nothing
    if Path("/proc/self").is_dir():  # a file system that takes no new directories
        with pytest.raises(ValueError, match="/proc/sigma_jax_run cannot be created"):
            train_lib.make_workdir("/proc/sigma_jax_run")


def test_a_setting_that_changes_the_optimizer_state_is_refused(tiny, saved_run, tmp_path):
    """grad_clip 0 drops the clipping state the checkpoint holds: refused before any work, with
    the setting that restores; another clipping threshold keeps the state and is a note."""
    model_cfg, train_cfg, task = tiny
    workdir = _copy_run(saved_run, tmp_path)
    before = (workdir / "config.json").read_text()
    assert train_cfg.grad_clip == 1.0
    with pytest.raises(ValueError, match=r"grad_clip=1.0.*grad_clip=0.0.*--set grad_clip=1.0"):
        train(model_cfg, train_cfg.replace(grad_clip=0.0), workdir, task=task)
    assert (workdir / "config.json").read_text() == before
    assert train_lib.check_workdir(workdir, model_cfg, train_cfg.replace(grad_clip=0.5)) == [
        "grad_clip"]


def test_sigint_saves_the_step_and_stops_like_sigterm(tiny, tmp_path):
    model_cfg, train_cfg, task = tiny
    cfg = train_cfg.replace(log_every=1, eval_every=0, checkpoint_every=0)
    before = signal.getsignal(signal.SIGINT)

    def log(line):
        if line.startswith("step 3/") and signal.getsignal(signal.SIGINT) is not before:
            os.kill(os.getpid(), signal.SIGINT)  # caught by train's handler, not pytest's

    result = train(model_cfg, cfg, tmp_path, task=task, log=log)
    assert signal.getsignal(signal.SIGINT) is before
    assert result["preempted"] and result["signal"] == signal.SIGINT
    assert 3 <= result["step"] < cfg.max_steps
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [result["step"]]


def test_a_failed_checkpoint_write_stops_training_at_once(tiny, tmp_path, monkeypatch):
    """A background write that fails (here: ENOSPC after checkpoint 10) stops training before the
    next save, with one line naming the error; checkpoint 10 is left as it was."""
    model_cfg, train_cfg, task = tiny
    cfg = train_cfg.replace(checkpoint_every=10, log_every=1, eval_every=0)

    class FullDisk(checkpoint.CheckpointManager):
        failing = False

        def save(self, step, state, **kwargs):
            saved = super().save(step, state, **kwargs)
            self.failing = self.failing or step == 10
            return saved

        def wait(self):
            super().wait()
            if self.failing:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_lib.loop, "CheckpointManager", FullDisk)
    with pytest.raises(train_lib.SaveError, match=r"checkpoint 10 .*No space left on device") as e:
        train(model_cfg, cfg, tmp_path, task=task, log=lambda line: None)
    message = str(e.value)
    assert "\n" not in message and "rerun the same command" in message
    stopped = int(re.search(r"stopped at step (\d+)", message).group(1))
    assert 10 <= stopped <= 20
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [10]
    assert max(r["step"] for r in metrics_log.read_metrics(tmp_path / "metrics.jsonl")) <= 20


def test_optax_state_is_the_standard_adamw(tiny):
    """Guard: the optimizer state layout (what checkpoints hold) is optax's clip + AdamW."""
    model_cfg, train_cfg, _ = tiny
    state = init_state(model_cfg, train_cfg)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1 and int(adam[0].count) == 0


@pytest.mark.parametrize("encoding, scale", [("learned", 1.0), ("sinusoidal", 0.1)])
@pytest.mark.integration
def test_random_order_training_learns_a_neighbour_dependence(encoding, scale):
    """A random walk x_p = x_{p-1} + {0 or 1} (mod 16): in a random order the only help is to find
    the known neighbours by position, so leaving the unigram loss ln 16 shows the model locates
    tokens through the double positional encoding. (Published sinusoidal amplitude 1 stays at
    ln 16 for hundreds of steps at this scale: docs/training_dynamics.md.)"""
    v, n, b, steps = 16, 32, 32, 300
    cfg = ModelConfig(vocab_size=v, block_size=n, n_layer=2, n_head=4, n_embd=64,
                      pos_encoding=encoding, sinusoidal_scale=scale)
    tc = TrainConfig(seq_len=n, max_steps=steps, batch_size=b, learning_rate=5e-3, min_lr=5e-4,
                     warmup_steps=10, order_policy="random")
    state = train_lib.init_state(cfg, tc)
    rng = np.random.default_rng(0)
    walk = lambda: (rng.integers(0, v, (b, 1)) + np.cumsum(rng.integers(0, 2, (b, n)), 1)) % v
    # The one train step, compiled with XLA's default optimisation level: this test is bound by
    # its 300 steps, not by compiling (the suite compiles at level 0).
    step = train_lib.make_train_step(cfg, tc).lower(state, jnp.zeros((b, n), jnp.int32)).compile(
        compiler_options={"xla_backend_optimization_level": 2})
    for _ in range(steps):
        state, _ = step(state, jnp.asarray(walk(), jnp.int32))
    val = jnp.asarray(walk(), jnp.int32)
    order = orders.random_order(jax.random.key(1), jnp.zeros((b, n), bool))
    loss = float(train_lib.loss_fn(cfg, state.params, val, order))
    # Independent bound: with a known left neighbour the entropy is ln 2 (about 0.69); a model
    # that ignores positions cannot beat ln 16 = 2.77.
    assert loss < 0.6 * math.log(v), loss
