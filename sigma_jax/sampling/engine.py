"""A step-wise sampler engine over one state pytree: fixed slots, continuous batching.

    state = init(cfg, options, slots, capacity)
    state = insert(cfg, params, state, slot, tokens, known, length, key)   # slot is traced
    state = step(cfg, params, state)                                       # donated
    finished(state) -> bool [S];  result(state, slot) -> (tokens [N], SampleStats of one row)

Every slot holds one request of up to `capacity` positions (its length may be shorter: the
positions past it are absent). A step runs one iteration of the sampler for every slot that is
still generating; finished, empty and capped slots are no-ops. A request's tokens are bitwise
those of `sample_ar` / `sample_burst` called alone on it with the same key and options: its
order, prefill, per-row key streams (folded with the row's own iteration or cursor, never a
global step) and per-row kernels are the one-shot sampler's, whatever slot it lands in, when it
is inserted, and who shares the batch. `max_iters` caps each request's own iterations.

An engine state serves one model: pass the same params to every insert and step (its caches,
and in jacobi mode the first distributions it keeps for requests with no known token, come from
them).

Samplers: ar (cached), burst, burst_jacobi and burst_paper (not ar_nocache, the oracle).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.cache import init_cache, split_layers
from sigma_jax.checks import (
    bool_mask,
    check_int,
    check_key,
    check_scalar_int,
    is_concrete,
    short_repr,
    token_ids,
    within_lengths,
)
from sigma_jax.config import ModelConfig
from sigma_jax.decode import extend_pass
from sigma_jax.model import check_params, per_layer
from sigma_jax.sampling.burst import advance, start_state
from sigma_jax.sampling.burst_steps import BurstState
from sigma_jax.sampling.call import SampleStats
from sigma_jax.sampling.draws import draw, to_probs
from sigma_jax.sampling.inputs import generation_order
from sigma_jax.sampling.options import KernelOptions, SampleOptions, check_options, model_calls
from sigma_jax.sharding import check_batch, check_mesh, fitted_sharding, replicated


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("rows", "known", "temperature", "top_p", "max_iters",
                                "start_first"),
                   meta_fields=("opts", "order_kind", "known_order"))
@dataclasses.dataclass(frozen=True)
class EngineState:
    """The engine's state: S slots of capacity N. `rows.lengths` is each request's length, 0
    for an empty slot; a step runs the capped slots with length 0 (a row of length 0 is a no-op
    of every sampler step)."""

    rows: BurstState  # [S, ...]: tokens, filled, order, cache, keys, iterations, lengths, ...
    known: jax.Array  # bool [S, N]: each request's known positions
    temperature: jax.Array  # float32 []
    top_p: jax.Array | None  # float32 [] or None (no nucleus truncation)
    max_iters: jax.Array  # int32 []: iterations a request may run
    start_first: tuple | None  # jacobi with a start token: (ids int32 [N, K], probs float32
    #   [N, K], ready bool []): the truncated first distributions given the start token alone
    #   (of a request with no known token, or of every request with first_drafts='start'),
    #   kept from the first such insert (ready) for every later one; None otherwise
    opts: KernelOptions  # static: mode, window, n_orders, top_k
    order_kind: str  # static: the generation order of every request
    known_order: str  # static: how order 'random' feeds the known tokens

    @property
    def slots(self) -> int:
        return self.known.shape[0]

    @property
    def capacity(self) -> int:
        return self.known.shape[1]


def init(cfg: ModelConfig, options: SampleOptions, slots: int, capacity: int, *,
         mesh=None) -> EngineState:
    """An engine with every slot empty. options: any sampler but 'ar_nocache' (checked against
    the model and `capacity`: window <= capacity, top_k <= V); slots >= 1; capacity in
    [1, block_size]. mesh: a `jax.sharding.Mesh` whose batch axes ("data", "fsdp") shard the
    slots (slots must divide over them; every other function then runs sharded, following its
    inputs); None: one device. One-line ValueErrors before any work (`check_init`)."""
    slots, capacity = check_init(cfg, options, slots, capacity)
    if mesh is not None:
        check_mesh(mesh, allowed="a jax.sharding.Mesh or None")
        check_batch(slots, mesh)
    opts = options.kernel_options(capacity)
    temperature, top_p, max_iters = options.traced_values(capacity)
    state = _empty(cfg, opts, slots, capacity, temperature, top_p, max_iters, options.order,
                   options.known_order)
    return state if mesh is None else jax.device_put(state, state_shardings(state, mesh))


def check_init(cfg: ModelConfig, options: SampleOptions, slots, capacity) -> tuple[int, int]:
    """(slots, capacity) as Python ints after `init`'s one-line ValueErrors: options a
    SampleOptions of any sampler but 'ar_nocache', fit for the model at `capacity`; slots and
    capacity integers (numpy integers accepted, bools not), slots >= 1, capacity in
    [1, block_size]."""
    check_options(options)
    if options.sampler == "ar_nocache":
        raise ValueError("the engine runs ar, burst, burst_jacobi or burst_paper; ar_nocache is "
                         "the uncached oracle: use sample_ar(use_cache=False)")
    slots = check_int("slots", slots, 1)
    capacity = check_int("capacity", capacity, 1, cfg.block_size)
    options.check_for(cfg, capacity)
    return slots, capacity


def state_shardings(state: EngineState, mesh):
    """NamedShardings of every leaf of an engine state: slots over the mesh's batch axes (axis
    1 of the pending K/V blocks [L, S, W, H, hd], axis 0 of every other slot leaf), scalars and
    `start_first` replicated."""
    def spec(x):
        if x.ndim == 0:
            return replicated(mesh)
        axis = 1 if x.ndim == 5 else 0
        names = [None] * x.ndim
        names[axis] = "batch"
        return fitted_sharding(mesh, names, x.shape)
    everywhere = jax.tree.map(lambda x: replicated(mesh), state.start_first)
    return dataclasses.replace(jax.tree.map(spec, state), start_first=everywhere)


@functools.partial(jax.jit, static_argnames=("opts", "slots", "capacity", "order_kind",
                                             "known_order"))
def _empty(cfg, opts, slots, capacity, temperature, top_p, max_iters, order_kind, known_order):
    s, n = slots, capacity
    zeros = jnp.zeros((s, n), jnp.int32)
    cache = split_layers(init_cache(cfg, s, opts.cache_capacity(cfg, n)))
    rows = BurstState(
        tokens=zeros, filled=jnp.ones((s, n), bool),
        order=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (s, n)),
        cache=cache, pending=cache.no_entries(opts.window),
        last_tok=zeros[:, 0], last_pos=zeros[:, 0], keys=jax.random.split(jax.random.key(0), s),
        iterations=zeros[:, 0], step=jnp.zeros((), jnp.int32), lengths=zeros[:, 0],
        **(_jacobi_rows(cfg, opts, s, n) if opts.mode == "jacobi" else {}))
    start_first = None
    if opts.mode == "jacobi" and cfg.bos:
        k = opts.first_support(cfg)
        start_first = (jnp.zeros((n, k), jnp.int32), jnp.zeros((n, k), jnp.float32),
                       jnp.zeros((), bool))
    return EngineState(rows=rows, known=jnp.zeros((s, n), bool), temperature=temperature,
                       top_p=top_p, max_iters=max_iters, start_first=start_first, opts=opts,
                       order_kind=order_kind, known_order=known_order)


def _jacobi_rows(cfg: ModelConfig, opts: KernelOptions, s: int, n: int) -> dict:
    """The jacobi leaves of S empty rows at capacity N (see `BurstState`)."""
    k = opts.first_support(cfg)
    return dict(drafts=jnp.zeros((s, n), jnp.int32),
                window_probs=jnp.zeros((s, opts.window, cfg.vocab_size), jnp.float32),
                first_ids=jnp.zeros((s, n, k), jnp.int32),
                first_probs=jnp.zeros((s, n, k), jnp.float32))


def insert(cfg: ModelConfig, params: dict, state: EngineState, slot, tokens, known, length,
           key) -> EngineState:
    """`_insert` after the one-line checks of the request (`check_request`) and of the slot
    (not a scalar, or a concrete slot outside [0, S), is a ValueError; a traced one would be
    clamped) and of the state (`check_state`)."""
    check_state(state)
    check_params(cfg, params)
    check_request(cfg, state.capacity, tokens, known, length, key)
    _check_slot(state, slot)
    return _insert(cfg, params, state, slot, token_ids(tokens), jnp.asarray(known), length, key)


def check_request(cfg: ModelConfig, capacity: int, tokens, known, length, key) -> None:
    """One-line ValueErrors for a request padded to an engine's capacity N: tokens and known
    not [N], non-integer ids, a length not a scalar or outside [1, N], known token ids outside
    [0, V), no known token without a start token, or a key that is not one typed PRNG key
    (values are checked when concrete; under tracing only shapes are)."""
    n = capacity
    tokens, known = token_ids(tokens), bool_mask(known)
    if tokens.shape != (n,) or known.shape != (n,):
        raise ValueError(f"tokens and known must both be [N] = [{n}] (the engine's capacity); "
                         f"got {tuple(tokens.shape)} and {tuple(known.shape)}")
    check_scalar_int("length", length, 1, n)
    check_key(key)
    if is_concrete(tokens, known, length):
        present = np.asarray(known, bool) & (np.arange(n) < int(np.asarray(length)))
        ids = np.asarray(tokens)[present]
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        if not cfg.bos and not present.any():
            raise ValueError("without a start token (bos=False) a request needs >= 1 known "
                             "token")


def check_state(state) -> None:
    """One-line ValueError unless `state` is an `EngineState` with every buffer alive: `step`,
    `insert` and `release` donate the state they are given (its buffers are deleted; the
    state they return replaces it). Tracers are not checked (nothing to read under jit)."""
    if not isinstance(state, EngineState):
        raise ValueError(f"state must be an engine state (engine.init); got {short_repr(state)}")
    leaves = jax.tree.leaves(state)
    if is_concrete(*leaves) and any(leaf.is_deleted() for leaf in leaves
                                    if isinstance(leaf, jax.Array)):
        raise ValueError("this engine state was donated to an earlier step, insert or release "
                         "and its buffers are deleted: use the state that call returned")


def _check_slot(state: EngineState, slot) -> None:
    """One-line ValueError for a slot that is not a scalar, or a concrete one outside [0, S) (a
    traced slot would be clamped)."""
    check_scalar_int("slot", slot, 0, state.slots - 1)


@functools.partial(jax.jit, donate_argnames="state")
def _insert(cfg: ModelConfig, params: dict, state: EngineState, slot, tokens, known, length,
            key) -> EngineState:
    """Start a request in `slot` (traced int32 []): tokens int32 [N] and known bool [N] at the
    engine's capacity N (values past `length` ignored), length int32 [] in [1, N], key: the
    request's typed key (its per-row key: `sample_burst(key=key[None])` samples the same).
    The slot's previous request, if any, is dropped. Its order is drawn, its known tokens
    prefilled (only as many prefill passes as they need) and
    (jacobi) its first drafts drawn, exactly as the one-shot sampler does; a request drafted
    from the start history alone (no known token, or first_drafts='start') takes its first
    distributions from `start_first` once an earlier one computed them (the same values: they
    depend on the params and the sampling values only).
    Compiles once per engine shape; validate the request first (`check_request`)."""
    n = state.capacity
    length = jnp.asarray(length, jnp.int32)[None]  # [1]
    known = jnp.asarray(known, bool)[None] & within_lengths(length, n)  # [1, N]
    tokens = jnp.where(known, jnp.asarray(tokens, jnp.int32)[None], 0)
    order, keys = generation_order(state.order_kind, known, key[None], state.known_order, length)
    first, start_first = None, state.start_first
    if start_first is not None:  # which requests draft from the start history alone
        ids, probs, ready = start_first
        shares = jnp.asarray(state.opts.first_drafts == "start") | ~jnp.any(known)
        first = (ids, probs, shares & ready)
    row = start_state(cfg, params, keys, tokens, known, order, length, state.temperature,
                      state.top_p, state.opts, first)
    if start_first is not None:
        keep = shares & ~ready  # the first such request: keep its own
        start_first = (jnp.where(keep, row.first_ids[0], ids),
                       jnp.where(keep, row.first_probs[0], probs), ready | shares)
    rows = jax.tree.map(_put_row(slot), state.rows, row)
    known = jax.lax.dynamic_update_slice_in_dim(state.known, known, slot, 0)
    return dataclasses.replace(state, rows=rows, known=known, start_first=start_first)


def _put_row(slot):
    """Write a one-row leaf into the full leaf at `slot`: along axis 1 for the pending K/V
    blocks [L, B, W, H, hd], axis 0 for every other row leaf; the loop's step counter (a
    scalar) stays the engine's."""
    def put(full, one):
        if full.ndim == 0:
            return full
        return jax.lax.dynamic_update_slice_in_dim(full, one, slot, 1 if full.ndim == 5 else 0)
    return put


