"""`Linear` computes what `nn.Dense` computes: values, parameters and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.layers import Linear, matmul


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
