"""Layers whose backward passes are arranged for XLA's CPU kernels; their values are those of
the standard layers, which tests check.

`Linear` computes exactly what `nn.Dense` computes (`x @ w + b`, the same parameters); only the
arrangement of its backward pass differs. `gelu` computes exactly what
`jax.nn.gelu(approximate=False)` computes; its gradient is the analytic one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(math.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x Φ(x): the values of `jax.nn.gelu(x, approximate=False)`, bit for bit.

    The gradient is Φ(x) + x φ(x), computed in float32 from x alone (Φ through erf, φ(x) =
    exp(-x²/2) / √(2π)) and cast to x's dtype; it equals autodiff's to float32 rounding.
    Autodiff would differentiate the erfc form and keep its intermediates for the backward
    pass, which costs XLA:CPU about as much again as the rest of the MLP's elementwise work.
    """
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32)
    return ((dy.astype(jnp.float32) * (cdf + x32 * pdf)).astype(dy.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, M] -> [..., M]."""
    return jnp.einsum("...k,km->...m", x, w)


def _matmul_fwd(x, w):
    return matmul(x, w), (x, w)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    dx = jnp.einsum("...m,km->...k", dy, w)
    # dw = xᵀ dy, computed as (dyᵀ x)ᵀ: XLA then transposes the narrow x, not the wide dy, and
    # keeps that transpose out of the elementwise backward of the layer that produced dy (e.g.
    # GELU); autodiff's own form fused it there as a strided write of the whole [N, M] gradient.
    x2 = x.reshape(-1, x.shape[-1])  # [N, K]
    dy2 = dy.reshape(-1, dy.shape[-1])  # [N, M]
    dw = jnp.einsum("nm,nk->mk", dy2, x2).T
    return dx, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
    """`nn.Dense` with the same parameters ('kernel' [K, M], optional 'bias' [M]) and results,
    computed through `matmul`. The kernel and input are cast to `dtype` before the product."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y
