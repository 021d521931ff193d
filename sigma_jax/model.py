"""The σ-GPT transformer: a causal GPT whose input embedding carries two positions.

Slot t of the input holds (token, pos_in = the position that token occupies, pos_out = the position
of the token to predict). The embedding is wte[token] + concat(PE(pos_in), PE(pos_out)), each half
n_embd/2 wide; the rest is nanoGPT (pre-LayerNorm blocks, GELU MLP, final LayerNorm, tied head).

One attention code path serves every use: the new tokens attend to (a) the valid slots of a KV cache
and (b) each other under an explicit [T, T] mask. Training is "empty cache + causal mask"; cached
decoding is "cache + one token"; the burst pass is "cache + identity mask" (each query sees the
cache and itself only); the verify pass is "cache + causal mask"; K candidate orders are a
block-diagonal causal mask over K blocks that all share the one cache.

Public functions are pure: `init_params(cfg, key) -> params` (a plain nested dict) and
`forward` / `forward_masked`, functions of (cfg, params, arrays).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sigma_jax.cache import KVCache
from sigma_jax.config import ModelConfig
from sigma_jax.sharding import auto_axes_call, constrain

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
        pe = jnp.concatenate([encode(pos_in), encode(pos_out)], axis=-1)
        pe = constrain(pe, ("batch", "seq", "act_embed"))
        return pe.astype(cfg.compute_dtype)


def _dense(cfg: ModelConfig, features: int, name: str, std: float = 0.02) -> nn.Dense:
    return nn.Dense(features, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                    param_dtype=cfg.storage_dtype, kernel_init=nn.initializers.normal(std),
                    name=name)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                        param_dtype=cfg.storage_dtype, name=name)


def attention_weights(q, k_cache, cache_valid, k_self, mask):
    """Softmax over [cache slots | new tokens], in float32.

    q, k_self: [B, T, H, hd]; k_cache: [B, S, H, hd]; cache_valid: bool[B, S];
    mask: bool[B or 1, T, T] (query t may attend to new token u). Returns ([B,H,T,S], [B,H,T,T]).
    Every query must see at least one key (the samplers always let a query see itself).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_cache = jnp.einsum("bthd,bshd->bhts", q, k_cache, preferred_element_type=jnp.float32)
    s_self = jnp.einsum("bthd,buhd->bhtu", q, k_self, preferred_element_type=jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    s_cache = jnp.where(cache_valid[:, None, None, :], s_cache * scale, neg)
    s_self = jnp.where(mask[:, None, :, :], s_self * scale, neg)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1)
    n_cache = k_cache.shape[1]
    return probs[..., :n_cache], probs[..., n_cache:]


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, mask, k_cache, v_cache, cache_valid):
        """x [B,T,D] -> (y [B,T,D], (k, v) [B,T,H,hd]) attending to cache slots and new tokens."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = _dense(cfg, 3 * cfg.n_embd, "c_attn")(x)  # [B, T, 3D]
        q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim) for a in jnp.split(qkv, 3, -1))
        q, k, v = (constrain(a, ("batch", "seq", "heads", "head_dim")) for a in (q, k, v))
        k_cache = k_cache.astype(k.dtype)
        v_cache = v_cache.astype(v.dtype)
        p_cache, p_self = attention_weights(q, k_cache, cache_valid, k, mask)
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        p_cache, p_self = dropout(p_cache), dropout(p_self)
        y = (jnp.einsum("bhts,bshd->bthd", p_cache.astype(v.dtype), v_cache)
             + jnp.einsum("bhtu,buhd->bthd", p_self.astype(v.dtype), v))  # [B, T, H, hd]
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        y = _dense(cfg, cfg.n_embd, "c_proj", std)(y.reshape(b, t, cfg.n_embd))
        return dropout(y), (k, v)


class MLP(nn.Module):
    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = jax.nn.gelu(_dense(cfg, cfg.hidden_dim, "c_fc")(x), approximate=False)
        h = constrain(h, ("batch", "seq", "ff"))
        y = _dense(cfg, cfg.n_embd, "c_proj", 0.02 / math.sqrt(2 * cfg.n_layer))(h)
        return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; scanned over layers (params stacked on axis 0)."""

    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, mask, k_cache, v_cache, cache_valid):
        attn = CausalSelfAttention(self.cfg, self.deterministic, name="attn")
        y, kv = attn(_layer_norm(self.cfg, "ln_1")(x), mask, k_cache, v_cache, cache_valid)
        x = x + y
        x = x + MLP(self.cfg, self.deterministic, name="mlp")(_layer_norm(self.cfg, "ln_2")(x))
        return x, kv


