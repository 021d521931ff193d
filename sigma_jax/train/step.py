"""The training step: loss, optimiser, train state, the compiled step and evaluation.

Every function is pure, a function of (configs, arrays, keys):

- `loss_fn`: mean cross-entropy of a batch read in given orders (the order really reaches the loss).
- `learning_rate` / `make_optimizer`: linear warmup + cosine decay to `min_lr` at `max_steps`;
  AdamW with global-norm clipping and weight decay on dense kernels only.
- `TrainState`, `init_state`, `make_train_step` / `train_step`: orders are drawn inside the step
  from `fold_in(state.key, state.step)`, so a resumed run draws the orders of an uninterrupted one.
- `eval_losses` / `evaluate`: validation loss in the training order, left to right, and random.

There is one compiled step, on a ("data", "fsdp", "tensor") mesh: the caller's, or a 1x1x1 mesh
on one device (`sharding.local_mesh`) when none is given. `state_shardings` says where every
leaf of the state lives.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sigma_jax import orders as orders_lib
from sigma_jax.checks import check_id_range, integer_array, largest_divisor
from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.model import forward, init_params
from sigma_jax.param_sharding import param_shardings
from sigma_jax.sharding import (
    as_mesh,
    auto_axes_call,
    batch_rows,
    constrain,
    fitted_sharding,
    place_global,
    replicated,
)

EVAL_STREAM = 0x5EED  # fold_in tag of the evaluation key stream (kept apart from training keys)


# ---------------------------------------------------------------- loss


def checked_batch(model_cfg: ModelConfig, tokens, name: str = "batch"):
    """`tokens` (lists accepted) after the one-line checks of a training or evaluation batch:
    integer [B, N] with B >= 1 and 1 <= N <= block_size (N >= 2 without a start token, where the
    first token of each order is conditioning only and nothing would be predicted at N = 1); for
    concrete values, token ids in [0, vocab_size). Returned as given (a list as a numpy array)."""
    tokens = integer_array(tokens, name, "token ids")
    shape, shortest = tuple(np.shape(tokens)), 1 if model_cfg.bos else 2
    if len(shape) != 2 or shape[0] < 1 or not shortest <= shape[1] <= model_cfg.block_size:
        why = "" if model_cfg.bos else " (bos=False: the first token is conditioning only)"
        raise ValueError(f"{name} must be [B, N] with B >= 1 and {shortest} <= N <= block_size "
                         f"{model_cfg.block_size}{why}; got shape {shape}")
    check_id_range(tokens, model_cfg.vocab_size, name)
    return tokens


def loss_fn(model_cfg: ModelConfig, params: dict, tokens: jax.Array, order: jax.Array,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of every target when each row of tokens int32 [B, N] is read in the
    order int32 [B, N] (orders.make_batch: with model_cfg.bos all N tokens are targets; without,
    the first token of each order is conditioning only and N - 1 are). Returns float32 [].
    Bad tokens (`checked_batch`) or an order not integer [B, N] like them raise a one-line
    ValueError before any work."""
    tokens = checked_batch(model_cfg, tokens, "tokens")
    order = integer_array(order, "order")
    if np.shape(order) != np.shape(tokens):
        raise ValueError(f"order must be [B, N] like tokens {tuple(np.shape(tokens))}; got "
                         f"shape {tuple(np.shape(order))}")
    # Under an Explicit mesh the batch construction and the loss run with Auto axes (the gathers
    # of make_batch and of the cross-entropy take no out_sharding); elsewhere this is a plain call.
    return auto_axes_call(functools.partial(_mean_loss, model_cfg), (), params, tokens, order,
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


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, *, mesh=None) -> TrainState:
    """Fresh parameters and optimizer state; everything derives from train_cfg.seed.

    The state is created by one jitted call whose outputs are already sharded by
    `state_shardings` on `mesh` (a jax.sharding.Mesh or a `sharding.MeshConfig`; default:
    `sharding.local_mesh()`, one device; anything else: one-line ValueError): each device
    computes only its own shards, no host ever holds the whole model, and every process of a
    multi-host run gets the same global state.
    """
    mesh = as_mesh(mesh)
    return _sharded_init(model_cfg, _compiled_config(train_cfg), train_cfg.seed, mesh)()


