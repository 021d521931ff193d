"""A sampler's inputs checked and prepared, the one way every sampler takes them: the tokens and
the known mask as arrays, one key per row split into an order stream and a sampling stream, and
the generation order resolved from its kind (or taken as given)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sigma_jax import orders as orders_lib
from sigma_jax.checks import checked_rows
from sigma_jax.config import ModelConfig
from sigma_jax.sampling.draws import row_keys
from sigma_jax.sampling.options import SampleOptions


def checked_inputs(cfg: ModelConfig, tokens, known, options: SampleOptions, order=None,
                   lengths=None):
    """(tokens int32 [B, N] with 0 at unknown positions, known bool [B, N], explicit order int32
    [B, N] or None, lengths int32 [B]), after every one-line check of the inputs and of the
    options against them. Lists, numpy and jax arrays are accepted; token values at unknown
    positions are ignored. lengths (None: N for every row): positions at or past a row's length
    are absent, neither known nor generated (known is cleared there). An order kind given as
    `order` (a string) is a one-line ValueError: the kind is an option."""
    if isinstance(order, str):
        raise ValueError(f"order must be an explicit [B, N] integer array here; got the order "
                         f"kind {order!r}: set it in the options, SampleOptions(order={order!r})")
    tokens, known, order, lengths = checked_rows(cfg, tokens, known, order, lengths,
                                                 known_only=True)
    options.check_for(cfg, tokens.shape[1], explicit_order=order is not None)
    return tokens, known, order, lengths


def generation_order(order, known: jax.Array, keys: jax.Array, known_order: str = "random",
                     lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(order int32 [B, N], sampling keys [B]): each row's key split into an order stream and a
    sampling stream, and the generation order (known positions first) from a kind name of
    `orders.ORDER_KINDS` (random orders follow the known-first convention of
    `orders.random_order` with the order stream) or an explicit [B, N] array.

    It runs before the sampler kernels, which take the order as an array: one compiled kernel
    serves every order kind. lengths: int32 [B] (None: N): absent positions come last."""
    if isinstance(order, str):
        return _order_and_keys(known, keys, None, lengths, kind=order, known_order=known_order)
    return _order_and_keys(known, keys, jnp.asarray(order, jnp.int32), lengths, kind=None,
                           known_order="random")


@functools.partial(jax.jit, static_argnames=("kind", "known_order"))
def _order_and_keys(known, keys, explicit, lengths, *, kind, known_order):
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]: the order stream, the sampling stream
    if kind is not None:
        explicit = orders_lib.order_from_mask(kind, known, split[:, 0], known_order=known_order,
                                              lengths=lengths)
    return explicit, split[:, 1]


def kernel_inputs(key, tokens, known, options: SampleOptions, order=None, lengths=None):
    """(keys [B], order int32 [B, N]): the sampling stream of each row and its generation order
    (`options.order`'s kind, or the explicit `order`). key: one typed key or one per row."""
    order, keys = generation_order(options.order if order is None else order, known,
                                   row_keys(key, tokens.shape[0]), options.known_order, lengths)
    return keys, order
