"""Attention of new tokens over a KV cache held heads-major, [B, H, S, hd] per layer.

New tokens attend to the valid cache slots and to the new tokens a static `attention.SelfMask`
lets them see: CAUSAL (cached decoding, the prefill passes, the exact verify pass), DIAGONAL (the
burst pass: each query sees the cache and itself only), or K causal blocks (the published verify
pass). One softmax over [cache | new] per query, in float32.

The cache is heads-major so that both products, scores = q k^T and q' = p v, are plain batched
matrix products over (B, H) that read each layer's cache where it lies: with the slots ahead of
the heads, every pass would first write a transposed copy of the whole cache (the cost of a
burst pass on CPU was mostly those copies, and every layer's copy was live at once).

Queries go through in chunks of at most `QUERY_CHUNK` (a sequential `lax.map`), fewer when the
scores of a chunk, chunk x (cache + keys) per row and head, would pass `SCORE_BYTES`. Masked keys
never leak into a query: their probabilities are exactly zero, and non-finite keys or values of
new tokens are replaced by zero before they meet other queries' probabilities.

A cache of bfloat16 entries held as bits (`cache.BF16_BITS`, a `LayerCaches` buffer) is read, on
CPU, in blocks of slots widened to float32 (`WIDE_BLOCK_BYTES` per block), up to the last valid
slot only: XLA:CPU multiplies bfloat16 through float32 copies of whole operands. On other
backends its products run in bfloat16 on the same bits. A float32 cache is read, on CPU, by
passes of several queries (burst, verify and prefill passes) over a static prefix of it: the
shortest of `PREFIX_PARTS` + 1 (none, a quarter, ... all of it) that holds every row's valid
slots, picked at run time. Single-query passes read it whole: for them the prefix's copy costs
more than the slots it skips.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sigma_jax.attention import NEG, SelfMask, finite_or_zero, softmax_last
from sigma_jax.cache import BF16_BITS, as_entries

QUERY_CHUNK = 128  # queries per chunk at most (the chunks run one after another)
SCORE_BYTES = 32 << 20  # float32 scores of one query chunk, at most (unless a chunk is 1 query)
WIDE_BLOCK_BYTES = 256 << 10  # float32 keys (or values) of one widened block of cache slots,
WIDE_BLOCK_SLOTS = 16  # unless a block of this many slots is larger
PREFIX_PARTS = 4  # float32 caches on CPU: passes of several queries read 0, 1/4, ... 4/4 of it


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, cache_valid: jax.Array, mask: SelfMask,
                     chunk: int = QUERY_CHUNK) -> jax.Array:
    """q, k, v: [B, T, H, hd] (the new tokens); k_cache, v_cache: [B, H, S, hd]; cache_valid:
    bool [B, S]. Returns [B, T, H, hd]. Every query sees itself."""
    b, t, h, hd = q.shape
    q = q * (1.0 / math.sqrt(hd))
    k_seen, v_seen = finite_or_zero(k), finite_or_zero(v)
    if k_cache.dtype != BF16_BITS:
        k_cache, v_cache = k_cache.astype(k.dtype), v_cache.astype(v.dtype)
    cache = (k_cache, v_cache, cache_valid)
    chunk = max(1, min(chunk, SCORE_BYTES // (4 * b * h * (k_cache.shape[2] + t))))
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
    args = (jnp.swapaxes(q, 1, 2), k_cache, v_cache, cache_valid, scores_new)  # q [B, H, c, hd]
    if k_cache.shape[2] == 0:
        y, p_new = _whole(*args)
    elif k_cache.dtype == BF16_BITS:
        y, p_new = jax.lax.platform_dependent(*args, cpu=_widened_blocks, default=_whole)
    elif q.shape[1] > 1:
        y, p_new = jax.lax.platform_dependent(*args, cpu=_valid_prefix, default=_whole)
    else:
        y, p_new = _whole(*args)
    return jnp.swapaxes(y, 1, 2), p_new


def _whole(qh, k_cache, v_cache, cache_valid, scores_new):
    """Both products over the whole cache in the cache's dtype: (y [B, H, c, hd], new probs)."""
    k_cache, v_cache = as_entries(k_cache), as_entries(v_cache)
    s_cache = jnp.einsum("bhtd,bhsd->bhts", qh, k_cache, preferred_element_type=jnp.float32)
    probs = _softmax_with_new(s_cache, cache_valid, scores_new)
    s = k_cache.shape[2]
    y = jnp.einsum("bhts,bhsd->bhtd", probs[..., :s].astype(v_cache.dtype), v_cache)
    return y.astype(qh.dtype), probs[..., s:]


