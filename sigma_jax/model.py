"""The σ-GPT transformer: a causal GPT whose input embedding carries two positions.

Slot t of the input holds (token, pos_in = the position that token occupies, pos_out = the position
of the token to predict). The embedding is wte[token] + concat(PE(pos_in), PE(pos_out)), each half
n_embd/2 wide; the rest is nanoGPT (pre-LayerNorm blocks, GELU MLP, final LayerNorm, tied head).

The new tokens attend to (a) the valid slots of a KV cache and (b) the new tokens that a static
`attention.SelfMask` lets them see. Training and prefill are "no cache + CAUSAL"; cached decoding
is "cache + one token"; the burst pass is "cache + DIAGONAL" (each query sees the cache and
itself only); the verify pass is "cache + CAUSAL"; K candidate orders are "cache +
SelfMask(blocks=K)", K causal blocks that all share the one cache (sigma_jax/attention.py).

Public functions are pure: `init_params(cfg, key) -> params` (a plain nested dict) and
`forward` / `forward_masked`, functions of (cfg, params, arrays). The parameters' logical axes
live in `sigma_jax.param_sharding`, the double positional encoding in `sigma_jax.positions`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.attention import (
    CAUSAL,
    SelfMask,
    causal_attention,
    causal_kernel,
    fused_causal_attention,
)
from sigma_jax.cache import NEW_KV_AXES, KVCache, LayerCaches, init_cache
from sigma_jax.cache_attention import cached_attention
from sigma_jax.checks import check_id_range, check_key, integer_array, is_concrete, short_repr
from sigma_jax.config import START_POS, ModelConfig
from sigma_jax.layers import Linear, gelu
from sigma_jax.positions import DoublePositionalEmbedding
from sigma_jax.sharding import auto_axes_call, constrain


def _dense(cfg: ModelConfig, features: int, name: str, std: float = 0.02,
           bias: bool | None = None) -> Linear:
    return Linear(features, use_bias=cfg.bias if bias is None else bias, dtype=cfg.compute_dtype,
                  param_dtype=cfg.storage_dtype, kernel_init=nn.initializers.normal(std),
                  name=name)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                        param_dtype=cfg.storage_dtype, name=name)


class CausalSelfAttention(nn.Module):
    """x [B,T,D] -> (y [B,T,D], (k, v) [B,T,H,hd]) attending to the valid cache slots and to the
    new tokens that `mask` lets each new token see. The cache-free causal pass uses the kernel
    of `cfg.attention` (`attention.causal_kernel`), the blocked one while dropout is active;
    dropout applies to that pass (training) only."""

    cfg: ModelConfig
    deterministic: bool
    mask: SelfMask = CAUSAL

    @nn.compact
    def __call__(self, x, k_cache, v_cache, cache_valid):
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = _dense(cfg, 3 * cfg.n_embd, "c_attn")(x)  # [B, T, 3D]
        q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim) for a in jnp.split(qkv, 3, -1))
        q, k, v = (constrain(a, ("batch", "seq", "heads", "head_dim")) for a in (q, k, v))
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        if self.mask == CAUSAL and k_cache.shape[2] == 0:  # no cache slots [B, H, S, hd]
            dropping = cfg.dropout > 0 and not self.deterministic
            if causal_kernel(cfg.attention) == "fused" and not dropping:
                y = fused_causal_attention(q, k, v)
            else:
                y = causal_attention(q, k, v, dropout if dropping else None)
        else:
            y = cached_attention(q, k, v, k_cache, v_cache, cache_valid, self.mask)
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        y = _dense(cfg, cfg.n_embd, "c_proj", std)(y.reshape(b, t, cfg.n_embd))
        return dropout(y), (k, v)


class MLP(nn.Module):
    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = gelu(_dense(cfg, cfg.hidden_dim, "c_fc")(x))
        h = constrain(h, ("batch", "seq", "ff"))
        y = _dense(cfg, cfg.n_embd, "c_proj", 0.02 / math.sqrt(2 * cfg.n_layer))(h)
        return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; scanned over layers (params stacked on axis 0), with the
    scan unrolled: no stacked per-layer residuals and no loop carry copies in training."""

    cfg: ModelConfig
    deterministic: bool
    mask: SelfMask = CAUSAL

    @nn.compact
    def __call__(self, x, k_cache, v_cache, cache_valid):
        attn = CausalSelfAttention(self.cfg, self.deterministic, self.mask, name="attn")
        y, kv = attn(_layer_norm(self.cfg, "ln_1")(x), k_cache, v_cache, cache_valid)
        x = x + y
        x = x + MLP(self.cfg, self.deterministic, name="mlp")(_layer_norm(self.cfg, "ln_2")(x))
        return x, kv


