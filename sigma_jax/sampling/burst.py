"""Burst sampling: many tokens per model call with a token-based rejection sampler.

All three modes follow a generation order G of the positions (`sample_ar`'s orders; the known
positions first) and draft the next W positions of it.

mode='exact' (speculative sampling inside one any-order model). Each iteration makes two calls:
1. the burst pass drafts x~_k ~ p_k for the W candidates at once, every p_k conditioned on the
   accepted tokens only (each query attends to the cache and to itself);
2. the verify pass runs the drafts causally along G and gives q_k, the conditional of candidate k
   given the accepted tokens and the drafts before it.
Candidate k is accepted with probability min(1, q_k/p_k); at the first rejection the position is
resampled from normalize(max(0, q - p)). Candidate 0 is always accepted (its q equals p), so every
iteration commits >= 1 token.

mode='jacobi' (exact, one call per iteration: speculative Jacobi decoding). One burst pass drafts
every position; each iteration then runs only the verify pass over the next W drafts, keeps the
draft of candidate k with probability min(1, q_k/pi_k) (pi_k: the distribution it was drawn from)
and otherwise replaces it by a draw from normalize(max(0, q_k - pi_k)). The candidates up to and
including the first replaced one are committed; every later replaced or kept draft stays a draft,
with q_k as its new pi_k. That step is a maximal coupling, so each draft is distributed as its pi
given everything before it, and the next verify pass accepts it exactly as speculative sampling
would. The drafts converge to a fixed point of the verifier, so late iterations commit long runs.
The first drafts are drawn from their distributions truncated to the K = draft_support most
probable tokens (renormalized; acceptance divides by that truncation, so the law stays exact):
the loop state keeps pi densely for the W positions of the window only, float32 [B, W, V], and
the K-token first distributions of the others, [B, N, K].

In both exact modes the committed positions are always the next ones of G, so burst sampling along
G samples exactly the law of `sample_ar(order=G)`: 'random' (the default) is the uniform-random-
order AR law; a fixed order such as 'spread' is the AR law along that order. Which order accepts
most is a property of the model: orders whose consecutive positions lie far apart (spread) make
the drafts of one iteration nearly independent of each other, so more of them are accepted.

The known tokens are prefilled first, as `sample_ar` and `log_prob` feed them (the known-first
convention of `sigma_jax.orders`): for order='random' in a uniformly random order drawn from the
row's key (or ascending, known_order='ascending'); for the fixed kinds in ascending order.

mode='paper' (the published rule, not exact): the candidates are W remaining positions drawn
uniformly at random each iteration; K candidate orders of them share one uniform per candidate;
accept while u < q/p, no residual draw; keep the order that accepted most. It takes
order='random' only. Kept, labelled, to reproduce published step counts.

Every row advances by its own count (no batch minimum); finished rows are masked no-ops (with fixed
shapes they still occupy their batch lane).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp

from sigma_jax.checks import check_choice
from sigma_jax.config import ModelConfig
from sigma_jax.decode import prefill
from sigma_jax.model import check_params, per_layer
from sigma_jax.sampling.burst_steps import BurstState, burst_step, jacobi_init, jacobi_step
from sigma_jax.sampling.call import SamplerCall, SampleStats
from sigma_jax.sampling.inputs import checked_inputs, kernel_inputs
from sigma_jax.sampling.options import (
    BURST_MODES,
    DRAFT_SUPPORT,
    MODES,
    KernelOptions,
    SampleOptions,
    check_options,
    model_calls,
)


def sample_burst(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
                 known: jax.Array, *, mode: str = "exact", order="random", n_orders: int = 5,
                 temperature=1.0, top_k: int | None = None, top_p=None, max_iters=None,
                 window: int | None = None, known_order: str = "random", lengths=None,
                 draft_support: int = DRAFT_SUPPORT, first_drafts: str = "known"
                 ) -> tuple[jax.Array, SampleStats]:
    """Fill every unknown position by burst rejection sampling.

    tokens: int32 [B, N] (values at unknown positions ignored); known: bool [B, N], any subset per
    row (nothing known works through the start token). key: one typed key or one per row [B].
    mode: 'exact', 'jacobi' (both exact) or 'paper' (see the module docstring).
    order: the generation order, as in `sample_ar`: 'random' (the known-first convention: the
    known positions in a uniformly random order from the row's key, or ascending with
    known_order='ascending', then the unknown ones uniformly shuffled), 'left_to_right',
    'fractal', 'spread' (known positions ascending, then the unknown ones in that kind of order;
    see `orders.order_from_mask`) or an explicit int32 [B, N] order (a list or an array) listing
    each row's known positions first. Exact mode samples the AR law along it; paper mode takes
    'random' only.
    n_orders: candidate orders of the paper mode (exact mode verifies one order: more would need
    a multi-draft verifier to stay exact; the other modes take 1 or the default and refuse
    other values).
    window: draft (exact, paper) or verify (jacobi) only the next `window` positions of the
    order per iteration (static; None = all N).
    temperature (>= 0; 0 = greedy), top_p (in (0, 1]) and max_iters (>= 1, default N) are
    traced: changing them never recompiles; top_k (in [1, V]) is static; concrete out-of-range
    values raise ValueError (see `SampleOptions`). The same truncation applies to p and q, so
    exact mode samples the truncated model exactly. lengths: int32 [B] (None: N), each row's
    length: positions past it are absent, neither known nor generated; a row of length L gets the
    tokens of the same row alone at N = L with the same key (paper mode: with a window <= L).
    draft_support (jacobi, static): each first draft is drawn from the draft_support most
    probable tokens of its distribution, renormalized (exact for any value; see `SampleOptions`).
    first_drafts (jacobi, static): 'known' (each row's first drafts given its known tokens) or
    'start' (given the start token alone, drafted once for the batch; exact too; see
    `SampleOptions`).
    Returns (tokens [B, N], SampleStats); rows stopped by max_iters keep unfilled positions at 0
    and report finished=False.
    """
    return sample_burst_call(cfg, params, key, tokens, known, mode=mode, order=order,
                             n_orders=n_orders, temperature=temperature, top_k=top_k,
                             top_p=top_p, max_iters=max_iters, window=window,
                             known_order=known_order, lengths=lengths,
                             draft_support=draft_support, first_drafts=first_drafts)()


def sample_burst_call(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
                      known: jax.Array, *, mode: str = "exact", order="random", lengths=None,
                      **options) -> SamplerCall:
    """`sample_burst`'s arguments checked and prepared, not yet run: a `SamplerCall` (call it to
    sample, `.lower()` to compile ahead of time). options: the other keyword arguments of
    `sample_burst`. Bad input raises ValueError before any work."""
    options, explicit = burst_options(mode, order, **options)
    return prepare_burst(cfg, params, key, tokens, known, options, explicit, lengths)


def burst_options(mode: str = "exact", order="random", **options
                  ) -> tuple[SampleOptions, object | None]:
    """(SampleOptions, explicit order or None) of `sample_burst`'s keyword arguments."""
    check_choice("mode", mode, MODES)
    sampler = next(name for name, m in BURST_MODES.items() if m == mode)
    kind, explicit = (order, None) if isinstance(order, str) else ("random", order)
    return SampleOptions(sampler, order=kind, **options), explicit