def _init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, seed) -> TrainState:
    k_params, k_train = jax.random.split(jax.random.key(seed))
    params = init_params(model_cfg, k_params)
    opt_state = make_optimizer(train_cfg).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      key=k_train)


def state_shardings(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh) -> TrainState:
    """A TrainState of NamedShardings on `mesh`: params by their logical axes
    (`param_shardings`), every parameter-shaped optimizer leaf (Adam's mu and nu) like its
    parameter (`optax.tree_map_params`), and the scalars (step, Adam's count, key) replicated."""
    shapes = jax.eval_shape(_init_state, model_cfg, train_cfg, 0)
    params = param_shardings(shapes.params, mesh)
    rep = replicated(mesh)
    opt_state = optax.tree_map_params(make_optimizer(train_cfg), lambda _, s: s,
                                      shapes.opt_state, params,
                                      transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=params, opt_state=opt_state, key=rep)


@functools.lru_cache(maxsize=16)
def _sharded_init(model_cfg, train_cfg, seed, mesh):
    out = state_shardings(model_cfg, train_cfg, mesh)
    return jax.jit(functools.partial(_init_state, model_cfg, train_cfg, seed), out_shardings=out)


def place_state(state: TrainState, model_cfg: ModelConfig, train_cfg: TrainConfig,
                mesh) -> TrainState:
    """A copy of `state` (e.g. one from another mesh) placed on `mesh` by `state_shardings`.
    Single process only (a host value goes onto every device); the copy never aliases the
    input, so donating it is safe (jax.device_put can alias a typed PRNG key's buffer even with
    may_alias=False)."""
    target = state_shardings(model_cfg, train_cfg, mesh)
    leaves = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s),
                          dataclasses.replace(state, key=jax.random.key_data(state.key)),
                          target)
    impl = jax.random.key_impl(state.key)
    return dataclasses.replace(leaves, key=jax.random.wrap_key_data(leaves.key, impl=impl))


def step_orders(train_cfg: TrainConfig, key: jax.Array, step, micro_batch: int, n: int,
                prompt_len: int = 0) -> jax.Array:
    """The orders of one update: int32 [grad_accum, micro_batch, n], one
    `orders.training_orders` draw over all grad_accum * micro_batch rows (so a row's random order
    does not depend on how the update is split into micro-batches), with the curriculum coin
    drawn once per micro-batch, as published, or once per row with per_row_curriculum.
    prompt_len is the task's prompt length; the prompt is kept first (in index order) only with
    keep_prompt_first."""
    accum = train_cfg.grad_accum
    rows = accum * micro_batch
    drawn = orders_lib.training_orders(
        key, train_cfg.order_policy, step, train_cfg.max_steps, rows, n,
        coins=rows if train_cfg.per_row_curriculum else accum,
        prompt_len=prompt_len if train_cfg.keep_prompt_first else 0)
    return drawn.reshape(accum, micro_batch, n)