class SigmaGPT(nn.Module):
    """tokens, pos_in, pos_out [B,T] -> (logits f32 [B,T,V], (k, v) [L,B,T,H,hd]); without
    `with_head`, the final-LayerNormed activations [B,T,D] in place of the logits."""

    cfg: ModelConfig
    deterministic: bool = True
    mask: SelfMask = CAUSAL
    with_head: bool = True

    @nn.compact
    def __call__(self, tokens, pos_in, pos_out, k_cache, v_cache, cache_valid):
        cfg = self.cfg
        wte = _token_table(cfg)
        x = _embed(cfg, wte, DoublePositionalEmbedding(cfg, name="pos"), tokens, pos_in, pos_out)
        x = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x)  # [B, T, D]
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, 0, nn.broadcast),
            length=cfg.n_layer,
            unroll=cfg.n_layer,
        )(cfg, self.deterministic, self.mask, name="h")
        x, (k_new, v_new) = blocks(x, k_cache, v_cache, cache_valid)
        x = _layer_norm(cfg, "ln_f")(x)
        if not self.with_head:
            return x, (k_new, v_new)
        head = None if cfg.tie_embeddings else _dense(cfg, cfg.vocab_size, "lm_head", bias=False)
        return _logits(cfg, x, wte, head), (k_new, v_new)


def _token_table(cfg: ModelConfig) -> nn.Embed:
    return nn.Embed(cfg.input_vocab_size, cfg.n_embd, embedding_init=nn.initializers.normal(0.02),
                    dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name="wte")


def _embed(cfg: ModelConfig, wte, pos, tokens, pos_in, pos_out) -> jax.Array:
    """The input embedding [B, T, D]: wte[token] + the double positional encoding."""
    return constrain(wte(tokens) + pos(pos_in, pos_out), ("batch", "seq", "act_embed"))


def _logits(cfg: ModelConfig, x, wte, head) -> jax.Array:
    """float32 logits [B, T, V] of the final-LayerNormed activations x (the tied table when head
    is None)."""
    if head is None:  # the output tokens' rows of the table only (no start token)
        table = wte.embedding[: cfg.vocab_size].astype(cfg.compute_dtype)
        logits = jnp.einsum("btd,vd->btv", x.astype(cfg.compute_dtype), table)
    else:
        logits = head(x)
    return constrain(logits, ("batch", "seq", "vocab")).astype(jnp.float32)


def head_logits(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] of final-LayerNormed activations x [B, T, D] (what
    `forward_masked(..., head=False)` returns): the model's output head alone."""
    wte = _token_table(cfg).bind({"params": params["wte"]})
    head = None if cfg.tie_embeddings else _dense(
        cfg, cfg.vocab_size, "lm_head", bias=False).bind({"params": params["lm_head"]})
    return _logits(cfg, x, wte, head)


def _forward_per_layer(cfg: ModelConfig, params: dict, blocks, mask: SelfMask, tokens, pos_in,
                       pos_out, k_layers, v_layers, cache_valid, head: bool = True):
    """SigmaGPT's inference pass with the block weights one tree per layer (`blocks`) and the
    cache one buffer per layer (k_layers, v_layers: L x [B, H, S, hd]): each layer reads its own
    buffers, never a slice of stacked ones (which XLA may copy whole, e.g. to convert them)."""
    bound = lambda module, name: module.bind({"params": params[name]})
    wte = bound(_token_table(cfg), "wte")
    pos = DoublePositionalEmbedding(cfg).bind({"params": params.get("pos", {})})
    x = _embed(cfg, wte, pos, tokens, pos_in, pos_out)
    ks, vs = [], []
    for block, k_cache, v_cache in zip(blocks, k_layers, v_layers, strict=True):
        x, (k, v) = Block(cfg, True, mask).apply({"params": block}, x, k_cache, v_cache,
                                                 cache_valid)
        ks.append(k)
        vs.append(v)
    x = bound(_layer_norm(cfg, "ln_f"), "ln_f")(x)
    return head_logits(cfg, params, x) if head else x, (jnp.stack(ks), jnp.stack(vs))


