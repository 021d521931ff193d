"""The cache-free causal kernel's own gradient (`attention.causal_attention` without dropout:
probabilities recomputed from one log-sum-exp per query) against autodiff of a plain float64
softmax, with non-finite keys and values, in bfloat16, and the dropout path beside it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax.attention import causal_attention


def _plain(q, k, v):
    """softmax(q kᵀ / sqrt(hd)) over keys u <= t, times v: [B, T, H, hd] (unfused, no blocks)."""
    t = q.shape[1]
    s = jnp.einsum("bthd,buhd->bhtu", q, k) / jnp.sqrt(q.shape[-1] * 1.0)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhtu,buhd->bthd", jax.nn.softmax(s, axis=-1), v)


def _inputs(t, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, w = (jax.random.normal(kk, (2, t, 3, 8)) * 2.0 for kk in keys)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), w


def _grads(f, w):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * f(q, k, v)), argnums=(0, 1, 2)))


@pytest.mark.parametrize("t,block", [(1, 64), (5, 2), (16, 4), (70, 64), (33, 8)])
def test_values_and_gradients_match_a_float64_softmax(t, block):
    (q, k, v), w = _inputs(t, seed=t)
    with jax.enable_x64():
        want = _plain(*(np.asarray(a, np.float64) for a in (q, k, v)))
        want_grads = _grads(_plain, np.asarray(w, np.float64))(
            *(np.asarray(a, np.float64) for a in (q, k, v)))
    ours = lambda q, k, v: causal_attention(q, k, v, block=block)
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(_grads(ours, w)(q, k, v), want_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)


def test_non_finite_keys_and_values_get_zero_gradient_and_hide_from_earlier_queries():
    (q, k, v), w = _inputs(9)
    bad_k, bad_v = k.at[:, 6, 1].set(jnp.nan), v.at[:, 4, 0].set(jnp.inf)
    f = lambda q, k, v: causal_attention(q, k, v, block=4)
    dq, dk, dv = _grads(lambda q, k, v: f(q, k, v)[:, :4], w[:, :4])(q, bad_k, bad_v)
    clean = _grads(lambda q, k, v: f(q, k, v)[:, :4], w[:, :4])(q, k, v)
    # queries 0..3 see neither bad token: the same gradients everywhere else, zero at them
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    np.testing.assert_array_equal(np.asarray(dk)[:, 6, 1], 0.0)
    np.testing.assert_array_equal(np.asarray(dv)[:, 4, 0], 0.0)
    np.testing.assert_allclose(dq, clean[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(f(q, bad_k, bad_v))[:, :4],
                               np.asarray(f(q, k, v))[:, :4], rtol=0, atol=0)


def test_bfloat16_inputs_stay_close_to_float32():
    """bfloat16 in and out (float32 scores and accumulation inside), against float32 on the same
    bfloat16-rounded inputs."""
    (q, k, v), w = _inputs(40, seed=3)
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    q, k, v = (a.astype(jnp.float32) for a in low)  # the same values in float32
    f = lambda q, k, v: causal_attention(q, k, v, block=16)
    out = jax.jit(f)(*low)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), jax.jit(f)(q, k, v),
                               rtol=5e-2, atol=5e-2)
    for got, ref in zip(_grads(f, w)(*low), _grads(f, w)(q, k, v), strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0.1, atol=0.15)


def test_with_dropout_off_the_dropout_path_gives_the_same_function():
    (q, k, v), w = _inputs(20, seed=4)
    plain = lambda q, k, v: causal_attention(q, k, v, block=8)
    identity = lambda q, k, v: causal_attention(q, k, v, dropout=lambda p: p, block=8)
    np.testing.assert_allclose(jax.jit(identity)(q, k, v), jax.jit(plain)(q, k, v),
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(identity, w)(q, k, v), _grads(plain, w)(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
