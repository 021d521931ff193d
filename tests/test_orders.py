"""Orders, permutations, teacher-forced batches and the curriculum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax import config, orders

FRACTAL = {
    1: [0], 2: [1, 0], 3: [1, 2, 0], 4: [2, 3, 1, 0], 5: [2, 4, 1, 3, 0],
    7: [3, 5, 1, 4, 6, 2, 0], 8: [4, 6, 2, 5, 7, 3, 1, 0],
    15: [7, 11, 3, 9, 13, 5, 1, 8, 10, 14, 12, 4, 6, 2, 0],
    16: [8, 12, 4, 10, 14, 6, 2, 9, 11, 15, 13, 5, 7, 3, 1, 0],
}
FRACTAL_LAST_FIRST = {
    8: [7, 3, 5, 1, 4, 6, 2, 0],
    16: [15, 7, 11, 3, 9, 13, 5, 1, 8, 10, 14, 12, 4, 6, 2, 0],
}


@pytest.mark.parametrize("n", sorted(FRACTAL))
def test_fractal_reference_values(n):
    np.testing.assert_array_equal(orders.fractal_order(n), FRACTAL[n])


@pytest.mark.parametrize("n", sorted(FRACTAL_LAST_FIRST))
def test_fractal_last_first_reference_values(n):
    np.testing.assert_array_equal(orders.fractal_order(n, last_first=True), FRACTAL_LAST_FIRST[n])


def test_fractal_is_a_permutation_for_every_length():
    for n in range(0, 70):
        np.testing.assert_array_equal(np.sort(orders.fractal_order(n)), np.arange(n))


def _random_known(seed, b, n):
    known = np.array(jax.random.bernoulli(jax.random.key(seed), 0.4, (b, n)))
    known[0] = False  # an empty known set
    known[1] = True  # everything known
    return jnp.asarray(known)


@pytest.mark.parametrize("kind", orders.ORDER_KINDS)
def test_orders_from_masks_are_permutations_with_known_first(kind):
    b, n = 9, 13
    known = _random_known(0, b, n)
    order = np.asarray(orders.order_from_mask(kind, known, jax.random.key(1)))
    np.testing.assert_array_equal(np.sort(order, 1), np.broadcast_to(np.arange(n), (b, n)))
    n_known = np.asarray(known).sum(1)
    for row in range(b):
        first = order[row, : n_known[row]]
        assert np.asarray(known)[row, first].all()
        assert not np.asarray(known)[row, order[row, n_known[row]:]].any()
        if kind in ("left_to_right", "fractal", "spread"):
            np.testing.assert_array_equal(first, np.sort(first))
        rest = order[row, n_known[row]:]
        if kind == "left_to_right":
            np.testing.assert_array_equal(rest, np.sort(rest))
        if kind == "fractal":
            np.testing.assert_array_equal(rest, np.sort(rest)[orders.fractal_order(len(rest))])


def _farthest_first(known):
    """Brute force: repeatedly place the unknown position with the largest distance to every
    placed one (known positions and the virtual ends -1 and N), ties to the smaller
    bit-reversed index."""
    n = len(known)
    bits = max(1, (n - 1).bit_length())
    bitrev = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]
    placed = [-1, n] + [i for i in range(n) if known[i]]
    out = [i for i in range(n) if known[i]]
    while len(out) < n:
        free = [i for i in range(n) if i not in out]
        dist = {i: min(abs(i - j) for j in placed) for i in free}
        best = max(dist.values())
        pick = min((i for i in free if dist[i] == best), key=lambda i: bitrev[i])
        out.append(pick)
        placed.append(pick)
    return out


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 16])
def test_spread_order_is_farthest_first(n):
    known = np.array(jax.random.bernoulli(jax.random.key(n), 0.3, (6, n)))
    known[0], known[1] = False, True
    got = np.asarray(orders.spread_known_first(jnp.asarray(known)))
    want = np.array([_farthest_first(row) for row in known])
    np.testing.assert_array_equal(got, want)


def test_spread_order_bisects_and_fills_the_widest_gap_first():
    np.testing.assert_array_equal(orders.order_from_mask("spread", jnp.zeros((1, 8), bool))[0],
                                  [4, 2, 6, 0, 1, 5, 3, 7])
    known = jnp.zeros((1, 16), bool).at[0, jnp.array([3, 12])].set(True)
    assert int(orders.spread_known_first(known)[0, 2]) == 8  # the middle of the gap (3, 12)


def test_random_order_is_uniform_over_unknown_positions():
    known = jnp.array([[True, False, False, True, False]] * 6000)
    order = np.asarray(orders.random_order(jax.random.key(2), known))
    first_unknown = order[:, 2]
    counts = np.bincount(first_unknown, minlength=5)
    assert counts[0] == counts[3] == 0
    np.testing.assert_allclose(counts[[1, 2, 4]] / 6000, 1 / 3, atol=0.03)


def test_random_order_with_known_ascending_keeps_the_same_unknown_order():
    known = jax.random.uniform(jax.random.key(4), (50, 9)) < 0.4
    key = jax.random.key(5)
    ordered = np.asarray(orders.random_order(key, known, known_order="ascending"))
    shuffled = np.asarray(orders.random_order(key, known))
    for row, k in zip(ordered, np.asarray(known), strict=True):
        m = int(k.sum())
        np.testing.assert_array_equal(row[:m], np.flatnonzero(k))
    n_known = np.asarray(known).sum(1)
    for a, b, m in zip(ordered, shuffled, n_known, strict=True):
        np.testing.assert_array_equal(a[m:], b[m:])


def test_random_order_with_one_key_per_row_and_its_known_order_law():
    """Per-row keys: row b depends only on keys[b]. With two known positions, each of their two
    orders comes first in about half of the rows; a bad known_order is a one-line error."""
    known = jnp.array([[False, True, False, True, False]] * 4000)
    keys = jax.random.split(jax.random.key(6), 4000)
    order = np.asarray(orders.random_order(keys, known))
    for row in (0, 17, 3999):
        alone = orders.random_order(keys[row], known[row : row + 1])[0]
        np.testing.assert_array_equal(order[row], alone)
    assert set(map(tuple, order[:, :2])) == {(1, 3), (3, 1)}
    np.testing.assert_allclose((order[:, 0] == 1).mean(), 0.5, atol=0.03)
    with pytest.raises(ValueError, match="known_order"):
        orders.random_order(keys, known, known_order="sorted")


def test_permute_unpermute_round_trip_with_trailing_dims():
    x = jax.random.normal(jax.random.key(0), (4, 7, 3))
    order = orders.random_order(jax.random.key(1), jnp.zeros((4, 7), bool))
    xs = orders.permute(x, order)
    np.testing.assert_array_equal(xs[2, 5], x[2, order[2, 5]])
    np.testing.assert_array_equal(orders.unpermute(xs, order), x)


def test_make_batch_matches_the_worked_example():
    # Method reference §2.1 and §2.2: σ = [3, 0, 2, 1].
    x = jnp.array([[10, 11, 12, 13]])
    order = jnp.array([[3, 0, 2, 1]])
    inp, pin, pout, tgt = orders.make_batch(x, order, bos=False)
    np.testing.assert_array_equal(inp, [[13, 10, 12]])
    np.testing.assert_array_equal(pin, [[3, 0, 2]])
    np.testing.assert_array_equal(pout, [[0, 2, 1]])
    np.testing.assert_array_equal(tgt, [[10, 12, 11]])
    inp, pin, pout, tgt = orders.make_batch(x, order, bos=True, bos_id=99)
    np.testing.assert_array_equal(inp, [[99, 13, 10, 12]])
    np.testing.assert_array_equal(pin, [[-1, 3, 0, 2]])
    np.testing.assert_array_equal(pout, [[3, 0, 2, 1]])
    np.testing.assert_array_equal(tgt, [[13, 10, 12, 11]])


@pytest.mark.parametrize("policy, expected", [
    ("left_to_right", [0.0, 0.0, 0.0]), ("random", [1.0, 1.0, 1.0]),
    ("curriculum", [0.0, 0.5, 1.0]), ("randcur:20", [0.2, 0.6, 1.0]),
])
def test_random_order_probability(policy, expected):
    got = [float(orders.random_order_probability(policy, s, 100)) for s in (0, 50, 100)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("bad", ["curriculumrandom", "randcur:150", "randcur:x", "shuffle",
                                 None, 3])
def test_bad_policy_raises(bad):
    with pytest.raises(ValueError, match=f"^order_policy must be .*; got {bad!r}$"):
        config.parse_order_policy(bad)


def test_random_order_probability_names_a_bad_policy():
    with pytest.raises(ValueError, match="^order_policy must be .*; got None$"):
        orders.random_order_probability(None, 5, 10)


@pytest.mark.parametrize("per_row", [False, True])
def test_curriculum_mixture_fraction(per_row):
    n, batch, step, max_steps = 8, 16, 30, 100  # P(random) = 0.3
    sample = jax.jit(lambda k: orders.training_orders(k, "curriculum", step, max_steps, batch, n,
                                                      coins=batch if per_row else 1))
    draws = jax.vmap(sample)(jax.random.split(jax.random.key(0), 400))  # [400, B, N]
    is_l2r = np.all(np.asarray(draws) == np.arange(n), axis=-1)  # [400, B]
    if not per_row:  # the whole batch shares one coin
        assert (is_l2r.all(1) | ~is_l2r.any(1)).all()
    # A random permutation of 8 is the identity with probability 1/8!: negligible.
    np.testing.assert_allclose(1 - is_l2r.mean(), 0.3, atol=0.04)


def test_training_orders_keep_the_prompt_first_and_fractal_flows_through():
    o = np.asarray(orders.training_orders(jax.random.key(0), "random", 0, 10, 32, 10,
                                          prompt_len=3))
    np.testing.assert_array_equal(o[:, :3], np.broadcast_to(np.arange(3), (32, 3)))
    assert len({tuple(r) for r in o}) > 1
    f = np.asarray(orders.training_orders(jax.random.key(0), "fractal", 0, 10, 2, 10))
    np.testing.assert_array_equal(f, np.broadcast_to(orders.fractal_order(10), (2, 10)))


_KEY = jax.random.key(0)
_MASK = jnp.zeros((2, 5), bool)
_PERM = jnp.array([[0, 2, 1]])
_TOKENS = jnp.array([[5, 6, 7]])


@pytest.mark.parametrize("call, message", [
    (lambda: orders.random_order(jax.random.PRNGKey(0), _MASK),
     "key must be a typed PRNG key (jax.random.key(seed)), not a legacy uint32 key; got ArrayImpl"),
    (lambda: orders.random_order(jax.random.PRNGKey(0), jnp.zeros((3, 5), bool)),
     "key must be a typed PRNG key"),
    (lambda: orders.order_from_mask("random", _MASK, 0), "key must be a typed PRNG key"),
    (lambda: orders.training_orders(0, "random", 0, 10, 2, 5), "key must be a typed PRNG key"),
    (lambda: orders.random_order(jax.random.split(_KEY, 3), _MASK),
     "got 3 per-row keys for a batch of 2"),
    (lambda: orders.order_from_mask("spread", jnp.zeros(5, bool)),
     "known must be a bool [B, N] mask with N >= 1; got shape (5,)"),
    (lambda: orders.random_order(_KEY, jnp.zeros((1, 2, 5), bool)),
     "known must be a bool [B, N] mask with N >= 1; got shape (1, 2, 5)"),
    (lambda: orders.order_from_mask("fractal", jnp.zeros((2, 0), bool)),
     "known must be a bool [B, N] mask with N >= 1; got shape (2, 0)"),
    (lambda: orders.order_from_mask("left_to_right", [[0, 1]]),
     "known must be a bool mask; got dtype int64"),
    (lambda: orders.order_from_mask("zigzag", _MASK),
     "order must be one of left_to_right, random, fractal, spread; got 'zigzag'"),
    (lambda: orders.random_order(_KEY, _MASK, lengths=jnp.array([5])),
     "lengths must be [B] = [2], one length per row; got shape (1,)"),
    (lambda: orders.order_from_mask("spread", _MASK, lengths=[5.0, 5.0]),
     "lengths must hold integer positions; got dtype float64"),
    (lambda: orders.order_from_mask("fractal", _MASK, lengths=[0, 5]),
     "lengths must lie in [1, 5] (N = 5); got values in [0, 5]"),
    (lambda: orders.order_from_mask("random", _MASK, _KEY, lengths=[6, 5]),
     "lengths must lie in [1, 5] (N = 5); got values in [5, 6]"),
    (lambda: orders.order_from_mask("spread", [[False, False, True]], lengths=[2]),
     "known must be False at and past each row's length; row 0 (length 2) knows position 2"),
    (lambda: orders.random_order(_KEY, [[True, False], [False, True]], lengths=np.array([2, 1])),
     "row 1 (length 1) knows position 1"),
    (lambda: orders.fractal_known_first(jnp.ones((2, 5), bool), jnp.array([5, 4])),
     "row 1 (length 4) knows position 4"),
    (lambda: orders.spread_known_first(jnp.zeros((2, 5), int)),
     "known must be a bool mask; got dtype int32"),
    (lambda: orders.fractal_known_first(jnp.zeros(5, bool)),
     "known must be a bool [B, N] mask with N >= 1; got shape (5,)"),
    (lambda: orders.ordered_known_first(jnp.zeros((2, 0), bool)),
     "known must be a bool [B, N] mask with N >= 1; got shape (2, 0)"),
    (lambda: orders.spread_known_first(_MASK, jnp.array([6, 5])),
     "lengths must lie in [1, 5] (N = 5); got values in [5, 6]"),
    (lambda: orders.fractal_known_first(_MASK, [0, 5]),
     "lengths must lie in [1, 5] (N = 5); got values in [0, 5]"),
    (lambda: orders.ordered_known_first(_MASK, jnp.array([5])),
     "lengths must be [B] = [2], one length per row; got shape (1,)"),
    (lambda: orders.spread_known_first(_MASK, [5.0, 5.0]),
     "lengths must hold integer positions; got dtype float64"),
    (lambda: orders.permute(jnp.zeros((1, 3)), jnp.array([[0, 0, 1]])),
     "order rows must be permutations of range(N) (N = 3); row 0 is [0, 0, 1]"),
    (lambda: orders.unpermute(jnp.zeros((1, 3)), jnp.array([[0, 5, 1]])),
     "order rows must be permutations of range(N) (N = 3); row 0 is [0, 5, 1]"),
    (lambda: orders.inverse(jnp.array([[1, 0], [1, 1]])),
     "order rows must be permutations of range(N) (N = 2); row 1 is [1, 1]"),
    (lambda: orders.permute(jnp.zeros((1, 4)), _PERM),
     "x must be [B, N, ...] with [B, N] = [1, 3], the shape of order; got shape (1, 4)"),
    (lambda: orders.unpermute(jnp.zeros((2, 3)), _PERM),
     "xs must be [B, N, ...] with [B, N] = [1, 3], the shape of order; got shape (2, 3)"),
    (lambda: orders.inverse(jnp.array([0, 2, 1])), "order must be [B, N]; got shape (3,)"),
    (lambda: orders.permute(jnp.zeros((1, 3)), jnp.array([[0.0, 2.0, 1.0]])),
     "order must hold integer positions; got dtype float32"),
    (lambda: orders.make_batch(jnp.zeros((1, 4), int), _PERM, bos=False),
     "tokens and order must both be [B, N] with N >= 1; got shapes (1, 4) and (1, 3)"),
    (lambda: orders.make_batch(_TOKENS, _PERM, bos=True, bos_id=1.5),
     "bos_id must be an integer in [0, 2147483647]; got 1.5"),
    (lambda: orders.make_batch(_TOKENS, _PERM, bos=True, bos_id="x"),
     "bos_id must be an integer in [0, 2147483647]; got 'x'"),
    (lambda: orders.make_batch(_TOKENS, _PERM, bos=True), "make_batch with bos=True needs bos_id"),
    (lambda: orders.make_batch(_TOKENS, _PERM, bos=None), "bos must be True or False; got None"),
    (lambda: orders.make_batch(_TOKENS, jnp.array([[0, 0, 1]]), bos=False),
     "order rows must be permutations of range(N)"),
    (lambda: orders.make_batch(jnp.zeros((1, 3)), _PERM, bos=False),
     "tokens must hold integer token ids; got dtype float32"),
    (lambda: orders.training_orders(_KEY, "random", 0, 10, 4, 5, coins=0),
     "coins must be an integer >= 1; got 0"),
    (lambda: orders.training_orders(_KEY, "random", 0, 10, 4, 5, coins=-1),
     "coins must be an integer >= 1; got -1"),
    (lambda: orders.training_orders(_KEY, "random", 0, 10, 4, 5, coins=3),
     "coins (3) must divide the batch (4)"),
    (lambda: orders.training_orders(_KEY, "random", 0, 10, -1, 5),
     "batch must be an integer >= 1; got -1"),
    (lambda: orders.training_orders(_KEY, "random", 0, 10, 4, 5, prompt_len=6),
     "prompt_len must be an integer in [0, 5]; got 6"),
    (lambda: orders.training_orders(_KEY, "random", 0, 10, 4, 5, prompt_len=-1),
     "prompt_len must be an integer in [0, 5]; got -1"),
    (lambda: orders.training_orders(_KEY, "fractal", "3", 10, 4, 5),
     "step must be an integer >= 0; got '3'"),
    (lambda: orders.fractal_order(2.5), "n must be an integer >= 0; got 2.5"),
    (lambda: orders.fractal_order("3"), "n must be an integer >= 0; got '3'"),
    (lambda: orders.bit_reversed_rank(-3), "n must be an integer >= 0; got -3"),
    (lambda: orders.bit_reversed_rank(2.0), "n must be an integer >= 0; got 2.0"),
    (lambda: orders.left_to_right(-1, 3), "batch must be an integer >= 0; got -1"),
    (lambda: orders.left_to_right(2, 0), "n must be an integer >= 1; got 0"),
    (lambda: orders.random_order_probability("curriculum", "5", 10),
     "step must be an integer >= 0; got '5'"),
    (lambda: orders.random_order_probability("curriculum", -1, 10),
     "step must be an integer >= 0; got -1"),
    (lambda: orders.random_order_probability("curriculum", 5, 0),
     "max_steps must be an integer >= 1; got 0"),
])
def test_bad_order_inputs_raise_one_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_order_inputs_as_lists_numpy_ints_and_under_jit():
    """Lists and numpy integers are accepted; under jit only shapes are checked (values are
    unknown), and the checked functions trace unchanged."""
    np.testing.assert_array_equal(orders.order_from_mask("fractal", [[True, False, False]]),
                                  [[0, 2, 1]])
    assert orders.random_order(_KEY, [[False, True]], lengths=[2]).shape == (1, 2)
    np.testing.assert_array_equal(orders.bit_reversed_rank(np.int64(4)), [0, 2, 1, 3])
    np.testing.assert_array_equal(orders.fractal_order(np.int32(3)), FRACTAL[3])
    assert orders.left_to_right(0, 3).shape == (0, 3)
    np.testing.assert_array_equal(orders.permute([[7, 8, 9]], [[2, 0, 1]]), [[9, 7, 8]])
    inp, *_ = orders.make_batch([[5, 6, 7]], [[2, 0, 1]], bos=True, bos_id=np.int64(9))
    np.testing.assert_array_equal(inp, [[9, 7, 5]])
    traced = jax.jit(lambda x, o: orders.permute(x, o))(_TOKENS, jnp.array([[0, 0, 1]]))
    np.testing.assert_array_equal(traced, [[5, 5, 6]])  # not a permutation: unchecked in jit
    with pytest.raises(ValueError, match="x must be"):
        jax.jit(orders.permute)(jnp.zeros((1, 4)), _PERM)
    mask = [[False, True, False, False]]
    for kind, fn in [("spread", orders.spread_known_first), ("fractal", orders.fractal_known_first),
                     ("left_to_right", orders.ordered_known_first)]:
        expected = orders.order_from_mask(kind, jnp.asarray(mask), lengths=jnp.array([3]))
        np.testing.assert_array_equal(fn(mask, [3]), expected)
        np.testing.assert_array_equal(jax.jit(fn)(jnp.asarray(mask), jnp.array([3])), expected)
        with pytest.raises(ValueError, match="known must be a bool mask"):
            jax.jit(fn)(jnp.zeros((1, 4), int))
    step = jax.jit(lambda s: orders.random_order_probability("curriculum", s, 10))
    assert float(step(jnp.int32(5))) == 0.5
