"""Training: loss, optimiser, train state, jitted train step, evaluation and the training loop.

Everything below `train` is a pure function of (configs, arrays, keys):

- `loss_fn`: mean cross-entropy of a batch read in given orders (the order really reaches the loss).
- `learning_rate` / `make_optimizer`: linear warmup + cosine decay to `min_lr` at `max_steps`;
  AdamW with global-norm clipping and weight decay on dense kernels only.
- `TrainState`, `init_state`, `train_step`: orders are drawn inside the step from
  `fold_in(state.key, state.step)`, so a resumed run draws the orders of an uninterrupted one.
- `eval_losses` / `evaluate`: validation loss in the training order, left to right, and random.

`train` is the loop around them: data, checkpoints (`sigma_jax.checkpoint`), metrics files,
TensorBoard, a progress line, a loss plot, and SIGTERM handling.

Sharding (docs/scaling.md): `init_state(mesh=)`, `train_step(mesh=)` / `sharded_train_step`,
`evaluate(mesh=)` and `train(mesh=)` run on a ("data", "fsdp", "tensor") mesh, one host or many;
`state_shardings` says where every leaf of the state lives. Without a mesh nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sigma_jax import metrics_log
from sigma_jax import orders as orders_lib
from sigma_jax import sharding as sh
from sigma_jax.config import ModelConfig
from sigma_jax.model import forward, init_params

EVAL_STREAM = 0x5EED  # fold_in tag of the evaluation key stream (kept apart from training keys)


# ---------------------------------------------------------------- config


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value, low: float, high: float | None = None,
                 *, high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (high is None or value < high or (value == high and not high_open))
    if not ok:
        bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name} must be a number >= {low}{bound}, got {value!r}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Validated on construction (ValueError naming the field).

    task, data_path, seq_len: passed to `sigma_jax.data.load_task` (seq_len None = the task's
      default; for text tasks it is the window length and should equal the model's block_size).
    max_steps: optimizer updates; the cosine schedule and the curriculum both end here.
    batch_size: sequences per micro-batch; one update sees batch_size * grad_accum sequences.
    learning_rate, min_lr, warmup_steps: linear warmup to learning_rate, cosine to min_lr.
    weight_decay: decoupled (AdamW), applied to dense kernels only (see `decay_mask`).
    grad_clip: global-norm clipping threshold; 0 turns clipping off.
    order_policy: 'left_to_right' | 'random' | 'fractal' | 'curriculum' | 'randcur:P'.
    per_row_curriculum: draw left-to-right vs random per row instead of per micro-batch.
    keep_prompt_first: the task's prompt positions stay first, in index order, in every
      training order (the published non-text code meant to do this but shuffled the prompt).
    eval_every / checkpoint_every: in steps; 0 = only at the end. Both also happen at max_steps.
    eval_batches: validation batches (of batch_size sequences) per evaluation.
    keep_checkpoints: how many of the latest checkpoints to keep.
    log_every: steps between metric rows (the only per-step host syncs).
    """

    task: str = "product"
    data_path: str | None = None
    seq_len: int | None = None
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    order_policy: str = "random"
    per_row_curriculum: bool = False
    keep_prompt_first: bool = False
    eval_every: int = 250
    eval_batches: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty task name, got {self.task!r}")
        if self.data_path is not None and not isinstance(self.data_path, str):
            raise ValueError(f"data_path must be a path string or None, got {self.data_path!r}")
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, 1)
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints",
                     "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        _check_float("learning_rate", self.learning_rate, 0.0)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        _check_float("min_lr", self.min_lr, 0.0, self.learning_rate)
        _check_float("weight_decay", self.weight_decay, 0.0)
        _check_float("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check_float("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check_float("grad_clip", self.grad_clip, 0.0)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps "
                             f"({self.max_steps})")
        orders_lib.parse_order_policy(self.order_policy)  # ValueError naming order_policy
        for name in ("per_row_curriculum", "keep_prompt_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer update: batch_size * grad_accum."""
        return self.batch_size * self.grad_accum

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- loss


def loss_fn(model_cfg: ModelConfig, params: dict, tokens: jax.Array, order: jax.Array,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of every target when each row of tokens int32 [B, N] is read in the
    order int32 [B, N] (orders.make_batch: with model_cfg.bos all N tokens are targets; without,
    the first token of each order is conditioning only and N - 1 are). Returns float32 []."""
    # Under an Explicit mesh the batch construction and the loss run with Auto axes (the gathers
    # of make_batch and of the cross-entropy take no out_sharding); elsewhere this is a plain call.
    return sh.auto_axes_call(functools.partial(_mean_loss, model_cfg), (), params, tokens, order,
                             dropout_key)


def _mean_loss(model_cfg, params, tokens, order, dropout_key):
    inputs, pos_in, pos_out, targets = orders_lib.make_batch(tokens, order, bos=model_cfg.bos,
                                                             bos_id=model_cfg.bos_id)
    logits = forward(model_cfg, params, inputs, pos_in, pos_out, dropout_key=dropout_key)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    return jnp.mean(losses)


# ---------------------------------------------------------------- optimiser


def learning_rate(train_cfg: TrainConfig, step) -> jax.Array:
    """The learning rate of update `step` (0-based), as float32.

    Warmup: lr * (step + 1) / (warmup_steps + 1) for step < warmup_steps (nanoGPT's form, so
    update 0 is not wasted). Then cosine from lr (at warmup_steps) to min_lr (at max_steps);
    min_lr from max_steps on.
    """
    lr, lo = train_cfg.learning_rate, train_cfg.min_lr
    warm, total = train_cfg.warmup_steps, train_cfg.max_steps
    s = jnp.asarray(step, jnp.float32)
    warmup = lr * (s + 1.0) / (warm + 1.0)
    progress = jnp.clip((s - warm) / max(total - warm, 1), 0.0, 1.0)
    cosine = lo + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (lr - lo)
    return jnp.where(s < warm, warmup, cosine).astype(jnp.float32)


def decay_mask(params: dict) -> dict:
    """True for the leaves that get weight decay: dense kernels (attention, MLP and an untied
    lm_head), whatever their rank (layer-stacked kernels are 3-D, their biases 2-D). False for
    biases, LayerNorm scales and the token and position embeddings. nanoGPT decays every >= 2-D
    parameter, embeddings included; sigma_jax does not, so rarely seen tokens and rarely used
    positions are not pulled towards zero between their updates.
    """
    def is_kernel(path, _):
        last = path[-1]
        return getattr(last, "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (if grad_clip > 0), then AdamW with the `learning_rate` schedule and
    weight decay masked by `decay_mask`. One optimizer update per train step."""
    adamw = optax.adamw(functools.partial(learning_rate, train_cfg), b1=train_cfg.beta1,
                        b2=train_cfg.beta2, eps=1e-8, weight_decay=train_cfg.weight_decay,
                        mask=decay_mask)
    if train_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
    return adamw


# ---------------------------------------------------------------- train state and step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """step: int32 [] (updates done); params: plain nested dict; opt_state: optax state;
    key: typed PRNG key, the root of every training draw (orders and dropout)."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    key: jax.Array


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, *, mesh=None,
               rules: sh.LogicalRules = sh.DEFAULT_RULES) -> TrainState:
    """Fresh parameters and optimizer state; everything derives from train_cfg.seed.

    With a mesh, the state is created by one jitted call whose outputs are already sharded by
    `state_shardings` (each device computes only its own shards: no host ever holds the whole
    model, and every process of a multi-host run gets the same global state).
    """
    if mesh is not None:
        return _sharded_init(model_cfg, _compiled_config(train_cfg), train_cfg.seed, mesh,
                             rules)()
    return _init_state(model_cfg, train_cfg, train_cfg.seed)


def _init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, seed) -> TrainState:
    k_params, k_train = jax.random.split(jax.random.key(seed))
    params = init_params(model_cfg, k_params)
    opt_state = make_optimizer(train_cfg).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      key=k_train)


