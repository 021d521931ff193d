"""Attention masks of the σ-GPT passes and the cache-free causal kernels (training); the passes
over a KV cache are in `sigma_jax.cache_attention`.

Which new tokens a new token sees is a static `SelfMask`, never a [T, T] mask array, so each pass
computes only the scores it needs:

  CAUSAL               training, prefill, cached decoding, the exact verify pass;
  DIAGONAL             the burst pass (each query sees the cache and itself): one score per query;
  SelfMask(blocks=K)   the published verify pass: K independent causal blocks of T/K tokens that
                       share the cache (K candidate orders), never a (K·T/K)² block.

The cache-free causal pass has two kernels (`ModelConfig.attention`): the blocked one here, and
a fused one, `jax.nn.dot_product_attention(is_causal=True)`, which accelerator backends may map to
a fused kernel; `causal_kernel` resolves the setting when the model is traced. The blocked
kernel has its own gradient (without dropout): the backward pass recomputes each query block's
probabilities from one saved log-sum-exp per query, so no [T, T] probabilities are kept between
the passes.

The blocked causal kernel skips the all-masked key blocks after each query block.

Masked keys never leak into a query: their probabilities are exactly zero, and non-finite keys or
values of new tokens are replaced by zero before they meet other queries' probabilities (0 · NaN
would otherwise be NaN); a token whose own input is non-finite keeps it in its residual stream.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

# Queries per block of the cache-free causal kernel: block i scores keys [0, (i + 1) * block).
CAUSAL_QUERY_BLOCK = 64
NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class SelfMask:
    """Static: new token t sees new token u iff they lie in the same of `blocks` equal consecutive
    blocks and u <= t (blocks=1: causal), or, with `diagonal`, iff u == t."""

    blocks: int = 1
    diagonal: bool = False


CAUSAL = SelfMask()
DIAGONAL = SelfMask(diagonal=True)


def finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def softmax_last(scores: jax.Array) -> jax.Array:
    """softmax over the last axis, normalised by one reciprocal per row (float32 scores)."""
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout=None,
                     block: int = CAUSAL_QUERY_BLOCK) -> jax.Array:
    """Causal self-attention with no cache: q, k, v [B, T, H, hd] -> [B, T, H, hd].

    Queries go in blocks of `block`; block i scores only keys [0, end_i), so the all-masked keys
    after a block are never computed (about half the scores for long T). Without `dropout` the
    gradient is `_causal_recompute`'s: only the output and one log-sum-exp per query are kept
    for the backward pass, which recomputes each block's probabilities. `dropout`, if given, is
    applied to each block's probabilities, and the gradient is autodiff's.
    """
    if q.shape[1] == 0:  # no slots (a model without a start token, read at N = 1)
        return jnp.zeros(q.shape, v.dtype)
    if dropout is None:
        return _causal_recompute(q, k, v, block)
    t = q.shape[1]
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    k_seen, v_seen = finite_or_zero(k), finite_or_zero(v)
    outs = []
    for start, end in _query_blocks(t, block):
        s = jnp.einsum("bthd,buhd->bhtu", q[:, start:end], k_seen[:, :end],
                       preferred_element_type=jnp.float32)  # [B, H, end-start, end]
        probs = dropout(softmax_last(_causal_mask(s, start)))
        outs.append(jnp.einsum("bhtu,buhd->bthd", probs.astype(v.dtype), v_seen[:, :end]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _causal_mask(s: jax.Array, start: int) -> jax.Array:
    """Scores s [..., c, U] of queries start .. start+c-1 against keys 0 .. U-1: key u > query
    index set to NEG."""
    seen = jnp.arange(s.shape[-1])[None, :] <= start + jnp.arange(s.shape[-2])[:, None]
    return jnp.where(seen, s, NEG)


def _block_scores(qh, kh, start, end):
    """Masked float32 scores of queries [start, end) against keys [0, end): [B, H, c, end].
    qh, kh: [B, H, T, hd] (qh already scaled)."""
    s = jnp.einsum("bhtd,bhud->bhtu", qh[:, :, start:end], kh[:, :, :end],
                   preferred_element_type=jnp.float32)
    return _causal_mask(s, start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_recompute(q, k, v, block):
    """`causal_attention` without dropout; its gradient recomputes the probabilities."""
    return _causal_recompute_fwd(q, k, v, block)[0]


def _causal_recompute_fwd(q, k, v, block):
    """Heads-major blocks: o = (exp(s - m) v) / l per query block; keeps (q, k, v, o, lse)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q * scale, finite_or_zero(k),
                                                   finite_or_zero(v)))  # [B, H, T, hd]
    outs, lses = [], []
    for start, end in _query_blocks(q.shape[1], block):
        s = _block_scores(qh, kh, start, end)  # [B, H, c, end]
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bhtu,bhud->bhtd", e.astype(v.dtype), vh[:, :, :end],
                       preferred_element_type=jnp.float32)
        outs.append(o * (1.0 / total))
        lses.append(m + jnp.log(total))
    oh = jnp.concatenate(outs, axis=2)  # [B, H, T, hd] float32
    lse = jnp.concatenate(lses, axis=2)  # [B, H, T, 1]
    y = jnp.swapaxes(oh, 1, 2).astype(v.dtype)
    return y, (qh, kh, vh, oh, lse, jnp.isfinite(k), jnp.isfinite(v))


