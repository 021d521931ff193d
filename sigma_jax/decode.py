"""Model passes over a KV cache: prefill, the burst pass, and the causal extend (verify) pass.

The history of a row is the sequence of accepted (token, position) pairs in generation order,
starting with (BOS, start) when the model has a start token. The cache holds every history entry
except the last, each embedded with the position of the entry after it; the last entry is fed as
the input of the next pass, paired with whatever target position comes next.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sigma_jax import orders as orders_lib
from sigma_jax.attention import DIAGONAL, SelfMask
from sigma_jax.cache import KVCache, LayerCaches, init_cache, split_layers
from sigma_jax.config import START_POS, ModelConfig
from sigma_jax.model import forward_masked, per_layer
from sigma_jax.sharding import constrain


def cache_capacity(cfg: ModelConfig, n: int, headroom: int = 0) -> int:
    """Slots needed for n tokens plus a block of `headroom` slots written past the last one."""
    return n + int(cfg.bos) + headroom


PREFILL_TOKENS = 1024  # tokens (rows x slots) per prefill pass


def pass_slots(rows: int, slots: int, tokens_per_pass: int = PREFILL_TOKENS) -> int:
    """Slots per pass when `slots` slots of `rows` rows go through in passes of about
    `tokens_per_pass` tokens: at least 1, at most `slots`."""
    return max(1, min(tokens_per_pass // rows, slots))


@functools.partial(jax.jit, static_argnames=("capacity", "tokens_per_pass"))
def prefill(cfg: ModelConfig, params: dict, tokens: jax.Array, order: jax.Array,
            n_known: jax.Array, capacity: int, tokens_per_pass: int = PREFILL_TOKENS):
    """Commit the known tokens of every row to a fresh cache.

    tokens, order: int32 [B, N], the order listing each row's known positions first;
    n_known: int32 [B], known tokens per row (may differ; >= 1 without a start token).
    Returns (cache, last_tok [B], last_pos [B]): the cache (`LayerCaches`, one buffer per
    layer; `.stacked()` is the KVCache) holds history[:-1] (length n_known + bos - 1 per row),
    and (last_tok, last_pos) is the last history entry.

    The history is fed in causal passes of `chunk` = tokens_per_pass / B slots (at least 1, at
    most N), each attending to the slots written before it, as many passes as the row with the
    most known tokens needs (none when only the start token is known): no pass computes logits,
    and activations are [B, chunk, ...], about `tokens_per_pass` tokens whatever the batch.
    Slots past a row's history hold garbage that stays masked until overwritten.
    """
    inputs, pos_in, pos_out, _ = orders_lib.make_batch(tokens, order, bos=cfg.bos,
                                                       bos_id=cfg.bos_id)
    n_hist = n_known + int(cfg.bos)  # [B]
    b, t = inputs.shape
    chunk = pass_slots(b, t, tokens_per_pass)
    padded = max(1, -(-t // chunk)) * chunk  # whole chunks, at least one (T = 0 when bos=False
    #   and N = 1); padding slots are computed, never kept
    inputs, pos_in, pos_out = (jnp.pad(x, [(0, 0), (0, padded - t)])
                               for x in (inputs, pos_in, pos_out))
    layered = per_layer(params)

    def one_pass(c, carry):  # history slots [c * chunk, (c + 1) * chunk) of every row
        layers, pending = carry
        layers = layers.write_block(jnp.maximum(c - 1, 0) * chunk, *pending)  # the last pass's
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)
        _, k_new, v_new = forward_masked(cfg, layered, part(inputs),
                                         part(pos_in), part(pos_out),
                                         cache=dataclasses.replace(layers, length=full * c))
        return layers, (k_new, v_new)

    layers = split_layers(init_cache(cfg, b, capacity))
    full = constrain(jnp.full((b,), chunk, jnp.int32), ("batch",))
    passes = (jnp.max(n_hist) - 1 + chunk - 1) // chunk
    layers, pending = jax.lax.fori_loop(0, passes, one_pass,
                                        (layers, layers.no_entries(chunk)[:2]))
    layers = dataclasses.replace(layers.write_block(jnp.maximum(passes - 1, 0) * chunk, *pending),
                                 length=n_hist - 1)
    last_tok, last_pos = history_entry(cfg, tokens, order, n_hist - 1)
    return layers, last_tok, last_pos


def history_entry(cfg: ModelConfig, tokens: jax.Array, order: jax.Array, index: jax.Array):
    """The (token [B], position [B]) at history index `index` [B] of each row."""
    if cfg.bos:
        step = jnp.maximum(index - 1, 0)[:, None]
        tok = jnp.take_along_axis(tokens, jnp.take_along_axis(order, step, 1), 1)[:, 0]
        pos = jnp.take_along_axis(order, step, 1)[:, 0]
        is_start = index == 0
        return jnp.where(is_start, cfg.bos_id, tok), jnp.where(is_start, START_POS, pos)
    pos = jnp.take_along_axis(order, index[:, None], 1)[:, 0]
    return jnp.take_along_axis(tokens, pos[:, None], 1)[:, 0], pos


@functools.partial(jax.jit, static_argnames="head")
def burst_pass(cfg: ModelConfig, params: dict, cache: KVCache | LayerCaches, last_tok: jax.Array,
               last_pos: jax.Array, targets: jax.Array, head: bool = True) -> jax.Array:
    """Every target's conditional given the history, in one pass: logits float32 [B, Q, V]
    (head=False: the activations [B, Q, D] the logits are `model.head_logits` of).

    Query j is (last_tok, last_pos, targets[:, j]); it attends to the cache and to itself only
    (DIAGONAL: one self score per query, never a Q x Q block). Writes nothing.
    """
    b, q = targets.shape
    tok = jnp.broadcast_to(last_tok[:, None], (b, q))
    pos = jnp.broadcast_to(last_pos[:, None], (b, q))
    out, _, _ = forward_masked(cfg, params, tok, pos, targets, DIAGONAL, cache=cache, head=head)
    return out


@functools.partial(jax.jit, static_argnames=("blocks", "head"))
def extend_pass(cfg: ModelConfig, params: dict, cache: KVCache | LayerCaches, tokens: jax.Array,
                pos_in: jax.Array, pos_out: jax.Array, blocks: int = 1, head: bool = True):
    """Feed new slots on top of the cache: (logits [B, T, V], k_new, v_new [L, B, T, H, hd]);
    head=False gives the activations [B, T, D] in place of the logits (`model.head_logits`).

    The new slots are causal (cached decoding, the verify pass); with `blocks` = K they are K
    independent causal blocks of T/K slots (K candidate orders) that share the one cache. Commit
    with `cache.write`.
    """
    if tokens.shape[1] % blocks:
        raise ValueError(f"{tokens.shape[1]} new slots do not split into {blocks} blocks")
    return forward_masked(cfg, params, tokens, pos_in, pos_out, SelfMask(blocks=blocks),
                          cache=cache, head=head)
