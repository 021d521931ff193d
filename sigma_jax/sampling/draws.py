"""The random pieces every sampler shares: per-row keys, logits -> sampling probabilities
(temperature, top-k, top-p), token draws and uniforms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sigma_jax.checks import check_key, largest_divisor


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """One typed key per row: `key` [B] is used as is; a single key is folded with the row index."""
    check_key(key, rows=batch)
    if key.ndim == 1:
        return key
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


GROUP_BYTES = 64 << 20  # float32 [.., V] arrays of the rows a group handles at once (>= 1 row)


def in_row_groups(f, row_bytes: int, *arrays):
    """vmap(f)(*arrays) (f maps one row of each array, axis 0, to that row's outputs), run as
    equal groups of rows one after another when the `row_bytes`-byte rows of all would pass
    `GROUP_BYTES` (a group: the most rows that divide the batch and fit, at least 1). The groups
    change the memory, never the values.

    Group g holds rows g, g + G, g + 2G, ... (G groups): strided, so that every group spans the
    whole batch, and every device of a mesh that shards the batch in contiguous blocks works on
    every group."""
    batch = arrays[0].shape[0]
    fit = max(1, GROUP_BYTES // row_bytes)
    if fit >= batch:
        return jax.vmap(f)(*arrays)
    rows = largest_divisor(batch, fit)
    groups = batch // rows
    strided = [a.reshape(rows, groups, *a.shape[1:]) for a in arrays]  # row r * G + g at [r, g]
    group = lambda g: jax.vmap(f)(*(jax.lax.dynamic_index_in_dim(a, g, 1, keepdims=False)
                                    for a in strided))
    put = lambda g, outs: jax.tree.map(
        lambda out, part: jax.lax.dynamic_update_index_in_dim(out, part, g, 1), outs, group(g))
    empty = lambda s: jnp.zeros((rows, groups, *s.shape[1:]), s.dtype)
    outs = jax.lax.fori_loop(0, groups, put, jax.tree.map(empty, jax.eval_shape(group, 0)))
    return jax.tree.map(lambda out: out.reshape(batch, *out.shape[2:]), outs)


def draw_row(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per distribution of probs [..., V] (one row's) with one key: int32 [...]."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def draw(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row from probs [B, ..., V] with keys [B]: int32 [B, ...]. Row b's draw
    depends on keys[b] and probs[b] only (the Gumbel noise of a row's draw takes several times its
    probabilities' bytes, so large batches draw in groups of rows)."""
    return in_row_groups(draw_row, 4 * math.prod(probs.shape[1:]), keys, probs)


def uniforms(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 [B, *shape], one independent stream per row."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)