def state_shardings(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh,
                    rules: sh.LogicalRules = sh.DEFAULT_RULES) -> TrainState:
    """A TrainState of NamedShardings on `mesh`: params by the logical-axis rules
    (`sharding.param_shardings`), every parameter-shaped optimizer leaf (Adam's mu and nu) like
    its parameter (`optax.tree_map_params`), and the scalars (step, Adam's count, key)
    replicated."""
    shapes = jax.eval_shape(_init_state, model_cfg, train_cfg, 0)
    params = sh.param_shardings(shapes.params, mesh, rules)
    rep = sh.replicated(mesh)
    opt_state = optax.tree_map_params(make_optimizer(train_cfg), lambda _, s: s,
                                      shapes.opt_state, params,
                                      transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=params, opt_state=opt_state, key=rep)


@functools.lru_cache(maxsize=16)
def _sharded_init(model_cfg, train_cfg, seed, mesh, rules):
    out = state_shardings(model_cfg, train_cfg, mesh, rules)
    return jax.jit(functools.partial(_init_state, model_cfg, train_cfg, seed), out_shardings=out)


def place_state(state: TrainState, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh,
                rules: sh.LogicalRules = sh.DEFAULT_RULES) -> TrainState:
    """A copy of `state` (e.g. an unsharded one, or one on another mesh) placed on `mesh` by
    `state_shardings`. Single process only (a host value goes onto every device); the copy never
    aliases the input, so donating it is safe (jax.device_put can alias a typed PRNG key's
    buffer even with may_alias=False)."""
    target = state_shardings(model_cfg, train_cfg, mesh, rules)
    leaves = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s),
                          dataclasses.replace(state, key=jax.random.key_data(state.key)),
                          target)
    impl = jax.random.key_impl(state.key)
    return dataclasses.replace(leaves, key=jax.random.wrap_key_data(leaves.key, impl=impl))


