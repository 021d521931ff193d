"""Density estimation: log p(x_unknown | x_known) for any known subset, and every per-position
conditional p(x_j | x_known) in one burst pass.

Without an explicit order, both feed the known tokens by the known-first convention of
`sigma_jax.orders` (`orders.random_order`, from the caller's key), as the samplers do: a σ-GPT is
not order-consistent, so the value depends on the order, and the convention is what makes these
densities those of the samplers' law."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sigma_jax import orders as orders_lib
from sigma_jax.checks import check_int, check_key, checked_rows, within_lengths
from sigma_jax.config import ModelConfig
from sigma_jax.decode import burst_pass, cache_capacity, prefill
from sigma_jax.model import check_params, forward


def _checked(cfg: ModelConfig, params, tokens, known, order, known_order: str, lengths, key, *,
             known_only: bool = False):
    """`checks.checked_rows` (known_only: only the known tokens checked, the others ignored),
    the params against cfg, known_order (at its default with an explicit order, which would
    ignore it), and the key (one typed key, or None; unread with an explicit order)."""
    check_params(cfg, params)
    rows = checked_rows(cfg, tokens, known, order, lengths, known_only=known_only)
    orders_lib.check_known_order(known_order)
    if order is not None:
        orders_lib.check_explicit_known_order(known_order)
    if key is not None:
        check_key(key)
    return rows


@jax.jit
def _log_prob_in_order(cfg: ModelConfig, params: dict, tokens, known, order, lengths):
    """[B, N] inputs, one order per row (absent positions last) -> log p(x_unknown | x_known)
    [B] in that order."""
    inputs, pos_in, pos_out, targets = orders_lib.make_batch(tokens, order, bos=cfg.bos,
                                                             bos_id=cfg.bos_id)
    logp = jax.nn.log_softmax(forward(cfg, params, inputs, pos_in, pos_out), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]  # [B, T]
    # The target is unknown and present.
    scored = ~jnp.take_along_axis(known, pos_out, 1) & (pos_out < lengths[:, None])
    return jnp.sum(jnp.where(scored, token_logp, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("n_orders", "known_order"))
def _random_orders(key, known, lengths, n_orders: int, known_order: str):
    """[B, n_orders, N] independent known-first orders of the convention."""
    one = lambda k: orders_lib.random_order(k, known, known_order=known_order, lengths=lengths)
    return jnp.moveaxis(jax.vmap(one)(jax.random.split(key, n_orders)), 0, 1)


def log_prob(cfg: ModelConfig, params: dict, tokens: jax.Array, known: jax.Array,
             key: jax.Array | None = None, *, order: jax.Array | None = None,
             n_orders: int = 1, known_order: str = "random", lengths=None) -> jax.Array:
    """log p(x_unknown | x_known), one teacher-forced pass per order: float32 [B, n_orders].

    tokens: int32 [B, N]; known: bool [B, N] (any subset per row; with bos=False at least one).
    order: int32 [B, N] listing each row's known positions first (then n_orders must be 1);
    otherwise `n_orders` orders of the known-first convention are drawn from `key`
    (`orders.random_order`: the known tokens in uniformly random order, or ascending with
    known_order='ascending', then the unknown ones in uniformly random order), the orders under
    which `sample_ar(order='random')` and `sample_burst` sample. With bos=True an empty known set
    gives the full-sequence log-likelihood. A model that is consistent across orders gives the
    same value for every order; the spread over orders is a consistency diagnostic.
    lengths: int32 [B] (None: N): positions past a row's length are absent (last in every
    order, never scored); a row of length L scores as the same row alone at N = L.
    """
    tokens, known, order, lengths = _checked(cfg, params, tokens, known, order, known_order,
                                             lengths, key)
    n_orders = check_int("n_orders", n_orders, 1)
    if order is not None:
        if n_orders != 1:
            raise ValueError("pass either an explicit order or n_orders > 1, not both")
        orders = order[:, None, :]
    else:
        if key is None:
            raise ValueError("log_prob needs a PRNG key to draw random orders (or pass order=)")
        orders = _random_orders(key, known, lengths, n_orders, known_order)
    b, k, n = orders.shape
    flat = lambda x: jnp.broadcast_to(x[:, None], (b, k, *x.shape[1:])).reshape(b * k,
                                                                                 *x.shape[1:])
    out = _log_prob_in_order(cfg, params, flat(tokens), flat(known), orders.reshape(b * k, n),
                             flat(lengths))
    return out.reshape(b, k)


@jax.jit
def _conditionals(cfg: ModelConfig, params: dict, tokens, known, order, lengths):
    n_known = jnp.sum(known, axis=1).astype(jnp.int32)
    cache, last_tok, last_pos = prefill(cfg, params, tokens, order, n_known,
                                        capacity=cache_capacity(cfg, tokens.shape[1]))
    targets = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    probs = jax.nn.softmax(burst_pass(cfg, params, cache, last_tok, last_pos, targets), axis=-1)
    one_hot = jax.nn.one_hot(tokens, cfg.vocab_size, dtype=probs.dtype)
    present = within_lengths(lengths, tokens.shape[1])[..., None]
    return jnp.where(known[..., None], one_hot, jnp.where(present, probs, 0.0))


def conditionals(cfg: ModelConfig, params: dict, tokens: jax.Array, known: jax.Array,
                 key: jax.Array | None = None, *, order: jax.Array | None = None,
                 known_order: str = "random", lengths=None) -> jax.Array:
    """p(x_j | x_known) for every position j, in one burst pass: float32 [B, N, V].

    The known tokens are fed in the order of `order`'s known prefix when given, else by the
    known-first convention (`orders.random_order`): in a uniformly random order drawn from `key`,
    independently per row (the first conditional of the samplers' law, given that order), or
    ascending with known_order='ascending' (no key needed). Rows of known positions are the
    one-hot of the known token; the values of `tokens` at unknown positions are ignored.
    lengths: int32 [B] (None: N): positions past a row's length are absent (rows of zeros).
    """
    tokens, known, order, lengths = _checked(cfg, params, tokens, known, order, known_order,
                                             lengths, key, known_only=True)
    if order is None:
        if key is None and known_order == "random":
            raise ValueError("conditionals needs a PRNG key to draw the order of the known "
                             "tokens (or pass order= or known_order='ascending')")
        # With 'ascending' the key only orders the unknown positions, which one burst pass ignores.
        key = jax.random.key(0) if key is None else key
        order = orders_lib.random_order(key, known, known_order=known_order, lengths=lengths)
    return _conditionals(cfg, params, tokens, known, order, lengths)