def prepare_burst(cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
                  options: SampleOptions, order=None, lengths=None) -> SamplerCall:
    """The `SamplerCall` of a burst sampler with checked `options`, along `options.order` or
    the explicit `order` [B, N], with per-row `lengths` [B] (None: N)."""
    check_options(options, tuple(BURST_MODES))
    check_params(cfg, params)
    tokens, known, order, lengths = checked_inputs(cfg, tokens, known, options, order, lengths)
    keys, order = kernel_inputs(key, tokens, known, options, order, lengths)
    return SamplerCall(_sample_burst,
                       burst_args(cfg, params, keys, tokens, known, order, lengths, options), {})


def burst_args(cfg, params, keys, tokens, known, order, lengths, options: SampleOptions
               ) -> tuple:
    """The arguments of the burst kernel for prepared inputs (keys [B], order int32 [B, N],
    lengths int32 [B])."""
    n = tokens.shape[1]
    return (cfg, params, keys, tokens, known, order, *options.traced_values(n), lengths,
            options.kernel_options(n))


@jax.jit
def _sample_burst(cfg, params, keys, tokens, known, order, temperature, top_p, max_iters,
                  lengths, opts):
    state = start_state(cfg, params, keys, tokens, known, order, lengths, temperature, top_p,
                        opts)
    # The loop carries the weights one buffer per layer (no per-step copies of layer slices).
    layered = per_layer(params)
    state = jax.lax.while_loop(
        lambda s: jnp.any(s.unfilled()) & (s.step < max_iters),
        lambda s: advance(cfg, layered, s, temperature, top_p, opts), state)
    return state.tokens, stats_of(state, known, opts)


