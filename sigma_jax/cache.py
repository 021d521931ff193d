"""The preallocated KV cache: one pytree for all layers, written per row.

Slots are in generation order. Positions live in the token embeddings (the double positional
encoding), so the cache stores no positions: slot s of row b is valid iff s < length[b].

Invariant kept by the samplers: between iterations the cache holds every accepted token except the
last one (whose K/V depends on the position chosen next). With a start token, "accepted tokens"
include the start token, so length == accepted tokens (start included) - 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sigma_jax.config import ModelConfig
from sigma_jax.sharding import CACHE_KV_AXES, constrain, explicit_spec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: [L, B, S, H, hd] (layers, batch, slots, heads, head dim); length: int32[B]."""

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def valid(self) -> jax.Array:
        """bool[B, S]: which slots hold committed entries."""
        return jnp.arange(self.capacity)[None, :] < self.length[:, None]


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> KVCache:
    """An empty cache of `capacity` slots per row (zeros, never uninitialised memory)."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    shape = (cfg.n_layer, batch, capacity, cfg.n_head, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    return KVCache(k=zeros, v=zeros, length=jnp.zeros((batch,), jnp.int32))


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, n_new: jax.Array) -> KVCache:
    """Block-then-advance: write k_new/v_new [L, B, T, H, hd] at slots length[b] .. length[b]+T-1
    of each row b, then advance length[b] by n_new[b] (0 <= n_new[b] <= T).

    Slots past the new length are masked and overwritten later, so a row may write a whole block
    and keep only a prefix. Indices are explicit and out-of-range slots are dropped, never clamped:
    `lax.dynamic_update_slice` would shift a block that overhangs the end onto valid entries.
    Callers size the capacity so that length + T <= capacity always holds.
    """
    t = k_new.shape[2]
    slots = cache.length[:, None] + jnp.arange(t)[None, :]  # [B, T]
    rows = jnp.arange(slots.shape[0])[:, None]  # [B, 1]

    def put(buf, new):  # buf [L, B, S, H, hd], new [L, B, T, H, hd]
        buf, new = constrain(buf, CACHE_KV_AXES), constrain(new, CACHE_KV_AXES)
        out = buf.at[:, rows, slots].set(new.astype(buf.dtype), mode="drop",
                                         out_sharding=explicit_spec(buf.shape, CACHE_KV_AXES))
        return constrain(out, CACHE_KV_AXES)

    return KVCache(
        k=put(cache.k, k_new),
        v=put(cache.v, v_new),
        length=constrain(cache.length + jnp.asarray(n_new, jnp.int32), ("batch",)),
    )