def _valid_prefix(qh, k_cache, v_cache, cache_valid, scores_new):
    """`_whole` over the shortest of `PREFIX_PARTS` + 1 static prefixes of the cache (none, a
    quarter, a half, ...) that holds every row's valid slots, chosen at run time by `lax.switch`:
    the slots past the last valid one of every row are neither multiplied nor softmaxed."""
    s = k_cache.shape[2]
    sizes = sorted({-(-s * i // PREFIX_PARTS) for i in range(PREFIX_PARTS + 1)})
    part = jnp.searchsorted(jnp.array(sizes, jnp.int32), _valid_end(cache_valid))
    prefix = lambda n: lambda qh, k, v, valid, new: _whole(
        qh, k[:, :, :n], v[:, :, :n], valid[:, :n], new)
    return jax.lax.switch(part, [prefix(n) for n in sizes], qh, k_cache, v_cache, cache_valid,
                          scores_new)


def _valid_end(cache_valid: jax.Array) -> jax.Array:
    """int32 []: one past the last slot any row holds valid (0 when none does)."""
    return jnp.max(jnp.where(cache_valid, jnp.arange(cache_valid.shape[1]) + 1, 0))


def _softmax_with_new(s_cache, cache_valid, scores_new):
    """Probabilities [B, H, c, S + U] of the cache scores (invalid slots masked) and the new."""
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache, NEG)  # [B, H, c, S]
    return softmax_last(jnp.concatenate([s_cache, scores_new], axis=-1))


def _widened_blocks(qh, k_bits, v_bits, cache_valid, scores_new):
    """`_whole` for bfloat16 bits, in float32, one block of `kb` slots after another, only the
    blocks up to the last valid slot of any row. The last block starts at S - kb at most; slots
    an earlier block covered are masked out of its values product."""
    b, h, s, hd = k_bits.shape
    kb = min(s, max(WIDE_BLOCK_SLOTS, WIDE_BLOCK_BYTES // (4 * b * h * hd)))
    starts = lambda j: (jnp.minimum(j * kb, s - kb), j * kb)  # (block start, first new slot)
    block = lambda bits, at: _widen(jax.lax.dynamic_slice_in_dim(bits, at, kb, axis=2))
    n = (_valid_end(cache_valid) + kb - 1) // kb

    q32 = qh.astype(jnp.float32)

    def scores(j, s_cache):  # s_cache [B, H, c, S], unvisited slots NEG
        at, _ = starts(j)
        s_blk = jnp.einsum("bhtd,bhsd->bhts", q32, block(k_bits, at))
        return jax.lax.dynamic_update_slice_in_dim(s_cache, s_blk, at, axis=3)

    c = qh.shape[2]
    s_cache = jax.lax.fori_loop(0, n, scores, jnp.full((b, h, c, s), NEG, jnp.float32))
    probs = _softmax_with_new(s_cache, cache_valid, scores_new)

    def values(j, y):  # y [B, H, c, hd] float32
        at, first = starts(j)
        p_blk = jax.lax.dynamic_slice_in_dim(probs, at, kb, axis=3)
        p_blk = jnp.where(at + jnp.arange(kb) >= first, p_blk, 0.0)
        return y + jnp.einsum("bhts,bhsd->bhtd", p_blk, block(v_bits, at))

    y = jax.lax.fori_loop(0, n, values, jnp.zeros((b, h, c, hd), jnp.float32))
    return y.astype(qh.dtype), probs[..., s:]


def _widen(bits: jax.Array) -> jax.Array:
    """float32 values of bfloat16 bit patterns (uint16), by integer shift: XLA rewrites a
    float conversion of a slice into a slice of a converted whole buffer."""
    wide = jax.lax.shift_left(bits.astype(jnp.uint32), jnp.uint32(16))
    return jax.lax.bitcast_convert_type(wide, jnp.float32)


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
