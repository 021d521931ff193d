"""The attention kernels against one plain reference: scores over [cache | new tokens] under an
explicit boolean mask, one softmax, probabilities times values. The reference takes the cache in
token layout [B, S, H, hd]; the cached kernel reads it heads-major, [B, H, S, hd]."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax import ModelConfig, cache_attention, forward, init_params, sample_burst_call
from sigma_jax.attention import CAUSAL, DIAGONAL, SelfMask, causal_attention
from sigma_jax.cache_attention import cached_attention as _cached_attention


def cached_attention(q, k, v, k_cache, v_cache, cache_valid, mask, chunk):
    """The cached kernel on a token-layout cache [B, S, H, hd]."""
    heads = lambda c: jnp.swapaxes(c, 1, 2)
    return _cached_attention(q, k, v, heads(k_cache), heads(v_cache), cache_valid, mask,
                             chunk=chunk)


def _self_mask(kind: SelfMask, t: int) -> np.ndarray:
    """The explicit [T, T] mask that a SelfMask stands for."""
    i, u = np.arange(t)[:, None], np.arange(t)[None, :]
    if kind.diagonal:
        return i == u
    w = t // kind.blocks
    return (i // w == u // w) & (u <= i)


def _reference(q, k, v, k_cache, v_cache, cache_valid, self_mask):
    hd = q.shape[-1]
    s = jnp.concatenate([jnp.einsum("bthd,bshd->bhts", q, k_cache),
                         jnp.einsum("bthd,buhd->bhtu", q, k)], axis=-1) / np.sqrt(hd)
    seen = jnp.concatenate([jnp.broadcast_to(cache_valid[:, None, :],
                                             (q.shape[0], q.shape[1], k_cache.shape[1])),
                            jnp.broadcast_to(self_mask, (q.shape[0],) + self_mask.shape)], -1)
    p = jax.nn.softmax(jnp.where(seen[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, jnp.concatenate([v_cache, v], axis=1))


def _inputs(t, s, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(kk, (2, t, 3, 4)) * 2.0 for kk in keys[:3])
    k_cache, v_cache = (jax.random.normal(kk, (2, s, 3, 4)) for kk in keys[3:])
    cache_valid = jnp.arange(s)[None, :] < jnp.array([[s], [max(s - 3, 0)]])
    return q, k, v, k_cache, v_cache, cache_valid


@pytest.mark.parametrize("t,block", [(1, 4), (7, 4), (8, 4), (12, 64), (9, 3)])
def test_cache_free_causal_attention_matches_the_reference(t, block):
    q, k, v, *_ = _inputs(t, 0, seed=t)
    empty = jnp.zeros((2, 0, 3, 4))
    ref = lambda q, k, v: _reference(q, k, v, empty, empty, jnp.zeros((2, 0), bool),
                                     _self_mask(CAUSAL, t))
    ours = lambda q, k, v: causal_attention(q, k, v, block=block)
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v),
                               rtol=1e-5, atol=1e-5)
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.cos(f(*a))), argnums=(0, 1, 2)))
    for a, b in zip(grads(ours)(q, k, v), grads(ref)(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask,t,chunk", [
    (CAUSAL, 10, 4),  # chunks of 4, the last one partial
    (CAUSAL, 6, 128),  # one chunk
    (DIAGONAL, 10, 3),
    (DIAGONAL, 5, 128),
    (SelfMask(blocks=3), 12, 128),  # three causal blocks of 4, one per step
    (SelfMask(blocks=1), 5, 2),
    (CAUSAL, 1, 128),  # one new token: the single-token kernel
    (DIAGONAL, 1, 128),
])
def test_cached_attention_matches_the_reference(mask, t, chunk):
    q, k, v, k_cache, v_cache, cache_valid = _inputs(t, 6)
    got = cached_attention(q, k, v, k_cache, v_cache, cache_valid, mask, chunk=chunk)
    want = _reference(q, k, v, k_cache, v_cache, cache_valid, _self_mask(mask, t))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(0, 0), (3, 0), (4, 1), (6, 6), (7, 2), (12, 5)])
@pytest.mark.parametrize("mask,t", [(CAUSAL, 5), (DIAGONAL, 4), (SelfMask(blocks=2), 6)])
def test_passes_read_the_shortest_prefix_holding_every_valid_slot(lengths, mask, t):
    """A float32 cache of 12 slots: passes of several queries read a prefix of 0, 3, 6, 9 or 12
    slots, the shortest that holds every row's valid slots (rows valid below `lengths`, so each
    prefix is taken, at its edges too); the result is the whole-cache reference's."""
    q, k, v, k_cache, v_cache, _ = _inputs(t, 12, seed=sum(lengths) + t)
    cache_valid = jnp.arange(12)[None, :] < jnp.array(lengths)[:, None]
    run = jax.jit(lambda *a: cached_attention(*a, mask, chunk=128))
    program = run.lower(q, k, v, k_cache, v_cache, cache_valid).compile().as_text()
    assert re.search(r"conditional\(.*branch_computations=\{(%[\w.]+, ){4}%[\w.]+\}", program)
    got = run(q, k, v, k_cache, v_cache, cache_valid)
    want = _reference(q, k, v, k_cache, v_cache, cache_valid, _self_mask(mask, t))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_each_prefix_gives_the_whole_cache_products():
    """The prefix a pass reads gives the whole cache's products to float32 rounding, for a
    valid set ending in every prefix."""
    q, k, v, k_cache, v_cache, _ = _inputs(4, 12, seed=5)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k_cache, v_cache))
    scores_new = jnp.einsum("bthd,buhd->bhtu", q, k)
    for last in range(13):
        valid = jnp.arange(12)[None, :] < jnp.array([last, last // 2])[:, None]
        got = jax.jit(cache_attention._valid_prefix)(qh, kh, vh, valid, scores_new)
        want = cache_attention._whole(qh, kh, vh, valid, scores_new)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask", [CAUSAL, DIAGONAL, SelfMask(blocks=2)])
def test_a_non_finite_new_token_leaks_into_no_other_query(mask):
    """NaN keys and values at new token 5 leave every query that may not see it unchanged."""
    q, k, v, k_cache, v_cache, cache_valid = _inputs(8, 4)
    bad_k, bad_v = k.at[:, 5].set(jnp.nan), v.at[:, 5].set(jnp.inf)
    clean = cached_attention(q, k, v, k_cache, v_cache, cache_valid, mask, chunk=4)
    dirty = cached_attention(q, bad_k, bad_v, k_cache, v_cache, cache_valid, mask, chunk=4)
    blind = ~_self_mask(mask, 8)[:, 5]  # queries that do not see token 5
    np.testing.assert_array_equal(np.asarray(clean)[:, blind], np.asarray(dirty)[:, blind])
    causal = causal_attention(q, bad_k, bad_v, block=8)
    np.testing.assert_array_equal(np.asarray(causal)[:, :5],
                                  np.asarray(causal_attention(q, k, v, block=8))[:, :5])


CFG = ModelConfig(vocab_size=5, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("bos", [True, False])
def test_forward_positions_out_of_range(bos):
    """Concrete out-of-range positions are a one-line error; traced ones make their own slot's
    logits NaN and leave the earlier slots' logits exactly as with a valid position."""
    cfg = CFG.replace(bos=bos)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.array([[1, 2, 3, 4]])
    pos_in = jnp.array([[0, 1, 2, 3]])
    good = jnp.array([[1, 2, 3, 4]])
    bad = jnp.array([[1, 2, 3, 8]])  # block_size is 8
    with pytest.raises(ValueError, match=rf"positions must lie in \[{-1 if bos else 0}, 8\)"):
        forward(cfg, params, tokens, pos_in, bad)
    run = jax.jit(lambda p_out: forward(cfg, params, tokens, pos_in, p_out))
    ok, broken = np.asarray(run(good)), np.asarray(run(bad))
    assert np.isnan(broken[0, 3]).all()
    np.testing.assert_array_equal(broken[0, :3], ok[0, :3])


@pytest.mark.integration
def test_burst_sampler_memory_grows_linearly_with_length():
    """The compiled exact burst sampler (W = all): temporary bytes at most 2.5x when N doubles
    from 256 to 512 (no [Q, Q] or [N, N] score block in memory at once)."""
    cfg = ModelConfig(vocab_size=8, block_size=512, n_layer=1, n_head=2, n_embd=16)
    params = init_params(cfg, jax.random.key(0))

    def temp_bytes(n):
        tokens, known = jnp.zeros((1, n), jnp.int32), jnp.zeros((1, n), bool)
        call = sample_burst_call(cfg, params, jax.random.key(0), tokens, known, mode="exact")
        return call.lower().compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(256), temp_bytes(512)
    assert large <= 2.5 * small, (small, large)