def step_orders(train_cfg: TrainConfig, key: jax.Array, step, micro_batch: int, n: int,
                prompt_len: int = 0) -> jax.Array:
    """The orders of one update: int32 [grad_accum, micro_batch, n].

    Row permutations come from one orders.training_orders draw over all grad_accum * micro_batch
    rows, so a row's random order does not depend on how the update is split into micro-batches.
    The curriculum coin (left to right vs random) is drawn once per micro-batch, as published,
    or once per row with per_row_curriculum; P(random) is orders.random_order_probability.
    The fractal policy uses the fractal order for every row. prompt_len is the task's prompt
    length; the prompt is kept first (in index order) only with keep_prompt_first.
    """
    accum = train_cfg.grad_accum
    rows = accum * micro_batch
    keep = prompt_len if train_cfg.keep_prompt_first else 0
    policy, max_steps = train_cfg.order_policy, train_cfg.max_steps
    kind, _ = orders_lib.parse_order_policy(policy)
    if kind == "fractal":
        fractal = orders_lib.training_orders(key, "fractal", step, max_steps, rows, n,
                                             prompt_len=keep)
        return fractal.reshape(accum, micro_batch, n)
    k_perm, k_coin = jax.random.split(key)
    shuffled = orders_lib.training_orders(k_perm, "random", step, max_steps, rows, n,
                                          prompt_len=keep).reshape(accum, micro_batch, n)
    p_random = orders_lib.random_order_probability(policy, step, max_steps)
    if train_cfg.per_row_curriculum:
        coin = jax.random.uniform(k_coin, (rows, 1)).reshape(accum, micro_batch, 1) < p_random
    else:
        coin = jax.random.uniform(k_coin, (accum, 1, 1)) < p_random
    return jnp.where(coin, shuffled, jnp.arange(n, dtype=jnp.int32)[None, None, :])