def step(cfg: ModelConfig, params: dict, state: EngineState, iterations: int = 1
         ) -> EngineState:
    """`iterations` sampler iterations for every slot still generating (a no-op for the others):
    AR one token per slot, burst one draft-and-verify round (or one jacobi verify). iterations:
    a Python or numpy integer >= 1 (static: each value compiles once; anything else is a
    one-line ValueError). The state is donated (`check_state`)."""
    check_state(state)
    return _step(cfg, params, state, check_int("iterations", iterations, 1))


@functools.partial(jax.jit, static_argnames="iterations", donate_argnames="state")
def _step(cfg: ModelConfig, params: dict, state: EngineState, iterations: int) -> EngineState:
    """`step` for a checked `iterations` (a Python int >= 1)."""
    layered = per_layer(params)  # the weights one buffer per layer, as the one-shot kernels

    def one(i, rows):
        capped = rows.iterations >= state.max_iters
        live = dataclasses.replace(rows, lengths=jnp.where(capped, 0, rows.lengths))
        step_fn = ar_step if state.opts.mode == "ar" else advance
        live = step_fn(cfg, layered, live, state.temperature, state.top_p,
                       state.opts)
        return dataclasses.replace(live, lengths=rows.lengths)

    return dataclasses.replace(state, rows=jax.lax.fori_loop(0, iterations, one, state.rows))


