"""Burst sampling: many tokens per model call with a token-based rejection sampler.

Each iteration makes two model calls over the one KV cache:
1. the burst pass drafts x~_k ~ p_k for W remaining positions at once, every p_k conditioned on the
   accepted tokens only (each query attends to the cache and to itself);
2. the verify pass runs the drafts causally in a candidate order and gives q_k, the conditional of
   position k given the accepted tokens and the drafts before it.

mode='exact' (speculative sampling inside one any-order model): one order of the remaining
positions is drawn before any draft is seen; candidate k is accepted with probability
min(1, q_k/p_k); at the first rejection the position is resampled from normalize(max(0, q - p)).
Candidate 0 is always accepted (its q equals p), so every iteration commits >= 1 token. Samples
follow exactly the law of `sample_ar(order='random')` (the uniform-random-order AR law).

The known tokens are prefilled by the known-first convention of `sigma_jax.orders`, as
`sample_ar(order='random')` and `log_prob` feed them: in a uniformly random order drawn from the
row's key (or ascending, known_order='ascending'). Exact mode then samples the random-order AR law
given that order, so over keys both samplers draw from the same mixture over the known orders.

mode='paper' (the published rule, not exact): K candidate orders share one uniform per candidate;
accept while u < q/p, no residual draw; keep the order that accepted most. Kept, labelled, to
reproduce published step counts.

Every row advances by its own count (no batch minimum); finished rows are masked no-ops (with fixed
shapes they still occupy their batch lane).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sigma_jax.cache import KVCache, write
from sigma_jax.config import ModelConfig
from sigma_jax.decode import burst_pass, cache_capacity, extend_pass, prefill
from sigma_jax.orders import random_order
from sigma_jax.sampling import (
    SamplerCall,
    SampleStats,
    check_sampler_inputs,
    draw,
    row_keys,
    scalar,
    to_probs,
    truncation_options,
    uniforms,
)

MODES = ("exact", "paper")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BurstState:
    """The while-loop carry. tokens/filled: [B, N] in position layout; last_tok/last_pos [B]: the
    last accepted (token, position), not yet in the cache; iterations [B]; step: int32[]."""

    tokens: jax.Array
    filled: jax.Array
    cache: KVCache
    last_tok: jax.Array
    last_pos: jax.Array
    keys: jax.Array
    iterations: jax.Array
    step: jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BurstOptions:
    """Static choices of the kernel (each value compiles once)."""

    mode: str
    window: int
    n_orders: int
    top_k: int | None
    known_order: str = "random"


def _check_options(mode, n_orders, window, n):
    if mode not in MODES:
        raise ValueError(f"mode must be 'exact' or 'paper'; got {mode!r}")
    if not isinstance(n_orders, int) or n_orders < 1:
        raise ValueError(f"n_orders must be a positive integer; got {n_orders!r}")
    if window is not None and (not isinstance(window, int) or not 1 <= window <= n):
        raise ValueError(f"window must be None or an integer in [1, {n}]; got {window!r}")


def sample_burst(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
                 known: jax.Array, *, mode: str = "exact", n_orders: int = 5, temperature=1.0,
                 top_k: int | None = None, top_p=None, max_iters=None,
                 window: int | None = None, known_order: str = "random"
                 ) -> tuple[jax.Array, SampleStats]:
    """Fill every unknown position by burst rejection sampling.

    tokens: int32 [B, N] (values at unknown positions ignored); known: bool [B, N], any subset per
    row (nothing known works through the start token). key: one typed key or one per row [B].
    The known tokens are prefilled in the known-first convention (`orders.random_order`): a
    uniformly random order from the row's key, or ascending with known_order='ascending'.
    mode: 'exact' or 'paper' (see the module docstring). n_orders: candidate orders of the paper
    mode (exact mode uses one order: more would need a multi-draft verifier to stay exact).
    window: draft only the next `window` positions of a random order (static; None = all N).
    temperature (>= 0; 0 = greedy), top_p (in (0, 1]) and max_iters (default N) are traced:
    changing them never recompiles; top_k (in [1, V]) is static; concrete out-of-range values
    raise ValueError. The same truncation applies to p and q, so exact mode samples the truncated
    model exactly. Returns (tokens [B, N], SampleStats); rows stopped by max_iters keep unfilled
    positions at 0 and report finished=False.
    """
    return sample_burst_call(cfg, params, key, tokens, known, mode=mode, n_orders=n_orders,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             max_iters=max_iters, window=window, known_order=known_order)()


def sample_burst_call(cfg: ModelConfig, params: dict, key: jax.Array, tokens: jax.Array,
                      known: jax.Array, *, mode: str = "exact", n_orders: int = 5,
                      temperature=1.0, top_k: int | None = None, top_p=None, max_iters=None,
                      window: int | None = None, known_order: str = "random") -> SamplerCall:
    """`sample_burst`'s arguments checked and prepared, not yet run: a `SamplerCall` (call it to
    sample, `.lower()` to compile ahead of time). Bad input raises ValueError before any work."""
    known = jnp.asarray(known, bool)
    tokens = jnp.where(known, jnp.asarray(tokens, jnp.int32), 0)
    check_sampler_inputs(cfg, tokens, known, known_order=known_order)
    n = tokens.shape[1]
    _check_options(mode, n_orders, window, n)
    temperature, top_k, top_p = truncation_options(cfg, temperature, top_k, top_p)
    opts = BurstOptions(mode=mode, window=window or n, n_orders=n_orders if mode == "paper" else 1,
                        top_k=top_k, known_order=known_order)
    keys = row_keys(key, tokens.shape[0])
    max_iters = scalar(n if max_iters is None else max_iters, jnp.int32, "max_iters")
    args = (cfg, params, keys, tokens, known, temperature, top_p, max_iters, opts)
    return SamplerCall(_sample_burst, args, {})


@jax.jit
def _sample_burst(cfg, params, keys, tokens, known, temperature, top_p, max_iters, opts):
    state = init_state(cfg, params, keys, tokens, known, opts)
    n_known = jnp.sum(known, axis=1).astype(jnp.int32)

    def cond(s):
        return jnp.any(~jnp.all(s.filled, axis=1)) & (s.step < max_iters)

    state = jax.lax.while_loop(
        cond, lambda s: burst_step(cfg, params, s, temperature, top_p, opts), state)
    return state.tokens, SampleStats(
        iterations=state.iterations,
        generated=jnp.sum(state.filled, axis=1).astype(jnp.int32) - n_known,
        forward_passes=1 + 2 * state.step,
        finished=jnp.all(state.filled, axis=1),
    )


def init_state(cfg: ModelConfig, params: dict, keys, tokens, known, opts: BurstOptions):
    """Prefill the known tokens, in the known-first convention drawn from each row's key, into a
    cache with room for one W block. keys [B]: split into the order stream and the loop's."""
    n = tokens.shape[1]
    n_known = jnp.sum(known, axis=1).astype(jnp.int32)
    capacity = cache_capacity(cfg, n, headroom=opts.window)
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]
    order = random_order(split[:, 0], known, known_order=opts.known_order)  # [B, N]
    cache, last_tok, last_pos = prefill(cfg, params, tokens, order, n_known, capacity)
    return BurstState(tokens=tokens, filled=known, cache=cache, last_tok=last_tok,
                      last_pos=last_pos, keys=split[:, 1],
                      iterations=jnp.zeros(tokens.shape[:1], jnp.int32),
                      step=jnp.zeros((), jnp.int32))