def loss_and_grads(model_cfg: ModelConfig, train_cfg: TrainConfig, params: dict,
                   batch: jax.Array, key: jax.Array, step, prompt_len: int = 0):
    """Mean loss and gradient over batch int32 [grad_accum * b, N], accumulated by a scan over
    grad_accum micro-batches of b rows (rows [i*b, (i+1)*b) form micro-batch i).

    key is the step key: it is split into the orders key and the dropout key.
    Returns (loss [], grads like params, orders int32 [grad_accum, b, N]).
    """
    accum = train_cfg.grad_accum
    total, n = batch.shape
    if total % accum:
        raise ValueError(f"batch of {total} rows does not split into grad_accum={accum} "
                         "micro-batches")
    # Each micro-batch is split over the batch axes (no-op without a mesh).
    micro = sh.constrain(batch.reshape(accum, total // accum, n), (None, "batch", "seq"))
    k_orders, k_dropout = jax.random.split(key)
    orders = step_orders(train_cfg, k_orders, step, total // accum, n, prompt_len)
    dropout_keys = jax.random.split(k_dropout, accum)
    grad_fn = jax.value_and_grad(loss_fn, argnums=1)

    def accumulate(carry, xs):
        tokens, order, dkey = xs
        loss, grads = grad_fn(model_cfg, params, tokens, order,
                              dkey if model_cfg.dropout > 0 else None)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro, orders, dropout_keys))
    return loss / accum, jax.tree.map(lambda g: g / accum, grads), orders


# TrainConfig fields that do not change the compiled step: they are reset to their defaults in
# the static config handed to jit, so changing them never triggers a recompile.
_NOT_COMPILED = ("task", "data_path", "seq_len", "batch_size", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints", "log_every", "seed")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@functools.lru_cache(maxsize=64)
def _compiled_config(train_cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(train_cfg, **{name: _DEFAULTS[name] for name in _NOT_COMPILED})


def train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, state: TrainState,
               batch: jax.Array, *, prompt_len: int = 0, mesh=None,
               rules: sh.LogicalRules = sh.DEFAULT_RULES) -> tuple[TrainState, dict]:
    """One optimizer update on batch int32 [batch_size * grad_accum, N]: jitted, state donated.

    The orders are drawn inside the step from fold_in(state.key, state.step) (`step_orders`), so
    they are a function of the step alone. Do not reuse the `state` argument after the call.
    prompt_len is the task's prompt length (used only with keep_prompt_first). Returns (new
    state, metrics): loss, grad_norm (before clipping), lr, p_random (scheduled probability of a
    random-order micro-batch), frac_random (rows actually in random order; 0 for fractal).

    mesh: run the step compiled for that mesh (`sharded_train_step`): state sharded by
    `state_shardings` (place it with `init_state(..., mesh=mesh)` or `place_state`), batch rows
    over ("data", "fsdp") (place it with `sharding.place_local_batch`), metrics replicated.
    Call it inside `with jax.set_mesh(mesh):`.
    """
    prompt_len = prompt_len if train_cfg.keep_prompt_first else 0
    if mesh is not None:
        step = sharded_train_step(model_cfg, train_cfg, mesh, prompt_len=prompt_len, rules=rules)
        return step(state, batch)
    return _train_step(model_cfg, _compiled_config(train_cfg), state, batch,
                       prompt_len=prompt_len)


def sharded_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, *,
                       prompt_len: int = 0, rules: sh.LogicalRules = sh.DEFAULT_RULES):
    """The train step compiled for `mesh`: `step(state, batch) -> (state, metrics)`.

    `jax.jit` with in_shardings (state_shardings, batch rows over the batch axes), out_shardings
    (the same state shardings, replicated metrics) and the state donated, so the new state reuses
    the old state's buffers shard by shard. One jitted function per (configs, mesh, rules,
    prompt_len); like `train_step`, fields that do not change the step never recompile it.
    """
    prompt_len = prompt_len if train_cfg.keep_prompt_first else 0
    return _sharded_step(model_cfg, _compiled_config(train_cfg), mesh, rules, prompt_len)


@functools.lru_cache(maxsize=16)
def _sharded_step(model_cfg, train_cfg, mesh, rules, prompt_len):
    state = state_shardings(model_cfg, train_cfg, mesh, rules)
    rows = jax.NamedSharding(mesh, sh.logical_to_spec(("batch",), rules))
    step = functools.partial(_step, model_cfg, train_cfg, prompt_len=prompt_len)
    return jax.jit(step, in_shardings=(state, rows), out_shardings=(state, sh.replicated(mesh)),
                   donate_argnums=0)


def _step(model_cfg: ModelConfig, train_cfg: TrainConfig, state: TrainState,
          batch: jax.Array, *, prompt_len: int) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(state.key, state.step)
    loss, grads, orders = loss_and_grads(model_cfg, train_cfg, state.params, batch, step_key,
                                         state.step, prompt_len)
    updates, opt_state = make_optimizer(train_cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    kind, _ = orders_lib.parse_order_policy(train_cfg.order_policy)
    shuffled = jnp.any(orders != jnp.arange(batch.shape[1])[None, None, :], axis=-1)  # [A, b]
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate(train_cfg, state.step),
        "p_random": orders_lib.random_order_probability(train_cfg.order_policy, state.step,
                                                        train_cfg.max_steps),
        "frac_random": jnp.mean(shuffled) * (kind != "fractal"),
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key)
    return new_state, metrics


_train_step = jax.jit(_step, donate_argnames="state", static_argnames="prompt_len")


# ---------------------------------------------------------------- evaluation


def eval_losses(model_cfg: ModelConfig, train_cfg: TrainConfig, params: dict,
                tokens: jax.Array, key: jax.Array, step, *, prompt_len: int = 0) -> dict:
    """Dropout-free loss of tokens int32 [B, N] in three orders (jitted): the training policy at
    `step` (curriculum mixture included; one coin per batch, or per row as in training), left to
    right, and uniformly random (prompt kept first with keep_prompt_first, as in training)."""
    keep = prompt_len if train_cfg.keep_prompt_first else 0
    return _eval_losses(model_cfg, _compiled_config(train_cfg), params, tokens, key,
                        jnp.asarray(step, jnp.int32), keep=keep)


@functools.partial(jax.jit, static_argnames="keep")
def _eval_losses(model_cfg, train_cfg, params, tokens, key, step, *, keep: int) -> dict:
    b, n = tokens.shape
    k_train, k_random = jax.random.split(key)
    train_order = orders_lib.training_orders(
        k_train, train_cfg.order_policy, step, train_cfg.max_steps, b, n,
        per_row=train_cfg.per_row_curriculum, prompt_len=keep)
    random_order = orders_lib.training_orders(k_random, "random", step, train_cfg.max_steps, b, n,
                                              prompt_len=keep)
    return {
        "val_loss_train_order": loss_fn(model_cfg, params, tokens, train_order),
        "val_loss_left_to_right": loss_fn(model_cfg, params, tokens,
                                          orders_lib.left_to_right(b, n)),
        "val_loss_random": loss_fn(model_cfg, params, tokens, random_order),
    }


def evaluate(model_cfg: ModelConfig, train_cfg: TrainConfig, params: dict, batches,
             key: jax.Array, step: int, *, prompt_len: int = 0, mesh=None,
             rules: sh.LogicalRules = sh.DEFAULT_RULES) -> dict[str, float]:
    """Mean of `eval_losses` over batches int32 [E, B, N] (batch i uses fold_in(key, i)).
    One host sync at the end. Returns {val_loss_train_order, val_loss_left_to_right,
    val_loss_random}: floats.

    mesh: params are sharded on it; each batch (a host array that every process holds in full)
    is placed with its rows over the batch axes, and the keys replicated."""
    step = jnp.asarray(step, jnp.int32)
    if mesh is not None:
        step = sh.place_global(step, sh.replicated(mesh))
    totals = None
    for i, tokens in enumerate(batches):
        tokens, batch_key = np.asarray(tokens, np.int32), jax.random.fold_in(key, i)
        if mesh is None:
            tokens = jnp.asarray(tokens)
        else:
            tokens = sh.place_global(tokens, jax.NamedSharding(
                mesh, sh.batch_spec(tokens.shape, mesh, rules)))
            batch_key = sh.place_global(batch_key, sh.replicated(mesh))
        losses = eval_losses(model_cfg, train_cfg, params, tokens, batch_key, step,
                             prompt_len=prompt_len)
        totals = losses if totals is None else jax.tree.map(jnp.add, totals, losses)
    return {name: float(value) / len(batches) for name, value in totals.items()}


# ---------------------------------------------------------------- the loop


def configs_dict(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """Both configs as JSON-ready dicts: {"model": {...}, "train": {...}}."""
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg)}


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to path via a temporary file and an atomic rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_task(model_cfg: ModelConfig, task) -> None:
    """ValueError unless the model fits the task (vocabulary and sequence length)."""
    if model_cfg.vocab_size < task.vocab_size:
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} is smaller than task "
                         f"{task.name!r} vocabulary {task.vocab_size}")
    if task.seq_len > model_cfg.block_size:
        raise ValueError(f"task {task.name!r} has seq_len {task.seq_len} > model block_size "
                         f"{model_cfg.block_size}; set seq_len or block_size")


