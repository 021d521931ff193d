"""The preallocated KV cache: one pytree for all layers, written per row.

Slots are in generation order. Positions live in the token embeddings (the double positional
encoding), so the cache stores no positions: slot s of row b is valid iff s < length[b]. Each
layer's keys and values are heads-major, [B, H, S, hd], the layout whose attention products need
no transposed copy (`sigma_jax.cache_attention`); the new entries of a pass come in the model's
token layout, [L, B, T, H, hd].

Invariant kept by the samplers: between iterations the cache holds every accepted token except the
last one (whose K/V depends on the position chosen next). With a start token, "accepted tokens"
include the start token, so length == accepted tokens (start included) - 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from sigma_jax.checks import within_lengths
from sigma_jax.config import ModelConfig
from sigma_jax.sharding import constrain, explicit_spec, fitted_sharding, logical_to_spec

CACHE_KV_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
CACHE_LENGTH_AXES = ("batch",)
NEW_KV_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")  # a pass's new entries


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: [L, B, H, S, hd] (layers, batch, heads, slots, head dim); length: int32[B]."""

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def valid(self) -> jax.Array:
        """bool[B, S]: which slots hold committed entries."""
        return within_lengths(self.length, self.capacity)


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> KVCache:
    """An empty cache of `capacity` slots per row (zeros, never uninitialised memory)."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    shape = (cfg.n_layer, batch, cfg.n_head, capacity, cfg.head_dim)
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

    def put(buf, new):  # buf [L, B, H, S, hd], new [L, B, T, H, hd]
        buf, new = constrain(buf, CACHE_KV_AXES), constrain(new, NEW_KV_AXES)
        # buf[:, rows, :, slots] indexes as [B, T, L, H, hd]: the advanced axes come first.
        new = as_stored(jnp.moveaxis(new, (1, 2), (0, 1)), buf.dtype)
        out = buf.at[:, rows, :, slots].set(
            new, mode="drop", out_sharding=explicit_spec(buf.shape, CACHE_KV_AXES))
        return constrain(out, CACHE_KV_AXES)

    return KVCache(
        k=put(cache.k, k_new),
        v=put(cache.v, v_new),
        length=constrain(cache.length + jnp.asarray(n_new, jnp.int32), ("batch",)),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCaches:
    """A KVCache held as one buffer per layer: k, v: tuples of L arrays [B, H, S, hd]; length:
    int32[B]. For a loop that carries the cache: a model pass reads it layer by layer
    (`model.forward_masked(cache=...)`), `write` commits to every layer's buffer in place, and
    `stacked()` is the KVCache of the same entries.

    The model slices a stacked [L, ...] cache by layer, and XLA copies a slice of a buffer (and,
    on CPU in bfloat16, a converted stack of all of them), so a loop carrying one KVCache would
    copy the whole cache every step.

    bfloat16 entries are held as their bit patterns (`BF16_BITS`, read with `as_entries`): XLA:CPU
    has no bfloat16 product or scatter and converts every bfloat16 buffer it multiplies or writes
    to a float32 copy of the whole buffer, several layers at once, while integer buffers are
    written in place and read block by block (`sigma_jax.cache_attention`). Elsewhere the bits
    cost nothing: a bitcast is free.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length: jax.Array

    def stacked(self) -> KVCache:
        return KVCache(k=as_entries(jnp.stack(self.k)), v=as_entries(jnp.stack(self.v)),
                       length=self.length)

    def valid(self) -> jax.Array:
        """bool[B, S]: which slots hold committed entries."""
        return within_lengths(self.length, self.k[0].shape[2])

    def write(self, k_new: jax.Array, v_new: jax.Array, n_new: jax.Array) -> LayerCaches:
        """`write` (same arguments, same contract) applied to every layer's buffer."""
        one = lambda i: write(KVCache(k=self.k[i][None], v=self.v[i][None], length=self.length),
                              k_new[i:i + 1], v_new[i:i + 1], n_new)
        layers = [one(i) for i in range(len(self.k))]
        return LayerCaches(k=tuple(c.k[0] for c in layers), v=tuple(c.v[0] for c in layers),
                           length=layers[0].length)

    def write_block(self, start: jax.Array, k_new: jax.Array, v_new: jax.Array) -> LayerCaches:
        """Write k_new/v_new [L, B, T, H, hd] at slots start .. start+T-1 of every row (start:
        int32 [] >= 0, the same for all rows; T <= S) in place, lengths unchanged: a block update,
        no scatter (which some backends stage through a copy of the buffer). Slots past the
        capacity are dropped, never shifted onto earlier ones."""
        heads = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, hd] -> [B, H, T, hd]
        layer = lambda x: constrain(x, CACHE_KV_AXES[1:])
        put = lambda buf, new: layer(_put_block(layer(buf), layer(as_stored(heads(new), buf.dtype)),
                                                start))
        return LayerCaches(k=tuple(put(b, n) for b, n in zip(self.k, k_new, strict=True)),
                           v=tuple(put(b, n) for b, n in zip(self.v, v_new, strict=True)),
                           length=self.length)

    def no_entries(self, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A block of `width` new slots of which none is kept: (k, v [L, B, width, H, hd] zeros,
        n_new int32 [B] zeros), the `write` arguments of a loop's first, empty commit."""
        b, h, _, hd = self.k[0].shape
        zeros = jnp.zeros((len(self.k), b, width, h, hd), entry_dtype(self.k[0].dtype))
        zeros = constrain(zeros, NEW_KV_AXES)
        return zeros, zeros, constrain(jnp.zeros((b,), jnp.int32), CACHE_LENGTH_AXES)


BF16_BITS = jnp.uint16  # how a per-layer buffer holds bfloat16 entries


def entry_dtype(stored_dtype) -> jnp.dtype:
    """The dtype of the entries a buffer of `stored_dtype` holds."""
    return jnp.dtype(jnp.bfloat16 if stored_dtype == BF16_BITS else stored_dtype)


def storage_dtype(entries_dtype) -> jnp.dtype:
    """The dtype of a per-layer buffer holding entries of `entries_dtype` (`entry_dtype`'s
    inverse)."""
    return jnp.dtype(BF16_BITS if entries_dtype == jnp.bfloat16 else entries_dtype)


def as_stored(x: jax.Array, stored_dtype) -> jax.Array:
    """Entries x, cast to the entry dtype of a `stored_dtype` buffer, in that buffer's form."""
    x = x.astype(entry_dtype(stored_dtype))
    return jax.lax.bitcast_convert_type(x, BF16_BITS) if stored_dtype == BF16_BITS else x


def as_entries(buf: jax.Array) -> jax.Array:
    """The entries of a buffer (bfloat16 from its bits; any other dtype as it is)."""
    return jax.lax.bitcast_convert_type(buf, jnp.bfloat16) if buf.dtype == BF16_BITS else buf


def _put_block(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf [B, H, S, hd] with new [B, H, T, hd] at slots start .. start+T-1, those past S
    dropped: `dynamic_update_slice` clamps its start to S - T, so the block written there keeps
    the old entries before `start`."""
    s, t = buf.shape[2], new.shape[2]
    at = jnp.minimum(start, s - t)
    index = jnp.arange(t) + (at - start)  # slot at + j holds new[index[j]]; < 0: the old entry
    old = jax.lax.dynamic_slice_in_dim(buf, at, t, axis=2)
    block = jnp.where((index >= 0)[None, None, :, None],
                      jnp.take(new, jnp.maximum(index, 0), axis=2), old)
    return jax.lax.dynamic_update_slice_in_dim(buf, block, at, axis=2)


def split_layers(cache: KVCache) -> LayerCaches:
    """The same cache, one buffer per layer (each laid out by the cache's axes on a mesh)."""
    layer = lambda x: constrain(x, CACHE_KV_AXES[1:])
    n_layer = cache.k.shape[0]
    store = lambda x: layer(as_stored(x, storage_dtype(x.dtype)))
    return LayerCaches(k=tuple(store(cache.k[i]) for i in range(n_layer)),
                       v=tuple(store(cache.v[i]) for i in range(n_layer)),
                       length=constrain(cache.length, CACHE_LENGTH_AXES))


def cache_sharding(mesh, cache=None) -> KVCache:
    """A KVCache of NamedShardings: k, v by CACHE_KV_AXES, length by batch.

    With `cache` (a KVCache of arrays or ShapeDtypeStructs) the specs are fitted to its shapes.
    Usable as `out_shardings` of a jitted `init_cache` or as `in_shardings` of a sampler.
    """
    if cache is None:
        kv = NamedSharding(mesh, logical_to_spec(CACHE_KV_AXES))
        return KVCache(k=kv, v=kv, length=NamedSharding(mesh, logical_to_spec(CACHE_LENGTH_AXES)))
    return KVCache(k=fitted_sharding(mesh, CACHE_KV_AXES, cache.k.shape),
                   v=fitted_sharding(mesh, CACHE_KV_AXES, cache.v.shape),
                   length=fitted_sharding(mesh, CACHE_LENGTH_AXES, cache.length.shape))