def ar_step(cfg: ModelConfig, params: dict, rows: BurstState, temperature, top_p,
            opts: KernelOptions) -> BurstState:
    """One cached AR step for every row still generating: the next position of its order drawn
    from the row's key folded with its cursor (the order index), as `sample_ar` draws it."""
    rows = rows.flushed()
    b, n = rows.tokens.shape
    active = jnp.any(rows.unfilled(), axis=1)  # [B]
    cursor = jnp.sum(rows.filled, axis=1).astype(jnp.int32)  # [B]: order index of the next
    target = jnp.take_along_axis(rows.order, jnp.minimum(cursor, n - 1)[:, None], 1)  # [B, 1]
    logits, k_new, v_new = extend_pass(cfg, params, rows.cache,
                                       rows.last_tok[:, None], rows.last_pos[:, None], target)
    step_keys = jax.vmap(jax.random.fold_in)(rows.keys, cursor)
    new = draw(step_keys, to_probs(logits[:, 0], temperature, opts.top_k, top_p))  # [B]
    at = (jnp.arange(b), target[:, 0])
    return dataclasses.replace(
        rows, tokens=rows.tokens.at[at].set(jnp.where(active, new, rows.tokens[at])),
        filled=rows.filled.at[at].set(rows.filled[at] | active),
        pending=(k_new, v_new, active.astype(jnp.int32)),
        last_tok=jnp.where(active, new, rows.last_tok),
        last_pos=jnp.where(active, target[:, 0], rows.last_pos),
        iterations=rows.iterations + active, step=rows.step + 1)