def _take(x, idx):  # x [B, W, ...] gathered along axis 1 with idx [B, ...]
    return jnp.take_along_axis(x, idx, axis=1)


def _pick(probs, tok):  # probs [B, ..., V], tok [B, ...] -> probs[tok] [B, ...]
    return jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]


def _accepted_prefix(accept):  # bool [..., W] -> int32 [...]: accepted before the first rejection
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)


def burst_step(cfg: ModelConfig, params: dict, state: BurstState, temperature, top_p,
               opts: BurstOptions) -> BurstState:
    """One draft + verify + commit round for every row that still has unknown positions."""
    b, n = state.tokens.shape
    w = opts.window
    remaining = ~state.filled
    active = jnp.any(remaining, axis=1)  # [B]
    n_valid = jnp.minimum(jnp.sum(remaining, axis=1), w)  # candidates that exist per row
    it_keys = jax.vmap(jax.random.fold_in)(state.keys, state.iterations)
    k_order, k_draft, k_accept, k_extra = jnp.moveaxis(jax.vmap(
        lambda k: jax.random.split(k, 4))(it_keys), 1, 0)

    # A uniformly random order of the remaining positions, drawn before any draft: [B, W].
    u_order = uniforms(k_order, (n,))
    targets = jnp.argsort(jnp.where(remaining, u_order, 2.0), axis=1)[:, :w].astype(jnp.int32)
    slot = jnp.arange(w)[None, :]  # [1, W]
    valid = slot < n_valid[:, None]

    probs = lambda logits: to_probs(logits, temperature, opts.top_k, top_p)
    p = probs(burst_pass(cfg, params, state.cache, state.last_tok, state.last_pos, targets))
    draft = draw(k_draft, p)  # [B, W]
    u = uniforms(k_accept, (w,))
    p_draft = _pick(p, draft)

    if opts.mode == "exact":
        tok_in = jnp.concatenate([state.last_tok[:, None], draft[:, :-1]], axis=1)
        pos_in = jnp.concatenate([state.last_pos[:, None], targets[:, :-1]], axis=1)
        logits_q, k_new, v_new = extend_pass(cfg, params, state.cache, tok_in, pos_in, targets)
        q = probs(logits_q)  # [B, W, V]
        accept = ((u * p_draft < _pick(q, draft)) | (slot == 0)) & valid
        n_acc = _accepted_prefix(accept)  # [B]
        rejected = n_acc < n_valid
        at = jnp.minimum(n_acc, w - 1)[:, None]
        q_at, p_at = _take(q, at[..., None])[:, 0], _take(p, at[..., None])[:, 0]  # [B, V]
        residual = jnp.maximum(q_at - p_at, 0.0)
        mass = jnp.sum(residual, axis=-1, keepdims=True)
        residual = jnp.where(mass > 1e-6, residual / jnp.maximum(mass, 1e-30), q_at)
        fix = draw(k_extra, residual)  # [B]
        new_tok = jnp.where(slot == n_acc[:, None], fix[:, None], draft)
        new_pos = targets
        n_new = n_acc + rejected
    else:
        new_tok, new_pos, n_new, k_new, v_new = _paper_verify(
            cfg, params, state, targets, draft, p_draft, u, valid, k_extra, probs, opts)

    n_new = jnp.where(active, n_new, 0).astype(jnp.int32)
    commit = slot < n_new[:, None]  # [B, W]
    rows = jnp.arange(b)[:, None]
    tokens = state.tokens.at[rows, new_pos].set(
        jnp.where(commit, new_tok, state.tokens[rows, new_pos]))
    filled = state.filled.at[rows, new_pos].set(state.filled[rows, new_pos] | commit)
    last = jnp.maximum(n_new - 1, 0)[:, None]
    return BurstState(
        tokens=tokens,
        filled=filled,
        cache=write(state.cache, k_new, v_new, n_new),
        last_tok=jnp.where(n_new > 0, _take(new_tok, last)[:, 0], state.last_tok),
        last_pos=jnp.where(n_new > 0, _take(new_pos, last)[:, 0], state.last_pos),
        keys=state.keys,
        iterations=state.iterations + active,
        step=state.step + 1,
    )


