"""What both samplers share: per-row keys, logits -> probabilities, token draws, statistics, input
checks, and the prepared-call type `SamplerCall`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sigma_jax import orders as orders_lib
from sigma_jax.config import ModelConfig
from sigma_jax.likelihood import check_known, is_concrete


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleStats:
    """Counters returned by the samplers (arrays, so they stay on device until read).

    iterations: int32[B], loop iterations in which the row was still generating (AR: one per
      generated token; burst: draft + verify rounds, or verify calls in jacobi mode).
    generated: int32[B], tokens generated (the unknown positions filled).
    forward_passes: int32[], sequential model calls of the whole kernel, prefill included
      (AR: 1 + steps; burst: 1 + 2 x iterations; jacobi burst: 2 + iterations).
    finished: bool[B], every unknown position filled (False only when max_iters stopped the row).
    """

    iterations: jax.Array
    generated: jax.Array
    forward_passes: jax.Array
    finished: jax.Array

    @property
    def tokens_per_iteration(self) -> jax.Array:
        return self.generated / jnp.maximum(self.iterations, 1)


@dataclasses.dataclass(frozen=True)
class SamplerCall:
    """A sampler's jitted kernel with its prepared arguments (inputs checked, keys split per row,
    scalars as arrays): `call()` samples, `call.lower()` gives the AOT `jax.stages.Lowered`
    (compile it once, time it apart, or read its cost analysis). Built by `sample_ar_call` /
    `sample_burst_call`; `sample_ar` / `sample_burst` are exactly `..._call(...)()`."""

    kernel: Callable
    args: tuple
    static: dict

    def __call__(self) -> tuple[jax.Array, SampleStats]:
        return self.kernel(*self.args, **self.static)

    def lower(self) -> jax.stages.Lowered:
        return self.kernel.lower(*self.args, **self.static)


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """One typed key per row: `key` [B] is used as is; a single key is folded with the row index."""
    if jnp.issubdtype(key.dtype, jnp.integer):
        raise ValueError("pass a typed PRNG key (jax.random.key(seed)), not a legacy uint32 key")
    if key.ndim == 1:
        if key.shape[0] != batch:
            raise ValueError(f"got {key.shape[0]} per-row keys for a batch of {batch}")
        return key
    if key.ndim != 0:
        raise ValueError(f"key must be one key or one key per row; got shape {key.shape}")
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def to_probs(logits: jax.Array, temperature: jax.Array, top_k: int | None,
             top_p: jax.Array | None) -> jax.Array:
    """Sampling distribution of float32 logits [..., V]: temperature (<= 0 = greedy one-hot), then
    top-k (static k) and top-p (nucleus, traced) truncation. The most probable token is always
    kept, so every traced top_p (even <= 0) gives a distribution. Returns float32 probs [..., V].
    """
    logits = logits.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    greedy = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    t = jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(logits / t, axis=-1)
    if top_p is not None:
        sorted_p = jnp.sort(probs, axis=-1)[..., ::-1]
        mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        kept = jnp.where(mass_before < top_p, sorted_p, jnp.inf)  # [..., V]
        kept = kept.at[..., 0].set(sorted_p[..., 0])  # the top token, even for top_p <= 0
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        probs = jnp.where(probs >= threshold, probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return jnp.where(temperature > 0, probs, greedy)


def draw(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row from probs [B, ..., V] with keys [B]: int32 [B, ...]."""
    sample = lambda k, p: jax.random.categorical(k, jnp.log(p), axis=-1)
    return jax.vmap(sample)(keys, probs).astype(jnp.int32)


def uniforms(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 [B, *shape], one independent stream per row."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)


def generation_order(order, known: jax.Array, keys: jax.Array, known_order: str = "random"
                     ) -> tuple[jax.Array, jax.Array]:
    """(order int32 [B, N], sampling keys [B]): each row's key split into an order stream and a
    sampling stream, and the generation order (known positions first) from a kind name of
    `orders.ORDER_KINDS` (random orders follow the known-first convention of
    `orders.random_order` with the order stream) or an explicit [B, N] array.

    It runs before the sampler kernels, which take the order as an array: one compiled kernel
    serves every order kind."""
    if isinstance(order, str):
        return _order_and_keys(known, keys, None, kind=order, known_order=known_order)
    return _order_and_keys(known, keys, jnp.asarray(order, jnp.int32), kind=None,
                           known_order="random")


@functools.partial(jax.jit, static_argnames=("kind", "known_order"))
def _order_and_keys(known, keys, explicit, *, kind, known_order):
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]: the order stream, the sampling stream
    if kind is not None:
        explicit = orders_lib.order_from_mask(kind, known, split[:, 0], known_order=known_order)
    return explicit, split[:, 1]


def check_sampler_inputs(cfg: ModelConfig, tokens, known, order=None,
                         known_order: str = "random") -> None:
    """One-line errors for bad sampler inputs, before any work."""
    if isinstance(order, str) and order not in orders_lib.ORDER_KINDS:
        raise ValueError(f"order must be one of {', '.join(orders_lib.ORDER_KINDS)} or an "
                         f"int32 [B, N] array; got {order!r}")
    orders_lib.check_known_order(known_order)
    check_known(cfg, tokens, known, None if isinstance(order, str) else order)


def truncation_options(cfg: ModelConfig, temperature, top_k, top_p):
    """The sampling options checked and prepared: (temperature float32[], top_k, top_p float32[] or
    None). One-line ValueErrors, before any work, for top_k outside [1, V] (static, always
    checked), and, when their values are concrete, a negative or NaN temperature and top_p outside
    (0, 1]. Traced values pass unchecked: `to_probs` keeps the top token whatever they are."""
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or not 1 <= top_k <= cfg.vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, {cfg.vocab_size}]; "
                         f"got {top_k!r}")
    temperature = scalar(temperature, jnp.float32, "temperature")
    if is_concrete(temperature) and not float(temperature) >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {float(temperature):g}")
    if top_p is not None:
        top_p = scalar(top_p, jnp.float32, "top_p")
        if is_concrete(top_p) and not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1]; got {float(top_p):g}")
    return temperature, top_k, top_p


def scalar(value, dtype, name: str) -> jax.Array:
    """A dynamic scalar as a typed array (Python scalars would compile a second time)."""
    arr = jnp.asarray(value, dtype)
    if arr.ndim:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    return arr