def check_positions(cfg: ModelConfig, *positions) -> None:
    """One-line ValueError unless every position lies in [-1, block_size) (-1 = the start
    position) with a start token (cfg.bos), in [0, block_size) without one; skipped for traced
    values, where a position outside [-1, block_size) instead makes its own slot's logits NaN
    and leaves every other slot unchanged."""
    low = START_POS if cfg.bos else 0
    for pos in positions:
        if not is_concrete(pos):
            continue
        pos = np.asarray(pos)
        if pos.size and (pos.min() < low or pos.max() >= cfg.block_size):
            note = "-1 = the start position" if cfg.bos else "bos=False: no start position -1"
            raise ValueError(f"positions must lie in [{low}, {cfg.block_size}) ({note}); got "
                             f"values in [{pos.min()}, {pos.max()}]")


def _checked_inputs(cfg: ModelConfig, tokens, pos_in, pos_out):
    """(tokens, pos_in, pos_out) after the one-line checks of a teacher-forced pass: integer
    arrays (lists accepted) of one shape [B, T] (T = 0 gives empty logits); for concrete values,
    token ids in [0, input_vocab_size) (the real ids, and the start token cfg.bos_id with
    cfg.bos) and positions by `check_positions`."""
    tokens = integer_array(tokens, "tokens", "token ids")
    pos_in, pos_out = integer_array(pos_in, "pos_in"), integer_array(pos_out, "pos_out")
    shapes = [tuple(np.shape(a)) for a in (tokens, pos_in, pos_out)]
    if len(shapes[0]) != 2 or len(set(shapes)) != 1:
        raise ValueError(f"tokens, pos_in and pos_out must be [B, T] arrays of one shape; got "
                         f"shapes {shapes[0]}, {shapes[1]} and {shapes[2]}")
    note = (f" (the start token {cfg.bos_id} included)" if cfg.bos
            else " (bos=False: no start token)")
    check_id_range(tokens, cfg.input_vocab_size, "tokens", note)
    check_positions(cfg, pos_in, pos_out)
    return tokens, pos_in, pos_out


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters: a plain nested dict (nanoGPT init: N(0, 0.02), residual projections
    N(0, 0.02/sqrt(2 n_layer)), zero biases). Per-layer params are stacked on a leading axis.
    key: one typed PRNG key (`check_key`); the work is one jitted call."""
    check_config(cfg)
    check_key(key)
    return _init_params(cfg, key)


@jax.jit
def _init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = init_cache(cfg, 1, 0)
    variables = SigmaGPT(cfg).init(key, tokens, tokens, tokens, cache.k, cache.v, cache.valid())
    return variables["params"]


def check_config(cfg) -> None:
    """One-line ValueError unless `cfg` is a ModelConfig (a dict or another config would fail
    later on a missing attribute)."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a sigma_jax.ModelConfig; got {short_repr(cfg)}")


def check_params(cfg: ModelConfig, params) -> None:
    """One-line ValueError unless `cfg` is a ModelConfig and `params` has the tree, shapes and a
    floating dtype of `init_params(cfg, key)` (arrays, tracers or `jax.ShapeDtypeStruct`s):
    params of another config would otherwise fail deep inside the model, or not at all."""
    check_config(cfg)
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be the nested dict of init_params(cfg, key) or "
                         f"checkpoint.load; got {type(params).__name__}")
    want = _leaves_by_path(jax.eval_shape(_init_params, cfg, jax.random.key(0)))
    got = _leaves_by_path(params)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing:
        raise ValueError(f"params lack {missing[0]!r}, which this ModelConfig needs: params "
                         f"and cfg are of different models")
    if extra:
        raise ValueError(f"params hold {extra[0]!r}, which this ModelConfig has no use for: "
                         f"params and cfg are of different models")
    for path, leaf in got.items():
        shape = tuple(getattr(leaf, "shape", ()))
        if shape != want[path].shape:
            raise ValueError(f"params {path!r} has shape {shape}, but this ModelConfig needs "
                             f"{want[path].shape}: params and cfg are of different models")
        if not jnp.issubdtype(getattr(leaf, "dtype", np.dtype(object)), jnp.floating):
            raise ValueError(f"params {path!r} has dtype {getattr(leaf, 'dtype', None)}; "
                             f"parameters must be floating point")


