"""Attention of new tokens over a KV cache held heads-major, [B, H, S, hd] per layer.

New tokens attend to the valid cache slots and to the new tokens a static `attention.SelfMask`
lets them see: CAUSAL (cached decoding, the prefill passes, the exact verify pass), DIAGONAL (the
burst pass: each query sees the cache and itself only), or K causal blocks (the published verify
pass). One softmax over [cache | new] per query, in float32.

The cache is heads-major so that both products, scores = q k^T and q' = p v, are plain batched
matrix products over (B, H) that read each layer's cache where it lies: with the slots ahead of
the heads, every pass would first write a transposed copy of the whole cache (the cost of a
burst pass on CPU was mostly those copies, and every layer's copy was live at once).

Queries go through in chunks of `QUERY_CHUNK` (a sequential `lax.map`), so the scores in memory
at once are chunk x (cache + keys). Masked keys never leak into a query: their probabilities are
exactly zero, and non-finite keys or values of new tokens are replaced by zero before they meet
other queries' probabilities.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sigma_jax.attention import NEG, SelfMask, finite_or_zero, softmax_last

QUERY_CHUNK = 128  # queries per chunk (the chunks run one after another)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, cache_valid: jax.Array, mask: SelfMask,
                     chunk: int = QUERY_CHUNK) -> jax.Array:
    """q, k, v: [B, T, H, hd] (the new tokens); k_cache, v_cache: [B, H, S, hd]; cache_valid:
    bool [B, S]. Returns [B, T, H, hd]. Every query sees itself."""
    t, hd = q.shape[1], q.shape[-1]
    q = q * (1.0 / math.sqrt(hd))
    k_seen, v_seen = finite_or_zero(k), finite_or_zero(v)
    k_cache, v_cache = k_cache.astype(k.dtype), v_cache.astype(v.dtype)
    cache = (k_cache, v_cache, cache_valid)
    if t == 1 or mask.diagonal:  # a lone token sees itself only, whatever the mask
        return _map_chunks(lambda i, qc, kc, vc: _diagonal(qc, kc, vc, *cache),
                           (q, k_seen, v_seen), chunk)
    if mask.blocks > 1:  # independent causal blocks, one block per step
        return _map_chunks(lambda i, qb, kb, vb: _causal(qb, kb, vb, *cache, 0),
                           (q, k_seen, v_seen), t // mask.blocks)
    chunk = min(chunk, t)  # query chunks against every new key, masked
    return _map_chunks(lambda i, qc: _causal(qc, k_seen, v_seen, *cache, i * chunk), (q,),
                       chunk)


def _map_chunks(f, arrays, chunk: int):
    """f(index, *chunks) over consecutive chunks of `chunk` tokens (axis 1 of every array), run
    one after another by `lax.map`; the outputs [B, chunk, ...] are concatenated back to
    [B, T, ...]. A last partial chunk is zero-padded and its padding dropped."""
    t = arrays[0].shape[1]
    if t <= chunk:
        return f(0, *arrays)
    n = -(-t // chunk)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (a.ndim - 2))
    split = lambda a: jnp.moveaxis(pad(a).reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)
    out = jax.lax.map(lambda xs: f(xs[0], *xs[1:]), (jnp.arange(n), *map(split, arrays)))
    return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], n * chunk, *out.shape[3:])[:, :t]


def _cache_part(q, k_cache, v_cache, cache_valid, scores_new):
    """Softmax over [cache | new] of queries q [B, c, H, hd] given the new part's scores
    [B, H, c, U]: (the cache part of the output [B, c, H, hd], the new part's probs). Both
    products are batched over (B, H) with the operands' own row-major matrices, [c, hd] x
    [S, hd]^T and [c, S] x [S, hd], the forms CPU matrix kernels take without a transpose."""
    qh = jnp.swapaxes(q, 1, 2)  # [B, H, c, hd]
    s_cache = jnp.einsum("bhtd,bhsd->bhts", qh, k_cache, preferred_element_type=jnp.float32)
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache, NEG)  # [B, H, c, S]
    probs = softmax_last(jnp.concatenate([s_cache, scores_new], axis=-1))
    s = k_cache.shape[2]
    p_cache = probs[..., :s].astype(v_cache.dtype)
    y = jnp.einsum("bhts,bhsd->bhtd", p_cache, v_cache)  # [B, H, c, hd]
    return jnp.swapaxes(y, 1, 2), probs[..., s:]


def _diagonal(q, k, v, k_cache, v_cache, cache_valid):
    """q, k, v [B, c, H, hd]: each query sees the cache and its own key only."""
    s_self = jnp.einsum("bthd,bthd->bht", q, k, preferred_element_type=jnp.float32)
    y, p_self = _cache_part(q, k_cache, v_cache, cache_valid, s_self[..., None])
    return y + jnp.swapaxes(p_self[..., 0], 1, 2)[..., None].astype(v.dtype) * v


def _causal(q, k, v, k_cache, v_cache, cache_valid, start):
    """q [B, c, H, hd] (new tokens start .. start+c-1) against the cache and new keys k, v
    [B, U, H, hd] (new tokens 0 .. U-1), causal: query start+i sees key u iff u <= start+i."""
    s_self = jnp.einsum("bthd,buhd->bhtu", q, k, preferred_element_type=jnp.float32)
    seen = jnp.arange(k.shape[1])[None, :] <= start + jnp.arange(q.shape[1])[:, None]
    y, p_self = _cache_part(q, k_cache, v_cache, cache_valid, jnp.where(seen, s_self, NEG))
    return y + jnp.einsum("bhtu,buhd->bthd", p_self.astype(v.dtype), v)