def _causal_recompute_bwd(block, residuals, dy):
    """p = exp(s - lse) per block; dv = pᵀ dy, ds = p (dy vᵀ - rowsum(dy o)), dq = ds k,
    dk = dsᵀ q. Keys and values that were not finite get a zero gradient."""
    qh, kh, vh, oh, lse, k_finite, v_finite = residuals
    dyh = jnp.swapaxes(dy, 1, 2)  # [B, H, T, hd]
    dsum = jnp.sum(dyh.astype(jnp.float32) * oh, axis=-1, keepdims=True)  # [B, H, T, 1]
    dq, dk, dv = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
    for start, end in _query_blocks(qh.shape[2], block):
        p = jnp.exp(_block_scores(qh, kh, start, end) - lse[:, :, start:end])  # [B, H, c, end]
        dyb = dyh[:, :, start:end]
        dv = dv.at[:, :, :end].add(jnp.einsum("bhtu,bhtd->bhud", p.astype(dy.dtype), dyb,
                                              preferred_element_type=jnp.float32))
        dp = jnp.einsum("bhtd,bhud->bhtu", dyb, vh[:, :, :end],
                        preferred_element_type=jnp.float32)
        ds = (p * (dp - dsum[:, :, start:end])).astype(qh.dtype)
        dq.append(jnp.einsum("bhtu,bhud->bhtd", ds, kh[:, :, :end],
                             preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bhtu,bhtd->bhud", ds, qh[:, :, start:end],
                                              preferred_element_type=jnp.float32))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    dq = jnp.concatenate(dq, axis=2) * scale
    back = lambda g, finite: jnp.where(finite, jnp.swapaxes(g, 1, 2), 0.0).astype(dy.dtype)
    return back(dq, True), back(dk, k_finite), back(dv, v_finite)


_causal_recompute.defvjp(_causal_recompute_fwd, _causal_recompute_bwd)


def causal_kernel(setting: str) -> str:
    """'blocked' or 'fused' for a `ModelConfig.attention` setting. 'auto' is 'fused' when JAX's
    default backend is gpu or tpu and 'blocked' otherwise (CPU); it is read at trace time, so a
    function traced on CPU and exported for an accelerator keeps the blocked kernel."""
    if setting == "auto":
        return "fused" if jax.default_backend() in ("gpu", "tpu") else "blocked"
    return setting


def fused_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal self-attention with no cache through `jax.nn.dot_product_attention`:
    q, k, v [B, T, H, hd] -> [B, T, H, hd], the same function as `causal_attention` (no dropout).

    The mask is `is_causal=True`, never a mask array of ours. On gpu/tpu the implementation is
    left to JAX (None: it may choose cuDNN); elsewhere it is JAX's XLA formulation. Non-finite
    keys and values are zeroed first, as in `causal_attention`, so they never meet another
    query's probabilities.
    """
    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    return jax.nn.dot_product_attention(q, finite_or_zero(k), finite_or_zero(v), is_causal=True,
                                        implementation=None if on_accelerator else "xla")
