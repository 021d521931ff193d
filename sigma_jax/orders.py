"""Generation orders, permutations, teacher-forced batches and the order curriculum.

An order is int32 [B, N]: order[b, t] is the position generated at step t of row b. Orders built
from a `known` mask (bool [B, N], True = known/conditioning) put the known positions first, per row,
so rows may know different numbers of tokens at arbitrary (non-prefix) positions.

The known-first convention. Whenever a random order conditions on known tokens — sample_ar with
order='random', sample_burst (both modes), log_prob and conditionals without an explicit order —
the order comes from `random_order`: the known positions first, in a uniformly random order drawn
from the caller's key (known_order='random', the default), then the unknown ones in a uniformly
random order. A σ-GPT is not order-consistent, so the order in which the known tokens are fed
changes the law; a model trained on uniformly random orders saw every order of a conditioning set
equally often, so the law of the samplers is the average over those orders (for sample_ar and
exact burst: the uniform-random-order AR law given the known set, averaged over the known orders).
known_order='ascending' feeds them in index order instead, as a model trained with
keep_prompt_first saw its prompt; all four functions take the option and mean the same law by it.
The fixed kinds (left_to_right, fractal, spread) list the known positions ascending.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.checks import (
    bool_mask,
    check_bool,
    check_int,
    check_key,
    check_scalar_int,
    is_concrete,
    permutation_rows,
    row_lengths,
    token_ids,
)
from sigma_jax.config import START_POS, parse_order_policy
from sigma_jax.sharding import constrain

ORDER_KINDS = ("left_to_right", "random", "fractal", "spread")
KNOWN_ORDERS = ("random", "ascending")  # how random orders list the known positions


# ---------------------------------------------------------------- fractal (bisection) orders


def fractal_order(n: int, *, last_first: bool = False) -> np.ndarray:
    """The published breadth-first bisection order of range(n), as int32 [n].

    Pop [a, b) from a FIFO queue, emit h = (a + b) // 2, then enqueue the two halves: right then
    left after an even number of emitted nodes, left then right after an odd number.
    `last_first=True` is the published non-text variant: n - 1 first, then bisect [0, n - 1).
    n: an integer >= 0.
    """
    n = check_int("n", n, 0)
    if last_first and n > 0:
        return np.concatenate([[n - 1], fractal_order(n - 1)]).astype(np.int32)
    out, queue = [], [(0, n)]
    while queue:
        a, b = queue.pop(0)
        if a >= b:
            continue
        h = (a + b) // 2
        halves = [(h + 1, b), (a, h)] if len(out) % 2 == 0 else [(a, h), (h + 1, b)]
        out.append(h)
        queue.extend(halves)
    return np.asarray(out, np.int32)


@functools.lru_cache(maxsize=16)
def _fractal_rank_table(n: int) -> np.ndarray:
    """int32 [n + 1, n]: row r, column i = the step at which F(r) emits i (for i < r)."""
    table = np.zeros((n + 1, n), np.int32)
    for r in range(n + 1):
        table[r, fractal_order(r)] = np.arange(r, dtype=np.int32)
    return table


def bit_reversed_rank(n: int) -> np.ndarray:
    """int32 [n]: the rank of each position i in range(n) sorted by its bit-reversed index
    (the van der Corput radical inverse of i), e.g. n = 8: 0, 4, 2, 6, 1, 5, 3, 7 first.
    n: an integer >= 0."""
    return _bit_reversed_rank(check_int("n", n, 0))


@functools.lru_cache(maxsize=16)
def _bit_reversed_rank(n: int) -> np.ndarray:
    bits = max(1, (n - 1).bit_length())
    reversed_index = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]
    return np.argsort(np.argsort(reversed_index)).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _bit_reversed_rank_table(n: int) -> np.ndarray:
    """int32 [n + 1, n]: row l = `bit_reversed_rank(l)` (0 past l)."""
    table = np.zeros((n + 1, n), np.int32)
    for length in range(1, n + 1):
        table[length, :length] = _bit_reversed_rank(length)
    return table


def spread_known_first(known: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Known positions ascending, then the unknown ones farthest-first: int32 [B, N].

    Each next position is the unknown one farthest from every position placed so far (the known
    ones and the two virtual positions -1 and L at the ends), ties broken by `bit_reversed_rank`.
    With nothing known this bisects the sequence (N = 8: 4, 2, 6, 0, 1, 5, 3, 7); with known
    tokens it fills the middle of the widest gap first. Consecutive positions of the order lie far
    apart, so the drafts of one burst iteration are nearly independent and are accepted most.
    known: bool [B, N], N >= 1 (lists accepted). lengths: integer [B] in [1, N] (None: N);
    positions >= a row's length are absent and come last, ascending, and the row's first L steps
    are its order at N = L. Shapes and dtypes are checked always, lengths' values (and known
    False past them) when concrete.
    """
    return _spread_known_first(*_checked_mask(known, lengths))


