"""The double positional encoding of σ-GPT: each input slot carries the position of its token
and the position of the token to predict, encoded as concat(PE(pos_in), PE(pos_out)), each half
n_embd / 2 wide; sinusoidal as published, or one learned table."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sigma_jax.config import START_POS, ModelConfig
from sigma_jax.sharding import constrain

SINUSOID_LEN_MAX = 1e5  # the published `len_max`


def sinusoidal_encoding(pos: jax.Array, half_width: int, n_embd: int) -> jax.Array:
    """PE(p)[j] = sin(p * L^(-(j - j mod 2) / n_embd) + (pi/2) (j mod 2)), j < half_width.

    pos: int [...] (may be -1, the start position) -> float32 [..., half_width]. The exponent
    divides by the full width n_embd, as the published code does.
    """
    j = jnp.arange(half_width).reshape((1,) * pos.ndim + (half_width,))
    freq = SINUSOID_LEN_MAX ** (-(j - j % 2) / n_embd)  # [1.., half]
    phase = (math.pi / 2) * (j % 2)
    return jnp.sin(pos[..., None].astype(jnp.float32) * freq + phase)


class DoublePositionalEmbedding(nn.Module):
    """concat(PE(pos_in), PE(pos_out)): [B, T] x 2 -> [B, T, n_embd], input half first.

    Sinusoidal: PE = cfg.sinusoidal_scale * sinusoidal_encoding; learned: rows of one table."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, pos_in: jax.Array, pos_out: jax.Array) -> jax.Array:
        cfg = self.cfg
        half = cfg.n_embd // 2
        if cfg.pos_encoding == "sinusoidal":
            encode = lambda p: cfg.sinusoidal_scale * sinusoidal_encoding(p, half, cfg.n_embd)
        else:
            # One table for both halves; with a start token, row block_size is the start position.
            rows = cfg.block_size + int(cfg.bos)
            table = self.param("wpe", nn.initializers.normal(0.02), (rows, half),
                               cfg.storage_dtype)
            encode = lambda p: jnp.take(table, jnp.where(p < 0, cfg.block_size, p), axis=0)
        in_range = lambda p: ((p >= START_POS) & (p < cfg.block_size))[..., None]
        pe = jnp.concatenate([encode(pos_in), encode(pos_out)], axis=-1)
        pe = jnp.where(in_range(pos_in) & in_range(pos_out), pe, jnp.nan)  # out of range: NaN
        pe = constrain(pe, ("batch", "seq", "act_embed"))
        return pe.astype(cfg.compute_dtype)
