"""Any-order autoregressive sampling: one token per model call, in any order, with a KV cache
(prefill, then one slot per step) or without (a full forward every step: the test oracle).

order='random' follows the known-first convention of `sigma_jax.orders` (the known tokens in a
uniformly random order drawn from the row's key, then the unknown ones in a uniformly random
order): its law is the one `sample_burst(mode='exact')` samples and `log_prob` scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sigma_jax import orders as orders_lib
from sigma_jax.checks import check_bool
from sigma_jax.config import ModelConfig
from sigma_jax.decode import extend_pass, prefill
from sigma_jax.model import check_params, forward, per_layer
from sigma_jax.sampling.call import SamplerCall, SampleStats
from sigma_jax.sampling.draws import draw, to_probs
from sigma_jax.sampling.inputs import checked_inputs, kernel_inputs
from sigma_jax.sampling.options import (
    AR_SAMPLERS,
    KernelOptions,
    SampleOptions,
    check_options,
    model_calls,
)


def sample_ar(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
              known: jax.Array, *, order="random", temperature=1.0, top_k: int | None = None,
              top_p=None, use_cache: bool = True, known_order: str = "random", lengths=None
              ) -> tuple[jax.Array, SampleStats]:
    """Fill every unknown position, one token per model call, in the given order.

    tokens: int32 [B, N] (values at unknown positions are ignored); known: bool [B, N], any subset
    per row (without a start token, at least one known token per row).
    key: one typed key, or one per row ([B]); with per-row keys each row depends only on its own
    inputs and key. order: 'random' (the known-first convention: the known positions in uniformly
    random order, or ascending with known_order='ascending', then the unknown ones in uniformly
    random order, per row from its key), 'left_to_right' | 'fractal' | 'spread' (known positions
    ascending, then the unknown ones in that kind of order) or an explicit int32 [B, N] order
    (a list or an array) listing each row's known positions first. temperature (>= 0; 0 =
    greedy) and top_p (in (0, 1]) are traced; top_k (in [1, V]) is static; concrete
    out-of-range values raise ValueError (see `SampleOptions`).
    use_cache=False recomputes the whole prefix at every step (the oracle for the cached path).
    lengths: int32 [B] (None: N), each row's length: positions past it are absent, neither known
    nor generated; a row of length L gets the tokens of the same row alone at N = L, same key.
    Returns (tokens [B, N] with known tokens unchanged, SampleStats).
    """
    return sample_ar_call(cfg, params, key, tokens, known, order=order, temperature=temperature,
                          top_k=top_k, top_p=top_p, use_cache=use_cache,
                          known_order=known_order, lengths=lengths)()


def sample_ar_call(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
                   known: jax.Array, *, order="random", temperature=1.0,
                   top_k: int | None = None, top_p=None, use_cache: bool = True,
                   known_order: str = "random", lengths=None) -> SamplerCall:
    """`sample_ar`'s arguments checked and prepared, not yet run: a `SamplerCall` (call it to
    sample, `.lower()` to compile ahead of time). Bad input raises ValueError before any work."""
    check_bool("use_cache", use_cache)
    kind, explicit = (order, None) if isinstance(order, str) else ("random", order)
    options = SampleOptions("ar" if use_cache else "ar_nocache", order=kind,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            known_order=known_order)
    return prepare_ar(cfg, params, key, tokens, known, options, explicit, lengths)


def prepare_ar(cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
               options: SampleOptions, order=None, lengths=None) -> SamplerCall:
    """The `SamplerCall` of an AR sampler ('ar' or 'ar_nocache') with checked `options`, along
    `options.order` or the explicit `order` [B, N], with per-row `lengths` [B] (None: N)."""
    check_options(options, AR_SAMPLERS)
    check_params(cfg, params)
    tokens, known, order, lengths = checked_inputs(cfg, tokens, known, options, order, lengths)
    keys, order = kernel_inputs(key, tokens, known, options, order, lengths)
    return SamplerCall(_sample_ar,
                       ar_args(cfg, params, keys, tokens, known, order, lengths, options), {})


def ar_args(cfg, params, keys, tokens, known, order, lengths, options: SampleOptions) -> tuple:
    """The arguments of the AR kernel for prepared inputs (keys [B], order int32 [B, N],
    lengths int32 [B])."""
    temperature, top_p, _ = options.traced_values(tokens.shape[1])
    return (cfg, params, keys, tokens, known, order, temperature, top_p, lengths,
            options.kernel_options(tokens.shape[1]))


@jax.jit
def _sample_ar(cfg, params, keys, tokens, known, order, temperature, top_p, lengths,
               opts: KernelOptions):
    """The AR loop along order int32 [B, N] (known positions first, absent ones last); keys [B]:
    the sampling streams of `generation_order`; lengths int32 [B]; opts.mode 'ar' (cached) or
    'ar_nocache'."""
    b, n = tokens.shape
    n_known = jnp.sum(known, axis=1).astype(jnp.int32)  # [B]
    seq = orders_lib.permute(tokens, order)  # tokens in generation order

    def sample_next(seq, cursor, logits):  # logits [B, V] for order index `cursor` [B]
        step_keys = jax.vmap(jax.random.fold_in)(keys, cursor)
        new = draw(step_keys, to_probs(logits, temperature, opts.top_k, top_p))
        active = cursor < lengths
        rows = jnp.arange(b)
        return seq.at[rows, jnp.minimum(cursor, n - 1)].set(
            jnp.where(active, new, seq[rows, jnp.minimum(cursor, n - 1)])), active

    steps = jnp.max(lengths - n_known)  # the loop runs until the row with most unknowns is done
    loop = _cached_loop if opts.mode == "ar" else _uncached_loop
    seq = loop(cfg, params, tokens, order, n_known, seq, steps, sample_next, opts)
    out = jnp.where(known, tokens, orders_lib.unpermute(seq, order))
    generated = lengths - n_known
    stats = SampleStats(iterations=generated, generated=generated,
                        forward_passes=jnp.asarray(model_calls(opts.mode, steps), jnp.int32),
                        finished=jnp.ones((b,), bool))
    return out, stats


def _cached_loop(cfg, params, tokens, order, n_known, seq, steps, sample_next, opts):
    """`steps` cached decoding steps after a prefill of the known tokens: seq [B, N] in
    generation order, filled from each row's cursor (its known count) on."""
    n = tokens.shape[1]
    cache, last_tok, last_pos = prefill(cfg, params, tokens, order, n_known,
                                        opts.cache_capacity(cfg, n))
    layered = per_layer(params)

    # The loop carries the cache and the weights one buffer per layer (no per-step copies of
    # layer slices), and the entries of each call are written at the start of the next one,
    # before the pass reads the cache: written after the pass, they would make XLA copy the
    # whole cache every step, since the pass may still be reading it.
    def body(i, carry):
        seq, layers, pending, last_tok, last_pos, cursor = carry
        layers = layers.write(*pending)
        target = jnp.take_along_axis(order, jnp.minimum(cursor, n - 1)[:, None], 1)  # [B, 1]
        logits, k_new, v_new = extend_pass(cfg, layered, layers,
                                           last_tok[:, None], last_pos[:, None], target)
        seq, active = sample_next(seq, cursor, logits[:, 0])
        new_tok = jnp.take_along_axis(seq, jnp.minimum(cursor, n - 1)[:, None], 1)[:, 0]
        last_tok = jnp.where(active, new_tok, last_tok)
        last_pos = jnp.where(active, target[:, 0], last_pos)
        pending = (k_new, v_new, active.astype(jnp.int32))  # [L, B, 1, H, hd] x 2, [B]
        return seq, layers, pending, last_tok, last_pos, cursor + active

    carry = (seq, cache, cache.no_entries(1),
             last_tok, last_pos, n_known)
    return jax.lax.fori_loop(0, steps, body, carry)[0]


def _uncached_loop(cfg, params, tokens, order, n_known, seq, steps, sample_next, opts):
    """`steps` steps of a full forward pass over the whole sequence each (the oracle)."""
    def body(i, carry):
        seq, cursor = carry
        inputs, pos_in, pos_out, _ = orders_lib.make_batch(
            orders_lib.unpermute(seq, order), order, bos=cfg.bos, bos_id=cfg.bos_id)
        logits = forward(cfg, params, inputs, pos_in, pos_out)  # [B, T, V]
        slot = jnp.clip(cursor - 1 + int(cfg.bos), 0, logits.shape[1] - 1)
        seq, active = sample_next(seq, cursor, jnp.take_along_axis(
            logits, slot[:, None, None], 1)[:, 0])
        return seq, cursor + active

    return jax.lax.fori_loop(0, steps, body, (seq, n_known))[0]