@jax.jit
def _spread_known_first(known, lengths):
    b, n = known.shape
    pos = jnp.arange(n, dtype=jnp.int32)[None, :]  # [1, N]
    absent = _absent(known, lengths)
    tie = jnp.asarray(_bit_reversed_rank_table(n))[
        jnp.full((b,), n, jnp.int32) if lengths is None else lengths]  # [B, N]
    wall = known | absent  # a row's end acts as a known position

    # Distances to the nearest known position (or virtual end) on the left and on the right.
    left = pos - jax.lax.cummax(jnp.where(known, pos, -1), axis=1)
    flipped = jax.lax.cummax(jnp.flip(jnp.where(wall, n - 1 - pos, -1), 1), axis=1)
    right = n - 1 - jnp.flip(flipped, 1) - pos
    dist = jnp.where(wall, -1, jnp.minimum(left, right))  # [B, N]; -1 = already placed

    def place(t, carry):
        dist, step = carry
        best = jnp.max(dist, axis=1, keepdims=True)  # [B, 1]
        pick = jnp.argmin(jnp.where(dist == best, tie, n), axis=1)[:, None]  # [B, 1]
        hit = (pos == pick) & (best >= 0)
        step = jnp.where(hit, t, step)
        dist = jnp.where(hit, -1, jnp.minimum(dist, jnp.abs(pos - pick)))
        return dist, step

    _, step = jax.lax.fori_loop(0, n, place, (dist, jnp.zeros((b, n), jnp.int32)))
    return _order_from_keys(jnp.where(known, pos - n, jnp.where(absent, n + pos, step)))