class SigmaGPT(nn.Module):
    """tokens, pos_in, pos_out [B,T] -> (logits f32 [B,T,V], (k, v) [L,B,T,H,hd])."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens, pos_in, pos_out, mask, k_cache, v_cache, cache_valid):
        cfg = self.cfg
        wte = nn.Embed(cfg.input_vocab_size, cfg.n_embd,
                       embedding_init=nn.initializers.normal(0.02), dtype=cfg.compute_dtype,
                       param_dtype=cfg.storage_dtype, name="wte")
        x = wte(tokens) + DoublePositionalEmbedding(cfg, name="pos")(pos_in, pos_out)
        x = constrain(x, ("batch", "seq", "act_embed"))
        x = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x)  # [B, T, D]
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0, 0, nn.broadcast),
            length=cfg.n_layer,
        )(cfg, self.deterministic, name="h")
        x, (k_new, v_new) = blocks(x, mask, k_cache, v_cache, cache_valid)
        x = _layer_norm(cfg, "ln_f")(x)
        if cfg.tie_embeddings:
            logits = wte.attend(x)[..., : cfg.vocab_size]
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.storage_dtype,
                              kernel_init=nn.initializers.normal(0.02), name="lm_head")(x)
        logits = constrain(logits, ("batch", "seq", "vocab"))
        return logits.astype(jnp.float32), (k_new, v_new)


def causal_mask(t: int) -> jax.Array:
    """bool[1, T, T]: query t sees new tokens u <= t."""
    return jnp.tril(jnp.ones((t, t), bool))[None]


def empty_cache(cfg: ModelConfig, batch: int) -> KVCache:
    """A zero-slot cache: forward passes without history."""
    shape = (cfg.n_layer, batch, 0, cfg.n_head, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    return KVCache(k=zeros, v=zeros, length=jnp.zeros((batch,), jnp.int32))


@jax.jit
def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters: a plain nested dict (nanoGPT init: N(0, 0.02), residual projections
    N(0, 0.02/sqrt(2 n_layer)), zero biases). Per-layer params are stacked on a leading axis."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = empty_cache(cfg, 1)
    variables = SigmaGPT(cfg).init(key, tokens, tokens, tokens, causal_mask(1), cache.k, cache.v,
                                   cache.valid())
    return variables["params"]


def forward_masked(cfg: ModelConfig, params: dict, tokens: jax.Array, pos_in: jax.Array,
                   pos_out: jax.Array, mask: jax.Array, *, cache: KVCache | None = None,
                   dropout_key: jax.Array | None = None):
    """The general model call.

    tokens, pos_in, pos_out: int32 [B, T] (pos -1 = start position; token cfg.bos_id = start token).
    mask: bool [B or 1, T, T], which new tokens each new token attends to (diagonal True).
    cache: the history every new token also attends to (its valid slots); None = no history.
    dropout_key: None = deterministic (inference); a key turns dropout on.
    Returns (logits float32 [B, T, V], k_new, v_new [L, B, T, H, hd]). Nothing is written to the
    cache: callers commit what they accept with `cache.write`.
    """
    if cache is None:
        cache = empty_cache(cfg, tokens.shape[0])
    model = SigmaGPT(cfg, deterministic=dropout_key is None)
    rngs = None if dropout_key is None else {"dropout": dropout_key}

    def apply(params, rngs, *arrays):
        return model.apply({"params": params}, *arrays, rngs=rngs)

    # Flax layers are not Explicit-sharding clean; under an Explicit mesh this runs with Auto axes.
    kv_axes = ("layers", "batch", "seq", "kv_heads", "head_dim")
    logits, (k_new, v_new) = auto_axes_call(
        apply, (("batch", "seq", "vocab"), (kv_axes, kv_axes)), params, rngs, tokens, pos_in,
        pos_out, mask, cache.k, cache.v, cache.valid())
    return logits, k_new, v_new


@jax.jit
def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, pos_in: jax.Array,
            pos_out: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Causal teacher-forced pass: tokens, pos_in, pos_out int32 [B, T] -> logits float32 [B, T, V].

    Slot t predicts the token at position pos_out[t], having seen slots <= t.
    """
    mask = causal_mask(tokens.shape[1])
    logits, _, _ = forward_masked(cfg, params, tokens, pos_in, pos_out, mask,
                                  dropout_key=dropout_key)
    return logits
