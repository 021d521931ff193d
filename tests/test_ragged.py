"""Ragged lengths: a row of length L inside a batch of N positions gives exactly what the same
row gives alone at N = L — the same order, the same tokens from the same key (bitwise), the
same densities (<= 1e-5). Positions past L are absent: never known, generated or scored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params

from sigma_jax import conditionals, log_prob, orders, sample_ar, sample_burst

N = 10
LENGTHS = np.array([10, 6, 3], np.int32)


@pytest.fixture(scope="module")
def params():
    return peaked_params(SMALL, 4)


def _rows(seed=0):
    """tokens int32 [4, N], known bool [4, N] (scattered, only within each row's length)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SMALL.vocab_size, (len(LENGTHS), N)).astype(np.int32)
    known = rng.random((len(LENGTHS), N)) < 0.3
    known[0] = False
    known &= np.arange(N)[None] < LENGTHS[:, None]
    return tokens, known


@pytest.mark.parametrize("kind", orders.ORDER_KINDS)
def test_orders_of_a_ragged_row_are_its_orders_alone(kind):
    tokens, known = _rows(1)
    keys = jax.random.split(jax.random.key(2), len(LENGTHS))
    for known_order in orders.KNOWN_ORDERS:
        got = orders.order_from_mask(kind, jnp.asarray(known), keys, known_order=known_order,
                                     lengths=jnp.asarray(LENGTHS))
        for row, length in enumerate(LENGTHS):
            alone = orders.order_from_mask(kind, jnp.asarray(known[row:row + 1, :length]),
                                           keys[row:row + 1], known_order=known_order)
            np.testing.assert_array_equal(got[row, :length], alone[0])
            np.testing.assert_array_equal(got[row, length:], np.arange(length, N))


SAMPLERS = [
    ("ar", sample_ar, dict(use_cache=True)),
    ("ar_nocache", sample_ar, dict(use_cache=False)),
    ("burst", sample_burst, dict(mode="exact", window=3)),
    ("burst_all", sample_burst, dict(mode="exact")),
    ("burst_jacobi", sample_burst, dict(mode="jacobi", window=2)),
    ("burst_jacobi_all", sample_burst, dict(mode="jacobi")),
    ("burst_paper", sample_burst, dict(mode="paper", window=3, n_orders=2)),
]


@pytest.mark.parametrize("name, sampler, options", SAMPLERS, ids=[s[0] for s in SAMPLERS])
@pytest.mark.integration
def test_a_ragged_row_samples_what_it_samples_alone(params, name, sampler, options):
    tokens, known = _rows(3)
    keys = jax.random.split(jax.random.key(5), len(LENGTHS))
    # The kernels take the order as an array (every kind shares them): the kinds' own ragged
    # orders are tested above, so two kinds cover the samplers.
    kinds = ("random",) if name == "burst_paper" else ("random", "spread")
    for kind in kinds:
        out, stats = sampler(SMALL, params, keys, tokens, known, order=kind,
                             lengths=LENGTHS, **options)
        out = np.asarray(out)
        np.testing.assert_array_equal(stats.generated, LENGTHS - known.sum(1))
        assert bool(stats.finished.all())
        for row, length in enumerate(LENGTHS):
            alone, _ = sampler(SMALL, params, keys[row:row + 1], tokens[row:row + 1, :length],
                               known[row:row + 1, :length], order=kind, **options)
            np.testing.assert_array_equal(out[row, :length], np.asarray(alone)[0],
                                          err_msg=f"{kind}, row {row}")
            assert (out[row, length:] == 0).all()


def test_densities_of_a_ragged_row_are_its_densities_alone(params):
    tokens, known = _rows(4)
    lengths = jnp.asarray(LENGTHS)
    # One row with random orders (B = 1: its uniforms do not depend on the trailing length).
    for row, length in enumerate(LENGTHS):
        got = log_prob(SMALL, params, tokens[row:row + 1], known[row:row + 1],
                       jax.random.key(row), n_orders=3, lengths=lengths[row:row + 1])
        alone = log_prob(SMALL, params, tokens[row:row + 1, :length],
                         known[row:row + 1, :length], jax.random.key(row), n_orders=3)
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
    # The whole batch along explicit ragged orders, and every conditional.
    order = orders.order_from_mask("spread", jnp.asarray(known), lengths=lengths)
    got = log_prob(SMALL, params, tokens, known, order=order, lengths=lengths)
    probs = conditionals(SMALL, params, tokens, known, known_order="ascending", lengths=lengths)
    for row, length in enumerate(LENGTHS):
        sub = (tokens[row:row + 1, :length], known[row:row + 1, :length])
        alone = log_prob(SMALL, params, *sub, order=order[row:row + 1, :length])
        np.testing.assert_allclose(got[row], alone[0], rtol=1e-5, atol=1e-5)
        want = conditionals(SMALL, params, *sub, known_order="ascending")
        np.testing.assert_allclose(probs[row, :length], want[0], atol=1e-5)
        assert (np.asarray(probs[row, length:]) == 0).all()


def test_bad_lengths_and_orders_fail_with_one_line(params):
    tokens, known = _rows(5)
    for lengths, match in [([10, 6], "lengths must be \\[B\\] = \\[3\\]"),
                           ([10, 0, 3], "lengths must lie in \\[1, 10\\]"),
                           ([11, 6, 3], "lengths must lie in \\[1, 10\\]"),
                           ([10.0, 6, 3], "lengths must hold integer")]:
        with pytest.raises(ValueError, match=match) as err:
            sample_ar(SMALL, params, jax.random.key(0), tokens, known, lengths=lengths)
        assert "\n" not in str(err.value)
    order = np.tile(np.arange(N), (len(LENGTHS), 1))  # known-first fails first when known exists
    known = np.zeros_like(known)
    with pytest.raises(ValueError, match="past each row's length last"):
        log_prob(SMALL, params, tokens, known, order=order[:, ::-1].copy(), lengths=LENGTHS)


def test_ids_past_a_rows_length_are_never_read():
    """Padding ids past each row's length (here -1 and 99, outside [0, V)) are ignored by the
    densities, as they are by the samplers: the same values as with zeros there."""
    params = peaked_params(SMALL, 0)
    tokens = jnp.asarray(np.arange(2 * N).reshape(2, N) % SMALL.vocab_size, jnp.int32)
    known = jnp.zeros((2, N), bool).at[:, 1].set(True)
    lengths = jnp.array([N - 3, N])
    padded = tokens.at[0, N - 3:].set(jnp.array([-1, 99, -1]))
    key = jax.random.key(4)
    for f in (log_prob, conditionals):
        np.testing.assert_array_equal(f(SMALL, params, padded, known, key, lengths=lengths),
                                      f(SMALL, params, tokens, known, key, lengths=lengths))
