"""A dense layer whose weight gradient is laid out for XLA's matmul kernels.

`Linear` computes exactly what `nn.Dense` computes (`x @ w + b`, the same parameters); only the
arrangement of its backward pass differs, which tests check against `nn.Dense`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