def loss_and_grads(model_cfg: ModelConfig, train_cfg: TrainConfig, params: dict,
                   batch: jax.Array, key: jax.Array, step, prompt_len: int = 0, *,
                   chunk: int | None = None, lanes: int = 1):
    """Mean loss and gradient over batch int32 [grad_accum * b, N], accumulated by a scan over
    grad_accum micro-batches of b rows (rows [i*b, (i+1)*b) form micro-batch i).

    key is the step key: it is split into the orders key and the dropout key. chunk (rows, a
    divisor of b; None = b) splits each micro-batch further into equal chunks whose gradients
    the same scan sums: the same loss and gradient up to float rounding, with the activations
    of one chunk alive at a time (`rows_per_chunk`). A chunk's dropout key is its micro-batch's
    key folded with the chunk index (the micro-batch's own key when unsplit).
    lanes (a divisor of the chunk) splits each chunk into equal groups of rows whose losses are
    computed side by side, each independent of the others in the compiled program, the chunk's
    loss being their mean: again the same loss and gradient up to float rounding
    (`lanes_per_chunk`). With dropout, lane i's key is its chunk's key folded with i (the chunk's
    own key with one lane).
    Returns (loss [], grads like params, orders int32 [grad_accum, b, N]).
    """
    accum = train_cfg.grad_accum
    total, n = batch.shape
    if total % accum:
        raise ValueError(f"batch of {total} rows does not split into grad_accum={accum} "
                         "micro-batches")
    b = total // accum
    chunk = b if chunk is None else chunk
    if b % chunk:
        raise ValueError(f"micro-batch of {b} rows does not split into chunks of {chunk}")
    if chunk % lanes:
        raise ValueError(f"chunk of {chunk} rows does not split into {lanes} lanes")
    parts = accum * (b // chunk)
    k_orders, k_dropout = jax.random.split(key)
    orders = step_orders(train_cfg, k_orders, step, b, n, prompt_len)
    dropout_keys = jax.random.split(k_dropout, accum)
    if chunk < b:
        dropout_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(
            jnp.arange(b // chunk)))(dropout_keys).reshape(parts)
    # Each chunk is split over the batch axes (no-op without a mesh).
    tokens = constrain(batch.reshape(parts, chunk, n), (None, "batch", "seq"))

    def chunk_loss(params, tokens, order, dkey):
        if lanes == 1:
            return loss_fn(model_cfg, params, tokens, order, dkey)
        rows = chunk // lanes
        lane = lambda a, i: a[i * rows:(i + 1) * rows]
        lane_key = lambda i: None if dkey is None else jax.random.fold_in(dkey, i)
        return sum(loss_fn(model_cfg, params, lane(tokens, i), lane(order, i), lane_key(i))
                   for i in range(lanes)) / lanes

    grad_fn = jax.value_and_grad(chunk_loss)

    def accumulate(carry, xs):
        tokens, order, dkey = xs
        loss, grads = grad_fn(params, tokens, order, dkey if model_cfg.dropout > 0 else None)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    xs = (tokens, orders.reshape(parts, chunk, n), dropout_keys)
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, xs)
    return loss / parts, jax.tree.map(lambda g: g / parts, grads), orders


# Tokens per gradient chunk of the compiled step on a single CPU device (`rows_per_chunk`).
CPU_CHUNK_TOKENS = 2048
# Independent lanes per gradient chunk of the compiled step on a single CPU device
# (`lanes_per_chunk`).
CPU_LANES = 2


def rows_per_chunk(micro_batch: int, n: int, mesh) -> int:
    """Rows per gradient chunk (`loss_and_grads`) of the compiled step on `mesh`.

    On one CPU device: the largest divisor of micro_batch with at most CPU_CHUNK_TOKENS tokens
    (at least one row). XLA's CPU runtime allocates a step's temporaries afresh at every call,
    so every page of them is faulted in again at every step; smaller chunks keep that arena
    small (at the reference size, 4 layers x 128 x 256 tokens x 32 rows, one chunk of 32 rows
    needs 0.9 GB and costs over half the step). Elsewhere (accelerators, several devices, where
    the rows are split over devices): the whole micro-batch.
    """
    if mesh.devices.size > 1 or mesh.devices.flat[0].platform != "cpu":
        return micro_batch
    most = max(1, CPU_CHUNK_TOKENS // max(n, 1))
    return largest_divisor(micro_batch, most)


def lanes_per_chunk(chunk: int, mesh) -> int:
    """Independent lanes per gradient chunk (`loss_and_grads`) of the compiled step on `mesh`.

    On one CPU device: the largest divisor of chunk up to CPU_LANES. XLA's CPU runtime runs
    independent operations concurrently but splits few of a layer's small ones (the attention
    blocks, the elementwise layers) over its threads, so one lane leaves cores idle that a
    second, independent lane fills (at the reference size on 2 cores, 2 lanes: ~10% faster
    steps; 4 lanes: no faster than 2). Elsewhere: 1.
    """
    if mesh.devices.size > 1 or mesh.devices.flat[0].platform != "cpu":
        return 1
    return largest_divisor(chunk, CPU_LANES)


# TrainConfig fields that do not change the compiled step: they are reset to their defaults in
# the static config handed to jit, so changing them never triggers a recompile.
_NOT_COMPILED = ("task", "data_path", "seq_len", "batch_size", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints", "log_every", "seed")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@functools.lru_cache(maxsize=64)
def _compiled_config(train_cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(train_cfg, **{name: _DEFAULTS[name] for name in _NOT_COMPILED})


def train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, state: TrainState,
               batch: jax.Array, *, prompt_len: int = 0, mesh=None) -> tuple[TrainState, dict]:
    """One optimizer update on batch int32 [batch_size * grad_accum, N]: `make_train_step`'s
    compiled step for `mesh` (default: `sharding.local_mesh()`), called once. Do not reuse the
    `state` argument after the call: it is donated.

    The orders are drawn inside the step from fold_in(state.key, state.step) (`step_orders`), so
    they are a function of the step alone. prompt_len is the task's prompt length (used only
    with keep_prompt_first). A bad batch raises a one-line ValueError before the step runs, the
    state kept (`make_train_step`). Returns (new state, metrics): loss, grad_norm (before clipping),
    lr, p_random (scheduled probability of a random-order micro-batch), frac_random (rows
    actually in random order; 0 for fractal).
    """
    return make_train_step(model_cfg, train_cfg, mesh, prompt_len=prompt_len)(state, batch)


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh=None, *,
                    prompt_len: int = 0):
    """The compiled train step on `mesh` (default: `sharding.local_mesh()`, one device):
    `step(state, batch) -> (state, metrics)`, the one step that every caller trains with.

    `jax.jit` with in_shardings (state by `state_shardings`, batch rows over the batch axes),
    out_shardings (the same state shardings, replicated metrics) and the state donated, so the
    new state reuses the old state's buffers shard by shard. A call first checks the batch
    (`checked_batch`: shape and dtype, and the ids of a concrete batch, on each process its own
    rows) and raises a one-line ValueError before the step runs, so a bad batch leaves the state
    undonated; `lower` and `trace` are the jitted function's, checking the batch's shape.
    Place the state with `init_state` or `place_state` and the batch with
    `sharding.place_local_batch`; on a mesh of several devices call it inside
    `with jax.set_mesh(mesh):`, so the model's `constrain` hints apply.
    One jitted function per (configs, mesh, prompt_len); TrainConfig fields that do not change
    the step (data, logging, checkpointing, seed) never recompile it.
    """
    mesh = as_mesh(mesh)
    prompt_len = prompt_len if train_cfg.keep_prompt_first else 0
    return _compiled_step(model_cfg, _compiled_config(train_cfg), mesh, prompt_len)


@functools.lru_cache(maxsize=16)
def _compiled_step(model_cfg, train_cfg, mesh, prompt_len):
    state = state_shardings(model_cfg, train_cfg, mesh)
    step = functools.partial(_step, model_cfg, train_cfg, prompt_len=prompt_len, mesh=mesh)
    return _CheckedStep(model_cfg, jax.jit(step, in_shardings=(state, batch_rows(mesh)),
                                           out_shardings=(state, replicated(mesh)),
                                           donate_argnums=0))


class _CheckedStep:
    """A jitted step(state, batch) whose calls check the batch first (`checked_batch`).
    `unchecked` is the jitted step itself, for callers whose batches are already checked on the
    host (the training loop: checking a placed batch would read it back from the devices at
    every step); every other attribute (lower, trace, ...) is the jitted function's."""

    def __init__(self, model_cfg: ModelConfig, unchecked):
        self._model_cfg, self.unchecked = model_cfg, unchecked

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        return self.unchecked(state, checked_batch(self._model_cfg, batch))

    def __getattr__(self, name: str):
        if name == "unchecked":  # not yet set (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.unchecked, name)


def _step(model_cfg: ModelConfig, train_cfg: TrainConfig, state: TrainState,
          batch: jax.Array, *, prompt_len: int, mesh) -> tuple[TrainState, dict]:
    checked_batch(model_cfg, batch)  # the shape, when traced (lower, trace)
    step_key = jax.random.fold_in(state.key, state.step)
    chunk = rows_per_chunk(batch.shape[0] // train_cfg.grad_accum, batch.shape[1], mesh)
    loss, grads, orders = loss_and_grads(model_cfg, train_cfg, state.params, batch, step_key,
                                         state.step, prompt_len, chunk=chunk,
                                         lanes=lanes_per_chunk(chunk, mesh))
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



# ---------------------------------------------------------------- evaluation


def eval_losses(model_cfg: ModelConfig, train_cfg: TrainConfig, params: dict,
                tokens: jax.Array, key: jax.Array, step, *, prompt_len: int = 0) -> dict:
    """Dropout-free loss of tokens int32 [B, N] in three orders (jitted): the training policy at
    `step` (curriculum mixture included; one coin per batch, or per row as in training), left to
    right, and uniformly random (prompt kept first with keep_prompt_first, as in training).
    Bad tokens raise a one-line ValueError before any work (`checked_batch`)."""
    tokens = checked_batch(model_cfg, tokens, "tokens")
    keep = prompt_len if train_cfg.keep_prompt_first else 0
    return _eval_losses(model_cfg, _compiled_config(train_cfg), params, tokens, key,
                        jnp.asarray(step, jnp.int32), keep=keep)


@functools.partial(jax.jit, static_argnames="keep")
def _eval_losses(model_cfg, train_cfg, params, tokens, key, step, *, keep: int) -> dict:
    b, n = tokens.shape
    k_train, k_random = jax.random.split(key)
    train_order = orders_lib.training_orders(
        k_train, train_cfg.order_policy, step, train_cfg.max_steps, b, n,
        coins=b if train_cfg.per_row_curriculum else 1, prompt_len=keep)
    random_order = orders_lib.training_orders(k_random, "random", step, train_cfg.max_steps, b, n,
                                              prompt_len=keep)
    return {
        "val_loss_train_order": loss_fn(model_cfg, params, tokens, train_order),
        "val_loss_left_to_right": loss_fn(model_cfg, params, tokens,
                                          orders_lib.left_to_right(b, n)),
        "val_loss_random": loss_fn(model_cfg, params, tokens, random_order),
    }


def evaluate(model_cfg: ModelConfig, train_cfg: TrainConfig, params: dict, batches,
             key: jax.Array, step: int, *, prompt_len: int = 0, mesh=None) -> dict[str, float]:
    """Mean of `eval_losses` over batches int32 [E, B, N] (batch i uses fold_in(key, i)).
    One host sync at the end. Returns {val_loss_train_order, val_loss_left_to_right,
    val_loss_random}: floats. No batches, or a bad one (`checked_batch`), raise a one-line
    ValueError before any work.

    mesh (default: `sharding.local_mesh()`): params are sharded on it; each batch (a host array
    that every process holds in full) is placed with its rows over the batch axes, and the keys
    replicated."""
    batches = [checked_batch(model_cfg, tokens, f"batches[{i}]")
               for i, tokens in enumerate(batches)]
    if not batches:
        raise ValueError("batches must hold at least one batch [B, N]; got none")
    mesh = as_mesh(mesh)
    step = place_global(jnp.asarray(step, jnp.int32), replicated(mesh))
    totals = None
    for i, tokens in enumerate(batches):
        tokens = np.asarray(tokens, np.int32)
        tokens = place_global(tokens, fitted_sharding(mesh, ("batch",), tokens.shape))
        batch_key = place_global(jax.random.fold_in(key, i), replicated(mesh))
        losses = eval_losses(model_cfg, train_cfg, params, tokens, batch_key, step,
                             prompt_len=prompt_len)
        totals = losses if totals is None else jax.tree.map(jnp.add, totals, losses)
    return {name: float(value) / len(batches) for name, value in totals.items()}
