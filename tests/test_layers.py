"""`Linear` computes what `nn.Dense` computes: values, parameters and gradients; `gelu` computes
`jax.nn.gelu(approximate=False)` with the analytic gradient."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.layers import Linear, gelu, matmul


def test_linear_equals_dense_values_params_and_grads():
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    init = nn.initializers.normal(0.3)
    ours = Linear(6, True, jnp.float32, jnp.float32, init)
    theirs = nn.Dense(6, kernel_init=init)
    p = ours.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: a + 0.1, p)  # a non-zero bias
    assert jax.tree.structure(p) == jax.tree.structure(theirs.init(jax.random.key(1), x))
    np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, x), rtol=1e-6, atol=1e-6)

    def loss(module, p, x):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    g_ours = jax.grad(loss, argnums=(1, 2))(ours, p, x)
    g_theirs = jax.grad(loss, argnums=(1, 2))(theirs, p, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_matmul_gradient_in_bfloat16_keeps_the_weight_dtype():
    x = jnp.ones((4, 3), jnp.bfloat16)
    w = jnp.ones((3, 2), jnp.bfloat16)
    dw = jax.grad(lambda w: jnp.sum(matmul(x, w).astype(jnp.float32)))(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), 4.0)


def test_gelu_values_are_jax_exact_gelu_and_its_gradient_the_float64_derivative():
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001),
                         jax.random.normal(jax.random.key(0), (4000,)) * 3.0])
    np.testing.assert_array_equal(gelu(x), jax.nn.gelu(x, approximate=False))
    dy = jax.random.normal(jax.random.key(1), x.shape)
    _, vjp = jax.vjp(gelu, x)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi)
    np.testing.assert_allclose(vjp(dy)[0], dy64 * (cdf + x64 * pdf), rtol=1e-6, atol=1e-6)
    _, vjp_autodiff = jax.vjp(lambda x: jax.nn.gelu(x, approximate=False), x)
    np.testing.assert_allclose(vjp(dy)[0], vjp_autodiff(dy)[0], rtol=1e-6, atol=1e-6)


def test_gelu_gradient_in_bfloat16_keeps_the_dtype():
    x = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(gelu(x).astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16
    want = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x.astype(jnp.float32), approximate=False)))(
        x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(g, np.float32), want, rtol=1e-2, atol=1e-2)
