"""One iteration of each burst sampling mode over the loop state (see `sample_burst` for the
modes and their laws): the state, the exact and paper draft + verify round, and the one-call
jacobi round with its initial drafts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sigma_jax.cache import LayerCaches
from sigma_jax.checks import within_lengths
from sigma_jax.config import START_POS, ModelConfig
from sigma_jax.decode import burst_pass, extend_pass, pass_slots
from sigma_jax.model import head_logits, per_layer
from sigma_jax.sampling.draws import draw, draw_row, in_row_groups, to_probs, uniforms
from sigma_jax.sampling.options import KernelOptions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BurstState:
    """The while-loop carry of burst sampling, positions in position layout."""

    tokens: jax.Array  # int32 [B, N]: known and committed tokens (0 elsewhere)
    filled: jax.Array  # bool [B, N]: known or committed
    order: jax.Array  # int32 [B, N]: the generation order (known first, absent last)
    cache: LayerCaches  # L x [B, H, C, hd]: every accepted entry but the last and `pending`
    pending: tuple  # (k, v [L, B, W, H, hd], n int32 [B]): the last pass's entries to commit
    last_tok: jax.Array  # int32 [B]: the last accepted token, not yet in the cache
    last_pos: jax.Array  # int32 [B]: its position (START_POS for the start token)
    keys: jax.Array  # key [B]: each row's sampling stream
    iterations: jax.Array  # int32 [B]: iterations in which the row was generating
    step: jax.Array  # int32 []: iterations of the whole loop
    lengths: jax.Array  # int32 [B]: each row's length; positions past it are absent
    drafts: jax.Array | None = None  # jacobi: int32 [B, N], every position's current draft
    window_probs: jax.Array | None = None  # jacobi: float32 [B, W, V], what the drafts of the
    #   window (the next W positions of the order, slot j at cursor + j) were drawn from
    first_ids: jax.Array | None = None  # jacobi: int32 [B, N, K], the K tokens of each
    #   position's first distribution (its K most probable, K = draft_support)
    first_probs: jax.Array | None = None  # jacobi: float32 [B, N, K], their probabilities,
    #   renormalized: the distribution each first draft was drawn from

    def flushed(self) -> BurstState:
        """The state with `pending` written to the cache. Each pass writes its entries at the
        start of the next one, before reading the cache: written right after the pass, they
        would make XLA copy the whole cache, which that pass may still be reading."""
        return dataclasses.replace(self, cache=self.cache.write(*self.pending))

    def unfilled(self) -> jax.Array:
        """bool [B, N]: the positions still to generate (neither filled nor past the length)."""
        return ~self.filled & within_lengths(self.lengths, self.filled.shape[1])


def _take(x, idx):  # x [B, W, ...] gathered along axis 1 with idx [B, ...]
    return jnp.take_along_axis(x, idx, axis=1)


def _pick(probs, tok):  # probs [B, ..., V], tok [B, ...] -> probs[tok] [B, ...]
    return jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]


def _accepted_prefix(accept):  # bool [..., W] -> int32 [...]: accepted before the first rejection
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)


def _residual(q, p):
    """normalize(max(0, q - p)) over the last axis; q itself where the two (nearly) agree."""
    residual = jnp.maximum(q - p, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    return jnp.where(mass > 1e-6, residual / jnp.maximum(mass, 1e-30), q)


def _iteration_keys(state: BurstState, count: int):  # count typed keys [B] per iteration
    it_keys = jax.vmap(jax.random.fold_in)(state.keys, state.iterations)
    return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, count))(it_keys), 1, 0)


def _next_in_order(state: BurstState, w: int) -> jax.Array:
    """The next W positions of the generation order, int32 [B, W]: the filled positions are always
    its first ones. Slots past its end wrap around to filled positions, so targets stay distinct
    (slots at or past the row's remaining count are never committed)."""
    n = state.order.shape[1]
    cursor = jnp.sum(state.filled, axis=1, keepdims=True)  # [B, 1]
    return _take(state.order, (cursor + jnp.arange(w)[None, :]) % n)


def _verify(cfg, params, state: BurstState, draft, targets):
    """The causal pass over the drafts along targets: (activations [B, W, D], whose head gives
    the verifier's logits, k_new, v_new)."""
    tok_in = jnp.concatenate([state.last_tok[:, None], draft[:, :-1]], axis=1)
    pos_in = jnp.concatenate([state.last_pos[:, None], targets[:, :-1]], axis=1)
    return extend_pass(cfg, params, state.cache, tok_in, pos_in, targets, head=False)


def _commit(state: BurstState, new_tok, new_pos, n_new, k_new, v_new, **changes) -> BurstState:
    """Write the first n_new [B] of (new_tok, new_pos) [B, W] (their cache entries k_new/v_new)
    and advance the counters of the rows that were still generating."""
    active = jnp.any(state.unfilled(), axis=1)  # [B]
    n_new = jnp.where(active, n_new, 0).astype(jnp.int32)
    commit = within_lengths(n_new, new_tok.shape[1])  # [B, W]
    rows = jnp.arange(new_tok.shape[0])[:, None]
    tokens = state.tokens.at[rows, new_pos].set(
        jnp.where(commit, new_tok, state.tokens[rows, new_pos]))
    filled = state.filled.at[rows, new_pos].set(state.filled[rows, new_pos] | commit)
    last = jnp.maximum(n_new - 1, 0)[:, None]
    return dataclasses.replace(
        state, tokens=tokens, filled=filled, pending=(k_new, v_new, n_new),
        last_tok=jnp.where(n_new > 0, _take(new_tok, last)[:, 0], state.last_tok),
        last_pos=jnp.where(n_new > 0, _take(new_pos, last)[:, 0], state.last_pos),
        iterations=state.iterations + active, step=state.step + 1, **changes)


def burst_step(cfg: ModelConfig, params: dict, state: BurstState, temperature, top_p,
               opts: KernelOptions) -> BurstState:
    """One draft + verify + commit round ('exact' or 'paper') for every unfinished row."""
    n = state.tokens.shape[1]
    w = opts.window
    remaining = state.unfilled()
    n_valid = jnp.minimum(jnp.sum(remaining, axis=1), w)  # candidates that exist per row
    k_order, k_draft, k_accept, k_extra = _iteration_keys(state, 4)
    slot = jnp.arange(w)[None, :]  # [1, W]
    valid = within_lengths(n_valid, w)
    if opts.mode == "exact":
        targets = _next_in_order(state, w)
    else:  # W remaining positions drawn uniformly at random, before any draft
        u_order = uniforms(k_order, (n,))
        targets = jnp.argsort(jnp.where(remaining, u_order, 2.0), axis=1)[:, :w].astype(jnp.int32)

    row_probs = lambda h: _row_probs(cfg, params, h, temperature, top_p, opts)
    row_bytes = 4 * w * cfg.vocab_size

    def drafted(key, h):  # one row: its W drafts and their probabilities
        p = row_probs(h)
        draft = draw_row(key, p)
        return draft, _pick(p, draft)

    h_p = burst_pass(cfg, params, state.cache, state.last_tok, state.last_pos, targets,
                     head=False)  # [B, W, D]
    draft, p_draft = in_row_groups(drafted, row_bytes, k_draft, h_p)  # [B, W]
    u = uniforms(k_accept, (w,))
    if opts.mode == "paper":
        return _commit(state, *_paper_verify(cfg, params, state, targets, draft, p_draft, u,
                                             valid, k_extra, row_probs, opts))
    h_q, k_new, v_new = _verify(cfg, params, state, draft, targets)

    def verified(u, p_draft, draft, valid, h_p, h_q):
        """One row: its accepted drafts, p and q [V] at its first rejection. p is recomputed
        from the burst pass's activations by the computation the drafts were drawn from (the
        same values, bit for bit; a one-position product could round differently)."""
        q = row_probs(h_q)  # [W, V]
        accept = ((u * p_draft < _pick(q, draft)) | (slot[0] == 0)) & valid
        n_acc = _accepted_prefix(accept)
        at = jnp.minimum(n_acc, w - 1)
        return n_acc, row_probs(h_p)[at], q[at]

    n_acc, p_at, q_at = in_row_groups(verified, row_bytes, u, p_draft, draft, valid, h_p, h_q)
    fix = draw(k_extra, _residual(q_at, p_at))  # [B]
    new_tok = jnp.where(slot == n_acc[:, None], fix[:, None], draft)
    return _commit(state, new_tok, targets, n_acc + (n_acc < n_valid), k_new, v_new)


def _paper_verify(cfg, params, state, targets, draft, p_draft, u, valid, key, row_probs, opts):
    """The published rule: K orders of the candidates verified in one pass over the shared cache
    (K independent causal blocks), one uniform per candidate shared by the orders, accept while
    u < q/p (the first always), keep the order with the longest accepted prefix. q of the K x W
    candidates comes per row, in groups of rows (`in_row_groups`): row_probs maps one row's
    activations [K W, D] to its distributions [K W, V]."""
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
    h_q, k_new, v_new = extend_pass(cfg, params, state.cache, tok_in, pos_in,
                                    c_pos.reshape(b, k * w), blocks=k, head=False)
    q_of = lambda h, tok: _pick(row_probs(h), tok)  # one row: q [K W] of its candidates
    q_draft = in_row_groups(q_of, 4 * k * w * cfg.vocab_size, h_q,
                            c_tok.reshape(b, k * w)).reshape(b, k, w)
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


def jacobi_init(cfg: ModelConfig, params: dict, state: BurstState, temperature, top_p,
                opts: KernelOptions, first=None) -> BurstState:
    """Draft every position given the known tokens: each position's distribution truncated to
    its K = min(draft_support, V) most probable tokens, renormalized (first_ids, first_probs
    [B, N, K], `_first_distributions`); then every first draft is drawn from its truncation
    (what acceptance divides by: exact for any K) with one key per row, so a row's drafts do not
    depend on how many rows share the passes. Known positions' drafts are unused.

    opts.first_drafts == 'start': every row is drafted as if it knew nothing (its history the
    start token alone), so the batch shares one set of passes; acceptance divides by what each
    draft was drawn from, so the law is the same.

    first: None, or (ids, probs [N, K], use bool []): the truncated first distributions of every
    row's drafting history, computed before (by these passes, on the same params and sampling
    values); when `use`, they stand in for the passes."""
    b, n = state.tokens.shape
    k = opts.first_support(cfg)
    draft_keys, loop_keys = jnp.moveaxis(jax.vmap(jax.random.split)(state.keys), 1, 0)
    history, shared = (state.cache, state.last_tok, state.last_pos), None
    if opts.first_drafts == "start":  # one history by construction: no need to compare rows
        history, shared = _start_history(cfg, *history), jnp.asarray(True)
    drafted = lambda: _first_distributions(cfg, per_layer(params), *history, n, k, temperature,
                                           top_p, opts, shared)
    if first is None:
        ids, probs = drafted()
    else:
        at_hand = lambda: tuple(jnp.broadcast_to(x, (b, n, k)) for x in first[:2])
        ids, probs = jax.lax.cond(first[2], at_hand, drafted)
    pick = draw(jax.vmap(jax.random.fold_in, (0, None))(draft_keys, 0), probs)  # [B, N]
    state = dataclasses.replace(state, keys=loop_keys, first_ids=ids, first_probs=probs,
                                drafts=jnp.take_along_axis(ids, pick[..., None], -1)[..., 0])
    return dataclasses.replace(state, window_probs=_first_window_probs(
        state, _next_in_order(state, opts.window), cfg.vocab_size))


def _first_distributions(cfg: ModelConfig, layered: dict, cache: LayerCaches, last_tok,
                         last_pos, n: int, k: int, temperature, top_p, opts: KernelOptions,
                         shared=None):
    """(ids int32 [B, N, K], probs float32 [B, N, K]): the K most probable tokens of each of the
    N positions given each row's history (its cache, then last_tok/last_pos [B]), renormalized,
    from burst passes of about decode.PREFILL_TOKENS queries. layered: `per_layer` params.

    When every row has one history (`_one_history`: an unconditional batch, or one prompt fed
    in one order), the rows' passes split the N positions between them, and each position's
    distribution, computed once, serves every row: B times fewer passes, the same values bit
    for bit (a query's result does not depend on the queries beside it). shared: bool [],
    whether they have, when the caller knows; None: `_one_history` compares them."""
    b = last_tok.shape[0]
    chunk = pass_slots(b, n)
    per_row = -(-n // chunk)  # passes that cover the N positions of every row
    if shared is None:
        shared = _one_history(cache, last_tok, last_pos)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]  # [B, 1]

    def one_pass(c, carry):  # row r: positions [s, s + chunk) clamped to N - 1, s its start
        ids, probs = carry
        start = jnp.where(shared, (c * b + rows) * chunk, c * chunk)  # [B, 1]
        targets = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int32)[None, :], n - 1)
        logits = burst_pass(cfg, layered, cache, last_tok, last_pos, targets)
        top, top_ids = jax.lax.top_k(to_probs(logits, temperature, opts.top_k, top_p), k)
        top = top / jnp.sum(top, axis=-1, keepdims=True)  # [B, chunk, K]
        put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, c * chunk, 1)
        return put(ids, top_ids), put(probs, top)

    init = (jnp.zeros((b, per_row * chunk, k), jnp.int32),
            jnp.zeros((b, per_row * chunk, k), jnp.float32))
    passes = jnp.where(shared, -(-per_row // b), per_row)
    ids, probs = jax.lax.fori_loop(0, passes, one_pass, init)
    at = jnp.arange(n)  # shared: position p lies at row (p // chunk) % B of pass p // (B chunk)
    src_row, src_slot = (at // chunk) % b, (at // (b * chunk)) * chunk + at % chunk
    spread = lambda x: jnp.where(shared, x[src_row, src_slot][None], x[:, :n])
    return spread(ids), spread(probs)


def _start_history(cfg: ModelConfig, cache: LayerCaches, last_tok, last_pos):
    """(cache, last_tok, last_pos) of rows that know nothing: no valid entry, then the start
    token at the start position (the cache's buffers are kept; only its lengths are zeroed)."""
    empty = dataclasses.replace(cache, length=jnp.zeros_like(cache.length))
    return (empty, jnp.full_like(last_tok, cfg.bos_id), jnp.full_like(last_pos, START_POS))


def _one_history(cache: LayerCaches, last_tok, last_pos) -> jax.Array:
    """bool []: every row's history is row 0's, bit for bit: its cached entries (the valid
    slots of every layer), then its last token and position."""
    same = lambda x: jnp.all(x == x[:1])
    valid = cache.valid()[:, None, :, None]  # [B, 1, S, 1]
    entries = [same(jnp.where(valid, x, jnp.zeros((), x.dtype))) for x in (*cache.k, *cache.v)]
    return jnp.all(jnp.stack([same(cache.length), same(last_tok), same(last_pos), *entries]))


def _first_window_probs(state: BurstState, targets, v: int) -> jax.Array:
    """float32 [B, W, V]: the first distributions of the positions targets [B, W], dense."""
    ids, probs = _take(state.first_ids, targets[..., None]), _take(state.first_probs,
                                                                   targets[..., None])
    return jax.vmap(_dense_first, (0, 0, None))(ids, probs, v)


def _dense_first(ids, probs, v: int) -> jax.Array:
    """float32 [W, V]: W first distributions, their K tokens ids and probabilities [W, K]."""
    return jnp.zeros((ids.shape[0], v), jnp.float32).at[
        jnp.arange(ids.shape[0])[:, None], ids].set(probs)


def _row_probs(cfg: ModelConfig, params: dict, h, temperature, top_p, opts: KernelOptions):
    """One row's sampling distributions [W, V] from its pass activations h [W, D]."""
    return to_probs(head_logits(cfg, params, h[None])[0], temperature, opts.top_k, top_p)


def jacobi_step(cfg: ModelConfig, params: dict, state: BurstState, temperature, top_p,
                opts: KernelOptions) -> BurstState:
    """One verify pass over the next W drafts; commit up to the first replaced one; keep the rest
    (coupled to the verifier's conditionals, which become their distributions) as drafts. The
    window then slides past the committed positions: the positions entering it bring their
    first distributions. Everything after the pass is per row, in groups of rows
    (`in_row_groups`): only the window's distributions are ever [B, W, V]."""
    w, n = opts.window, state.tokens.shape[1]
    unfilled = state.unfilled()
    n_valid = jnp.minimum(jnp.sum(unfilled, axis=1), w)  # [B]
    active = jnp.any(unfilled, axis=1)  # [B]: rows still generating commit, the others do not
    cursor = jnp.sum(state.filled, axis=1)  # [B]
    k_accept, k_extra = _iteration_keys(state, 2)
    targets = _next_in_order(state, w)
    draft = _take(state.drafts, targets)  # [B, W]
    h_q, k_new, v_new = _verify(cfg, params, state, draft, targets)  # [B, W, D]
    slot = jnp.arange(w)

    def row(pi, h, draft, u, key, n_valid, active, cursor, order, first_ids, first_probs):
        """One row: (its coupled drafts [W], tokens committed, the next window's probs [W, V])."""
        q = _row_probs(cfg, params, h, temperature, top_p, opts)
        keep = u * _pick(pi, draft) < _pick(q, draft)
        coupled = jnp.where(keep, draft, draw_row(key, _residual(q, pi)))  # each ~ q
        valid = slot < n_valid
        n_new = jnp.where(active, jnp.minimum(_accepted_prefix(keep & valid) + 1, n_valid), 0)
        src = slot + n_new  # each slot of the slid window: its old slot, or >= W (entering)
        kept = jnp.where(valid[:, None], q, pi)[jnp.minimum(src, w - 1)]
        entering = order[(cursor + src) % n]  # the positions that enter the window
        first = _dense_first(first_ids[entering], first_probs[entering], cfg.vocab_size)
        return coupled, n_new, jnp.where((src < w)[:, None], kept, first)

    coupled, n_new, window = in_row_groups(
        row, 4 * w * cfg.vocab_size, state.window_probs, h_q, draft, uniforms(k_accept, (w,)),
        k_extra, n_valid, active, cursor, state.order, state.first_ids, state.first_probs)
    rows = jnp.arange(draft.shape[0])[:, None]
    valid = within_lengths(n_valid, w)
    drafts = state.drafts.at[rows, targets].set(jnp.where(valid, coupled, draft))
    return _commit(state, coupled, targets, n_new, k_new, v_new, drafts=drafts,
                   window_probs=window)