def _absent(known: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """bool [B, N]: positions at or past each row's length (all False for lengths None)."""
    if lengths is None:
        return jnp.zeros(known.shape, bool)
    return jnp.arange(known.shape[-1])[None, :] >= lengths[:, None]


# ---------------------------------------------------------------- orders from masks


def left_to_right(batch: int, n: int) -> jax.Array:
    """arange(n) for every row: int32 [batch, n] (batch >= 0 and n >= 1 integers)."""
    batch, n = check_int("batch", batch, 0), check_int("n", n, 1)
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


def _order_from_keys(keys: jax.Array) -> jax.Array:
    return jnp.argsort(keys, axis=-1, stable=True).astype(jnp.int32)


def _checked_mask(known, lengths) -> tuple:
    """(known as a bool [B, N] array with N >= 1, lists accepted; lengths None or int32 [B] in
    [1, N]: `checks.row_lengths`), after a one-line ValueError for a known position at or past
    its row's length (values checked when concrete)."""
    known = bool_mask(known)
    if known.ndim != 2 or known.shape[1] < 1:
        raise ValueError(f"known must be a bool [B, N] mask with N >= 1; got shape "
                         f"{tuple(known.shape)}")
    if lengths is None:
        return known, None
    lengths = row_lengths(lengths, known.shape)
    if is_concrete(known, lengths):
        past = np.asarray(known) & (np.arange(known.shape[1]) >= np.asarray(lengths)[:, None])
        if past.any():
            row, pos = (int(i) for i in np.argwhere(past)[0])
            raise ValueError(f"known must be False at and past each row's length; row {row} "
                             f"(length {int(lengths[row])}) knows position {pos}")
    return known, lengths


def random_order(key: jax.Array, known: jax.Array, *, known_order: str = "random",
                 lengths: jax.Array | None = None) -> jax.Array:
    """The known-first order of the convention (module docstring): int32 [B, N].

    The known positions of each row come first, in a uniformly random order (known_order='random')
    or ascending (known_order='ascending'); then its unknown positions in a uniformly random order.
    key: one typed key for the batch, or one per row ([B]; row b then depends only on key[b]).
    known: bool [B, N], N >= 1. lengths: integer [B] in [1, N] (None: N); positions >= a row's
    length are absent and come last, ascending. With one key per row (or B = 1), a row's first L
    steps are its order at N = L: the uniforms of threefry's partitionable mode do not depend on
    the trailing length. Shapes, dtypes and the key are checked always, lengths' values (and
    known False past them) when concrete.
    """
    check_known_order(known_order)
    known, lengths = _checked_mask(known, lengths)
    check_key(key, rows=known.shape[0])
    return _random_order(key, known, known_order=known_order, lengths=lengths)


@functools.partial(jax.jit, static_argnames="known_order")
def _random_order(key, known, *, known_order, lengths):
    if key.ndim == 1:  # one key per row
        one_row = lambda k, kn, ln: _random_order(k, kn[None], known_order=known_order,
                                                  lengths=ln[None])[0]
        rows = _full_lengths(known) if lengths is None else lengths
        return jax.vmap(one_row)(key, known, rows)
    u = jax.random.uniform(key, known.shape)  # [B, N]
    first = jnp.arange(known.shape[-1]) / known.shape[-1] if known_order == "ascending" else u
    absent_last = 4.0 + jnp.arange(known.shape[-1])  # [N]
    return _order_from_keys(jnp.where(known, first, jnp.where(_absent(known, lengths),
                                                              absent_last, 2.0 + u)))


def _full_lengths(known: jax.Array) -> jax.Array:
    return jnp.full(known.shape[:1], known.shape[-1], jnp.int32)


def check_known_order(known_order: str) -> None:
    """A one-line ValueError unless known_order is one of KNOWN_ORDERS."""
    if known_order not in KNOWN_ORDERS:
        raise ValueError(f"known_order must be one of {', '.join(map(repr, KNOWN_ORDERS))}; "
                         f"got {known_order!r}")


def check_explicit_known_order(known_order: str) -> None:
    """One-line ValueError for a known_order other than the default 'random' beside an explicit
    order: the order lists the known positions itself, so the option would be ignored."""
    if known_order != "random":
        raise ValueError(f"known_order applies to the orders a sampler draws: an explicit order "
                         f"lists the known positions in its own order; drop known_order="
                         f"{known_order!r} or the explicit order")


def ordered_known_first(known: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Known positions ascending, then unknown positions ascending, then the absent ones past
    each row's length: int32 [B, N]. known: bool [B, N], N >= 1 (lists accepted); lengths:
    integer [B] in [1, N] or None (N). Shapes and dtypes are checked always, lengths' values
    (and known False past them) when concrete."""
    return _ordered_known_first(*_checked_mask(known, lengths))


def _ordered_known_first(known, lengths):
    n = known.shape[-1]
    idx = jnp.arange(n)
    return _order_from_keys(jnp.where(known, idx, jnp.where(_absent(known, lengths), 2 * n + idx,
                                                            n + idx)))


def fractal_known_first(known: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Known positions ascending, then the R_b unknown positions in the order F(R_b) applied to
    their sorted indices (per row), then the absent positions past each row's length, ascending:
    int32 [B, N]. known: bool [B, N], N >= 1 (lists accepted); lengths: integer [B] in [1, N] or
    None (N). Shapes and dtypes are checked always, lengths' values (and known False past them)
    when concrete."""
    return _fractal_known_first(*_checked_mask(known, lengths))


@jax.jit
def _fractal_known_first(known, lengths):
    n = known.shape[-1]
    table = jnp.asarray(_fractal_rank_table(n))  # [N + 1, N]
    absent = _absent(known, lengths)
    unknown = ~known & ~absent
    rank = jnp.cumsum(unknown, axis=-1) - 1  # rank of each unknown among the row's unknowns
    n_unknown = jnp.sum(unknown, axis=-1)  # [B]
    step = table[n_unknown[:, None], jnp.clip(rank, 0, n - 1)]  # [B, N]
    return _order_from_keys(jnp.where(known, jnp.arange(n) - n,
                                      jnp.where(absent, n + jnp.arange(n), step)))


def order_from_mask(kind: str, known: jax.Array, key: jax.Array | None = None, *,
                    known_order: str = "random", lengths: jax.Array | None = None) -> jax.Array:
    """Known positions first, then the unknown ones in the named kind of order (per row).

    kind: 'left_to_right' (both groups ascending), 'random' (`random_order`: the known group as
    `known_order` says, the unknown one shuffled; needs a key, one or one per row) or 'fractal'
    (known ascending, unknown in bisection order) or 'spread' (known ascending, unknown
    farthest-first: `spread_known_first`). known: bool [B, N], N >= 1. lengths: integer [B] in
    [1, N] (None: every row has length N): the positions at or past a row's length are absent
    (known must be False there: a one-line ValueError when concrete); they come last,
    ascending, and the first L steps of a row are its order at N = L.
    """
    if kind not in ORDER_KINDS:
        raise ValueError(f"order must be one of {', '.join(ORDER_KINDS)}; got {kind!r}")
    known, lengths = _checked_mask(known, lengths)
    if kind == "random":
        if key is None:
            raise ValueError("order 'random' needs a PRNG key")
        return random_order(key, known, known_order=known_order, lengths=lengths)
    if kind == "left_to_right":
        return _ordered_known_first(known, lengths)
    if kind == "fractal":
        return _fractal_known_first(known, lengths)
    return _spread_known_first(known, lengths)


# ---------------------------------------------------------------- permutations


def _rows_like(x, name: str, order) -> jax.Array:
    """x as an array of shape [B, N, ...], with [B, N] the shape of `order` (lists accepted)."""
    x = x if hasattr(x, "shape") else np.asarray(x)
    if x.ndim < 2 or x.shape[:2] != order.shape:
        raise ValueError(f"{name} must be [B, N, ...] with [B, N] = {list(order.shape)}, the "
                         f"shape of order; got shape {tuple(x.shape)}")
    return x


def permute(x: jax.Array, order: jax.Array) -> jax.Array:
    """Gather along axis 1: out[b, t, ...] = x[b, order[b, t], ...]. x [B, N, ...]; order integer
    [B, N], each row a permutation of range(N) (checked when concrete)."""
    order = permutation_rows(order)
    return _permute(_rows_like(x, "x", order), order)


def _permute(x, order):
    idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def inverse(order: jax.Array) -> jax.Array:
    """The inverse permutation per row: inverse(order)[b, order[b, t]] = t. order: integer
    [B, N], each row a permutation of range(N) (checked when concrete)."""
    return _inverse(permutation_rows(order))


def _inverse(order):
    b, n = order.shape
    steps = jnp.broadcast_to(jnp.arange(n, dtype=order.dtype), (b, n))
    return jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(steps)


def unpermute(xs: jax.Array, order: jax.Array) -> jax.Array:
    """Scatter along axis 1: out[b, order[b, t], ...] = xs[b, t, ...] (the inverse of permute).
    xs [B, N, ...]; order integer [B, N], each row a permutation of range(N) (checked when
    concrete)."""
    order = permutation_rows(order)
    return _permute(_rows_like(xs, "xs", order), _inverse(order))


# ---------------------------------------------------------------- teacher-forced batches


def make_batch(tokens: jax.Array, order: jax.Array, *, bos: bool, bos_id: int | None = None):
    """Training inputs for a batch of sequences read in the given order.

    tokens, order: integer [B, N], N >= 1, each row of order a permutation of range(N) (checked
    when concrete); bos: True or False; bos_id: an integer >= 0 that fits tokens' dtype (needed
    with bos=True, ignored without). Returns (inputs, pos_in, pos_out, targets), each int32 [B, T]:
      bos=True:  T = N, inputs = [BOS, s_0..s_{N-2}], pos_in = [start, o_0..o_{N-2}],
                 pos_out = o, targets = s (every token is predicted);
      bos=False: T = N - 1, inputs = s[:-1], pos_in = o[:-1], pos_out = o[1:], targets = s[1:]
                 (the published text convention: the first token is never predicted).
    where s = permute(tokens, order). Slot t predicts the token at position pos_out[t].
    """
    check_bool("bos", bos)
    tokens, order = token_ids(tokens), permutation_rows(order)
    if tokens.shape != order.shape or order.shape[1] < 1:
        raise ValueError(f"tokens and order must both be [B, N] with N >= 1; got shapes "
                         f"{tuple(tokens.shape)} and {tuple(order.shape)}")
    if not bos:
        return _make_batch(tokens, order, bos=False, bos_id=None)
    if bos_id is None:
        raise ValueError("make_batch with bos=True needs bos_id")
    bos_id = check_int("bos_id", bos_id, 0, int(np.iinfo(tokens.dtype).max))
    return _make_batch(tokens, order, bos=True, bos_id=bos_id)


@functools.partial(jax.jit, static_argnames=("bos", "bos_id"))
def _make_batch(tokens, order, *, bos, bos_id):
    s = _permute(tokens, order)
    if not bos:
        return s[:, :-1], order[:, :-1], order[:, 1:], s[:, 1:]
    b = tokens.shape[0]
    # Constrained like the batch, so the concatenation also works under an Explicit mesh.
    start_tok = constrain(jnp.full((b, 1), bos_id, tokens.dtype), ("batch", "seq"))
    start_pos = constrain(jnp.full((b, 1), START_POS, order.dtype), ("batch", "seq"))
    inputs = jnp.concatenate([start_tok, s[:, :-1]], axis=1)
    pos_in = jnp.concatenate([start_pos, order[:, :-1]], axis=1)
    return inputs, pos_in, order, s


# ---------------------------------------------------------------- training-order curriculum


def random_order_probability(policy: str, step, max_steps: int) -> jax.Array:
    """P(a batch is trained in random order) at `step`: 0 or 1 for the fixed policies;
    step / max_steps for 'curriculum'; P + (1 - P) step / max_steps for 'randcur:P' (step /
    max_steps capped at 1). step: a scalar integer >= 0 (its value checked when concrete);
    max_steps: an integer >= 1."""
    kind, start = parse_order_policy(policy)
    check_scalar_int("step", step, 0)
    max_steps = check_int("max_steps", max_steps, 1)
    if kind == "left_to_right" or kind == "fractal":
        return jnp.float32(0.0)
    if kind == "random":
        return jnp.float32(1.0)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max_steps, 0.0, 1.0)
    return start + (1.0 - start) * frac


def training_orders(key: jax.Array, policy: str, step, max_steps: int, batch: int, n: int, *,
                    coins: int = 1, prompt_len: int = 0) -> jax.Array:
    """Orders for one training batch: int32 [batch, n].

    The curriculum draws left-to-right vs random once per group of batch / coins consecutive rows:
    coins=1 is one coin per batch (as published), coins=batch one per row, coins=grad_accum one
    per micro-batch. With prompt_len > 0 the first prompt_len positions stay first, in index
    order (the "keep the prompt first" flag); the rest follow the policy.
    key: one typed key; step: a scalar integer >= 0 (its value checked when concrete); max_steps,
    batch, n, coins: integers >= 1, coins dividing batch; prompt_len: an integer in [0, n].
    """
    check_key(key)
    kind, _ = parse_order_policy(policy)
    check_scalar_int("step", step, 0)
    max_steps = check_int("max_steps", max_steps, 1)
    batch, n = check_int("batch", batch, 1), check_int("n", n, 1)
    coins = check_int("coins", coins, 1)
    if batch % coins:
        raise ValueError(f"coins ({coins}) must divide the batch ({batch})")
    prompt_len = check_int("prompt_len", prompt_len, 0, n)
    known = jnp.broadcast_to(jnp.arange(n) < prompt_len, (batch, n))
    if kind == "fractal":
        return _fractal_known_first(known, None)
    k_coin, k_order = jax.random.split(key)
    shuffled = random_order(k_order, known, known_order="ascending")  # the prompt in index order
    p_random = random_order_probability(policy, step, max_steps)
    coin = jnp.repeat(jax.random.uniform(k_coin, (coins, 1)) < p_random, batch // coins, axis=0)
    return jnp.where(coin, shuffled, left_to_right(batch, n))