def _leaves_by_path(tree) -> dict:
    """{'h/attn/c_attn/kernel': leaf, ...} of a nested dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def split_blocks(params: dict) -> tuple[dict, ...]:
    """The parameters of each transformer block: the trees of `params["h"]` (the blocks,
    stacked on axis 0), one per layer."""
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], params["h"]) for i in range(n_layer))


def per_layer(params: dict) -> dict:
    """params with "h" as the tuple of per-layer trees (`split_blocks`), which `forward_masked`
    runs layer by layer. Split before a loop, each step then reads every layer's weights where
    they lie instead of slicing (and copying) them out of the stacked arrays."""
    return {**params, "h": split_blocks(params)}


def count_params(params: dict) -> int:
    """Number of parameters (array elements) in a params tree; works on arrays and on
    jax.ShapeDtypeStruct leaves alike, and counts a scalar leaf (a number) as one. Any other
    leaf is a one-line ValueError."""
    total = 0
    for x in jax.tree.leaves(params):
        if hasattr(x, "shape"):
            total += math.prod(x.shape)
        elif isinstance(x, numbers.Number):
            total += 1
        else:
            raise ValueError(f"params must hold arrays, ShapeDtypeStructs or numbers; got a leaf "
                             f"{short_repr(x)}")
    return int(total)


def forward_masked(cfg: ModelConfig, params: dict, tokens: jax.Array, pos_in: jax.Array,
                   pos_out: jax.Array, mask: SelfMask = CAUSAL, *, cache: KVCache | None = None,
                   dropout_key: jax.Array | None = None, head: bool = True):
    """The general model call.

    tokens, pos_in, pos_out: int32 [B, T] (pos -1 = start position; token cfg.bos_id = start token).
    mask: which new tokens each new token attends to (static: CAUSAL, DIAGONAL or K causal
      blocks; see sigma_jax/attention.py).
    cache: the history every new token also attends to (its valid slots); None = no history.
      A `LayerCaches` (one buffer per layer), or params whose "h" is a tuple of per-layer trees
      (`per_layer`), run the layers one by one on their own buffers (inference only).
    dropout_key: None = deterministic (inference); a key turns dropout on.
    head: False returns the final-LayerNormed activations [B, T, D] in place of the logits, for
      callers that apply `head_logits` to a few rows at a time.
    Returns (logits float32 [B, T, V], k_new, v_new [L, B, T, H, hd]). Nothing is written to the
    cache: callers commit what they accept with `cache.write`.
    """
    check_positions(cfg, pos_in, pos_out)
    if cache is None:
        cache = init_cache(cfg, tokens.shape[0], 0)
    per_layer = isinstance(cache, LayerCaches) or isinstance(params["h"], tuple)
    if per_layer and dropout_key is not None:
        raise ValueError("dropout needs the stacked parameters and cache (a training pass)")
    model = SigmaGPT(cfg, deterministic=dropout_key is None, mask=mask, with_head=head)
    rngs = None if dropout_key is None else {"dropout": dropout_key}

    def apply(params, rngs, k_cache, v_cache, *arrays):
        if per_layer:
            blocks = params["h"] if isinstance(params["h"], tuple) else split_blocks(params)
            layer = lambda c: c if isinstance(c, tuple) else tuple(c)  # L x [B, H, S, hd]
            return _forward_per_layer(cfg, params, blocks, mask, *arrays[:3], layer(k_cache),
                                      layer(v_cache), arrays[3], head)
        return model.apply({"params": params}, *arrays[:3], k_cache, v_cache, arrays[3],
                           rngs=rngs)

    # Flax layers are not Explicit-sharding clean; under an Explicit mesh this runs with Auto axes.
    out_axes = ("batch", "seq", "vocab" if head else "act_embed")
    out, (k_new, v_new) = auto_axes_call(
        apply, (out_axes, (NEW_KV_AXES, NEW_KV_AXES)), params, rngs, cache.k, cache.v, tokens,
        pos_in, pos_out, cache.valid())
    return out, k_new, v_new


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, pos_in: jax.Array,
            pos_out: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Causal teacher-forced pass: tokens, pos_in, pos_out int32 [B, T] -> logits float32 [B, T, V].

    Slot t predicts the token at position pos_out[t], having seen slots <= t. Lists are accepted
    as arrays. One-line ValueErrors, before any work: params unlike `init_params(cfg, key)`'s
    (`check_params`), inputs not integer [B, T] of one shape, and, when concrete,
    token ids outside [0, input_vocab_size) (the start token only with cfg.bos) or positions
    outside [-1, block_size) ([0, block_size) without cfg.bos; `check_positions`).
    """
    check_params(cfg, params)
    tokens, pos_in, pos_out = _checked_inputs(cfg, tokens, pos_in, pos_out)
    return _forward(cfg, params, tokens, pos_in, pos_out, dropout_key=dropout_key)


@jax.jit
def _forward(cfg, params, tokens, pos_in, pos_out, *, dropout_key=None):
    logits, _, _ = forward_masked(cfg, params, tokens, pos_in, pos_out, dropout_key=dropout_key)
    return logits