def check_workdir(workdir, model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[str]:
    """A workdir holds one model. ValueError if its config.json records a different model
    config; otherwise the names of the train fields that changed since (possibly none)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # unreadable: it is rewritten atomically by `train`
    new = configs_dict(model_cfg, train_cfg)
    if old.get("model") != new["model"]:
        changed = sorted(k for k in new["model"] if old.get("model", {}).get(k)
                         != new["model"][k])
        raise ValueError(f"workdir {workdir} holds a run of a different model ({', '.join(changed)}"
                         " differ); use a new --workdir or the same model settings")
    return sorted(k for k in new["train"] if old.get("train", {}).get(k) != new["train"][k])


def _val_batches(task, train_cfg: TrainConfig) -> np.ndarray:
    """A fixed sample of validation batches, int32 [eval_batches, batch_size, N] (the same sample
    at every evaluation, so evaluations are comparable)."""
    from sigma_jax.data import make_iterator

    it = make_iterator(task, "val", train_cfg.batch_size, train_cfg.seed, process_index=0,
                       process_count=1, shuffle=True, repeat=True, num_threads=0)
    return np.stack([np.asarray(next(it), np.int32) for _ in range(train_cfg.eval_batches)])


def _install_sigterm():
    """Route SIGTERM to a flag (main thread only). Returns (flag dict, restore callable)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None

    def handler(signum, frame):
        flag["signal"] = signum

    previous = signal.signal(signal.SIGTERM, handler)
    return flag, lambda: signal.signal(signal.SIGTERM, previous)


def check_batch_fits(train_cfg: TrainConfig, mesh,
                     rules: sh.LogicalRules = sh.DEFAULT_RULES) -> None:
    """One-line ValueError unless the batch can be split on `mesh`: batch_size (one micro-batch,
    and one evaluation batch) must divide over the batch axes, and the global batch
    (batch_size * grad_accum) over the processes, which each read their share of it."""
    try:
        sh.check_batch(train_cfg.batch_size, mesh, rules)
    except ValueError as error:
        raise ValueError(f"batch_size: {error} (mesh {_mesh_text(mesh)})") from None
    processes = jax.process_count()
    if train_cfg.global_batch % processes:
        raise ValueError(f"batch_size * grad_accum = {train_cfg.global_batch} is not divisible "
                         f"by the {processes} processes; use a multiple of {processes}")


def _mesh_text(mesh) -> str:
    return ":".join(str(mesh.shape.get(a, 1)) for a in sh.MESH_AXES)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, workdir, *, task=None,
          log: Callable[[str], None] = print, mesh=None,
          rules: sh.LogicalRules = sh.DEFAULT_RULES) -> dict:
    """Train (or resume training) in `workdir` up to train_cfg.max_steps. Returns the final
    metrics row (step, loss, val losses, ...), plus 'preempted' and 'resumed_from'.

    Files in workdir: config.json (both configs; atomic), checkpoints/ (orbax; the latest
    keep_checkpoints), metrics.jsonl (one JSON object per logged step), tb/ (TensorBoard, if
    tensorboardX is installed) and loss.png (at the end).

    Resume: an existing checkpoint in workdir is restored (params, optimizer, step, key and data
    iterator) and the run continues as if never interrupted; metric rows past the restored step
    are dropped, since they are recomputed identically. SIGTERM: finish the current step, save a
    checkpoint, wait for it, and return with preempted=True.

    mesh: a `jax.sharding.Mesh` or a `sharding.MeshConfig` (None: unsharded, one device). The
    whole loop then runs under `jax.set_mesh(mesh)`: the state is created sharded
    (`init_state(mesh=...)`), each process's batch becomes one global batch
    (`sharding.place_local_batch`), the step is `sharded_train_step`, and checkpoints restore
    onto the mesh's shardings (so a run saved under one mesh resumes under another).
    Multi-host (after `jax.distributed.initialize()`, every process calling `train` with the
    same arguments): each process reads its own share of every batch, checkpoints are saved
    collectively, and only process 0 logs and writes config.json, metrics and plots; a SIGTERM
    on any process stops all of them at the next logged step (they agree on it collectively).
    """
    from sigma_jax.data import load_task

    if isinstance(mesh, sh.MeshConfig):
        mesh = sh.make_mesh(mesh)
    if mesh is not None:
        check_batch_fits(train_cfg, mesh, rules)
    if task is None:
        task = load_task(train_cfg.task, seq_len=train_cfg.seq_len, data_path=train_cfg.data_path)
    check_task(model_cfg, task)
    with jax.set_mesh(mesh) if mesh is not None else nullcontext():
        return _train_loop(model_cfg, train_cfg, Path(workdir), task, log, mesh, rules)