def finished(state: EngineState) -> jax.Array:
    """bool [S]: the slot holds a request that is complete or has run max_iters iterations."""
    check_state(state)
    return _finished(state)


@jax.jit
def _finished(state: EngineState) -> jax.Array:
    done = ~jnp.any(state.rows.unfilled(), axis=1)
    return (state.rows.lengths > 0) & (done | (state.rows.iterations >= state.max_iters))


def result(state: EngineState, slot) -> tuple[jax.Array, SampleStats]:
    """(tokens int32 [N] of the request in `slot`, 0 past its length and at unfilled positions;
    its SampleStats as one row: iterations, generated, forward_passes (the model calls it
    would take alone), finished). A concrete slot outside [0, S), or a donated state
    (`check_state`), is a ValueError."""
    check_state(state)
    _check_slot(state, slot)
    return _result(state, slot)


@jax.jit
def _result(state: EngineState, slot) -> tuple[jax.Array, SampleStats]:
    take = lambda x: jax.lax.dynamic_index_in_dim(x, slot, keepdims=False)
    filled, known = take(state.rows.filled), take(state.known)
    present = jnp.arange(state.capacity) < take(state.rows.lengths)
    iterations = take(state.rows.iterations)
    stats = SampleStats(
        iterations=iterations[None],
        generated=(jnp.sum(filled & present) - jnp.sum(known))[None].astype(jnp.int32),
        forward_passes=jnp.asarray(model_calls(state.opts.mode, iterations), jnp.int32),
        finished=(~jnp.any(~filled & present))[None])
    return jnp.where(filled & present, take(state.rows.tokens), 0), stats


def release(state: EngineState, slot) -> EngineState:
    """`state` with `slot` empty (its request dropped; the slot idles until the next insert).
    A concrete slot outside [0, S) is a ValueError. The state is donated (`check_state`)."""
    check_state(state)
    _check_slot(state, slot)
    return _release(state, slot)


@functools.partial(jax.jit, donate_argnames="state")
def _release(state: EngineState, slot) -> EngineState:
    lengths = jax.lax.dynamic_update_slice_in_dim(state.rows.lengths, jnp.zeros((1,), jnp.int32),
                                                  slot, 0)
    return dataclasses.replace(state, rows=dataclasses.replace(state.rows, lengths=lengths))