def _paper_verify(cfg, params, state, targets, draft, p_draft, u, valid, key, probs, opts):
    """The published rule: K orders of the candidates verified in one pass over the shared cache
    (K independent causal blocks), one uniform per candidate shared by the orders, accept while
    u < q/p (the first always), keep the order with the longest accepted prefix."""
    b, w = draft.shape
    k = opts.n_orders
    u_perm = jax.vmap(lambda kk: jax.random.uniform(kk, (k, w)))(key)  # [B, K, W]
    last = 2.0 + jnp.arange(w)[None, None, :]  # invalid candidates stay at the end, in order
    perm = jnp.argsort(jnp.where(valid[:, None, :], u_perm, last), axis=-1)
    gather = lambda x: jnp.take_along_axis(x[:, None, :], perm, axis=-1)  # [B, W] -> [B, K, W]
    c_tok, c_pos, c_p, c_u, c_valid = (gather(x) for x in (draft, targets, p_draft, u, valid))
    last_tok = jnp.broadcast_to(state.last_tok[:, None, None], (b, k, 1))
    last_pos = jnp.broadcast_to(state.last_pos[:, None, None], (b, k, 1))
    tok_in = jnp.concatenate([last_tok, c_tok[..., :-1]], axis=-1).reshape(b, k * w)
    pos_in = jnp.concatenate([last_pos, c_pos[..., :-1]], axis=-1).reshape(b, k * w)
    logits_q, k_new, v_new = extend_pass(cfg, params, state.cache, tok_in, pos_in,
                                         c_pos.reshape(b, k * w), blocks=k)
    q_draft = _pick(probs(logits_q).reshape(b, k, w, -1), c_tok)  # [B, K, W]
    first = jnp.arange(w)[None, None, :] == 0
    accept = ((c_u * c_p < q_draft) | first) & c_valid
    n_acc = _accepted_prefix(accept)  # [B, K]
    best = jnp.argmax(n_acc, axis=1)  # [B]
    pick = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)[:, 0]
    n_layer, _, _, h, hd = k_new.shape
    block = lambda kv: jnp.take_along_axis(kv.reshape(n_layer, b, k, w, h, hd),
                                           best[None, :, None, None, None, None], axis=2)[:, :, 0]
    n_new = jnp.take_along_axis(n_acc, best[:, None], axis=1)[:, 0]
    return pick(c_tok), pick(c_pos), n_new, block(k_new), block(v_new)