def _stop_requested(flag, agree: bool) -> bool:
    """Whether to stop now. agree: every process takes part, and all stop if any got a signal."""
    stop = flag["signal"] is not None
    if agree and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
    return stop


def _train_loop(model_cfg, train_cfg, workdir: Path, task, log, mesh, rules) -> dict:
    from sigma_jax import checkpoint
    from sigma_jax.data import make_iterator

    workdir.mkdir(parents=True, exist_ok=True)
    configs = configs_dict(model_cfg, train_cfg)
    configs["task"] = {"name": task.name, "vocab_size": task.vocab_size,
                       "seq_len": task.seq_len, "prompt_len": task.prompt_len}
    primary = jax.process_index() == 0
    if not primary:
        log = lambda line: None  # noqa: E731 (only process 0 reports)
    multi = jax.process_count() > 1
    changed = check_workdir(workdir, model_cfg, train_cfg)
    if changed:
        log(f"note: train settings changed since the last run in {workdir}: {', '.join(changed)}")
    if primary:
        write_json_atomic(workdir / "config.json", configs)

    state = init_state(model_cfg, train_cfg, mesh=mesh, rules=rules)
    data_iter = make_iterator(task, "train", train_cfg.global_batch, train_cfg.seed)
    val_batches = _val_batches(task, train_cfg)
    eval_key = jax.random.fold_in(jax.random.key(train_cfg.seed), EVAL_STREAM)
    prompt_len = task.prompt_len
    tokens_per_step = train_cfg.global_batch * task.seq_len

    manager = checkpoint.CheckpointManager(workdir, every=train_cfg.checkpoint_every,
                                           keep=train_cfg.keep_checkpoints)
    flag, restore_handler = _install_sigterm()
    writer = None
    try:
        state, resumed_from = manager.restore_latest(state, data_iter)
        step = start_step = int(state.step)
        writer = metrics_log.MetricsWriter(workdir, start_step=step, enabled=primary)
        if resumed_from is not None:
            log(f"resumed from step {resumed_from} in {workdir}")
        last = {"step": step}
        saved_step, stopped = resumed_from, False
        t_start = t_mark = time.perf_counter()
        interval = []  # device metrics of the steps since the last row
        while step < train_cfg.max_steps:
            batch = next(data_iter)
            if mesh is not None:  # this process's rows -> one global batch
                batch = sh.place_local_batch(batch, mesh, rules)
            state, metrics = train_step(model_cfg, train_cfg, state, batch, prompt_len=prompt_len,
                                        mesh=mesh, rules=rules)
            step += 1
            interval.append(metrics)
            first = step == start_step + 1
            done = step == train_cfg.max_steps
            row_due = first or step % train_cfg.log_every == 0
            # Multi-host: processes agree on stopping at logged steps only (one tiny collective).
            stop = _stop_requested(flag, agree=row_due) if multi else flag["signal"] is not None
            eval_due = done or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
            if row_due or eval_due or stop:
                host = sh.to_host(interval)  # the host sync of this interval
                seconds = time.perf_counter() - t_mark
                row = {"step": step, **{k: float(v) for k, v in host[-1].items()},
                       "loss_avg": float(np.mean([h["loss"] for h in host]))}
                if first:  # this interval is dominated by compilation: no throughput
                    row["compile_s"] = seconds
                else:
                    row["tokens_per_s"] = len(host) * tokens_per_step / max(seconds, 1e-9)
                    row["eta_s"] = (train_cfg.max_steps - step) * seconds / len(host)
                row["elapsed_s"] = time.perf_counter() - t_start
                if eval_due:
                    row.update(evaluate(model_cfg, train_cfg, state.params, val_batches,
                                        eval_key, step, prompt_len=prompt_len, mesh=mesh,
                                        rules=rules))
                writer.write(row)
                log(metrics_log.progress_line(row, train_cfg.max_steps))
                last = row
                t_mark, interval = time.perf_counter(), []
            if done or stop or manager.should_save(step):
                t_save = time.perf_counter()
                manager.save(step, state, data_iter=data_iter, configs=configs)
                saved_step = step
                t_mark += time.perf_counter() - t_save  # keep the blocking save out of tokens/s
            if stop:
                stopped = True
                got = flag["signal"] if flag["signal"] is not None else "on another process"
                log(f"signal {got} at step {step}: checkpoint saved; exiting")
                break
        if step == start_step:  # nothing to train: report the evaluation of the checkpoint
            last = {"step": step, **evaluate(model_cfg, train_cfg, state.params, val_batches,
                                             eval_key, step, prompt_len=prompt_len, mesh=mesh,
                                             rules=rules)}
        elif saved_step != step:
            manager.save(step, state, data_iter=data_iter, configs=configs)
        manager.wait()
    finally:
        restore_handler()
        manager.close()
        if writer is not None:
            writer.close()
    if primary:
        metrics_log.plot_losses(metrics_log.read_metrics(workdir / "metrics.jsonl"),
                                workdir / "loss.png")
    return {**last, "step": step, "preempted": stopped or flag["signal"] is not None,
            "resumed_from": resumed_from}