def stats_of(state: BurstState, known, opts: KernelOptions) -> SampleStats:
    """The SampleStats of a loop state (known: bool [B, N], the input mask)."""
    return SampleStats(
        iterations=state.iterations,
        generated=(jnp.sum(state.filled, axis=1) - jnp.sum(known, axis=1)).astype(jnp.int32),
        forward_passes=model_calls(opts.mode, state.step).astype(jnp.int32),
        finished=~jnp.any(state.unfilled(), axis=1))


def advance(cfg: ModelConfig, params: dict, state: BurstState, temperature, top_p,
            opts: KernelOptions) -> BurstState:
    """One iteration of opts.mode for every unfinished row (the last pass's cache entries are
    written first)."""
    step = jacobi_step if opts.mode == "jacobi" else burst_step
    return step(cfg, params, state.flushed(), temperature, top_p, opts)


def start_state(cfg: ModelConfig, params: dict, keys, tokens, known, order, lengths,
                temperature, top_p, opts: KernelOptions, first=None) -> BurstState:
    """The loop state before the first iteration: the known tokens prefilled along the generation
    order int32 [B, N] (known positions first) into a cache with room for one W block, and, in
    jacobi mode, the first drafts. keys [B]: the sampling streams of `generation_order`;
    lengths int32 [B]: each row's length. first (jacobi): None, or first distributions at hand
    for the rows' history (`jacobi_init`)."""
    n_known = jnp.sum(known, axis=1).astype(jnp.int32)
    cache, last_tok, last_pos = prefill(cfg, params, tokens, order, n_known,
                                        opts.cache_capacity(cfg, tokens.shape[1]))
    state = BurstState(tokens=tokens, filled=known, order=order, cache=cache,
                       pending=cache.no_entries(opts.window), last_tok=last_tok,
                       last_pos=last_pos, keys=keys,
                       iterations=jnp.zeros(tokens.shape[:1], jnp.int32),
                       step=jnp.zeros((), jnp.int32), lengths=lengths)
    if opts.mode == "jacobi":
        state = jacobi_init(cfg, params, state, temperature, top_p, opts, first)
    return state


_start_jit = jax.jit(start_state)
_advance_jit = jax.jit(advance)


def burst_states(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
                 known: jax.Array, **options) -> Iterator[tuple[BurstState, SampleStats]]:
    """`sample_burst` one iteration at a time, for display and debugging: yields (state, stats)
    before the first iteration and after each, until every row is filled or max_iters
    iterations ran. state.tokens / state.filled [B, N] show the progress; the last yield holds
    what `sample_burst` returns for the same arguments. options: those of `sample_burst`
    (checked the same way, before any work), or `options=` one burst `SampleOptions` (then
    `order=` and `lengths=` may follow). Each iteration is one jitted call and a host sync.
    Bad arguments raise at the call, before the first state is computed.
    """
    if "options" in options:
        extra = sorted(set(options) - {"options", "order", "lengths"})
        if extra:
            raise ValueError(f"burst_states with options= takes only order= and lengths= "
                             f"besides; got {', '.join(extra)} (set them in the options)")
        call = prepare_burst(cfg, params, key, tokens, known, options.pop("options"), **options)
    else:
        call = sample_burst_call(cfg, params, key, tokens, known, **options)
    return _states(*call.args)


def _states(cfg, params, keys, tokens, known, order, temperature, top_p, max_iters, lengths,
            opts) -> Iterator[tuple[BurstState, SampleStats]]:
    state = _start_jit(cfg, params, keys, tokens, known, order, lengths, temperature, top_p, opts)
    yield state, stats_of(state, known, opts)
    while bool(jnp.any(state.unfilled())) and int(state.step) < int(max_iters):
        state = _advance_jit(cfg, params, state, temperature, top_p, opts)
        yield state, stats_of(state, known, opts)
