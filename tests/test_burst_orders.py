"""Burst sampling along any generation order, and the one-call 'jacobi' mode: both exact modes
against the enumerated AR law along the same order (chi-square), greedy decoding against greedy
AR along the same order, and the mechanics of the jacobi mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import (
    SMALL,
    chi_square_pvalue,
    enumerated_law,
    peaked_params,
    ragged_known,
    two_sample_pvalue,
)

from sigma_jax import ModelConfig, orders, sample_ar, sample_burst

pytestmark = pytest.mark.integration  # every test here compiles whole burst sampler kernels

TINY5 = ModelConfig(vocab_size=3, block_size=5, n_layer=2, n_head=2, n_embd=16)
KNOWN = {0: 2, 3: 1}  # two scattered known tokens
N_SAMPLES = 20000
# Each kind's order of TINY5 given KNOWN (known ascending first): all four differ.
ORDERS = {"left_to_right": [0, 3, 1, 2, 4], "fractal": [0, 3, 2, 4, 1],
          "spread": [0, 3, 4, 2, 1], "explicit": [3, 0, 1, 4, 2]}


@pytest.fixture(scope="module")
def tiny5():
    params = peaked_params(TINY5, 5, scale=6.0, sharpness=2.0)
    tokens = np.zeros((N_SAMPLES, 5), np.int32)
    known = np.zeros((N_SAMPLES, 5), bool)
    for pos, tok in KNOWN.items():
        tokens[:, pos], known[:, pos] = tok, True
    return params, jnp.asarray(tokens), jnp.asarray(known)


def test_the_kinds_give_the_listed_orders(tiny5):
    _, _, known = tiny5
    for kind, want in ORDERS.items():
        if kind != "explicit":
            np.testing.assert_array_equal(orders.order_from_mask(kind, known[:1])[0], want)


@pytest.mark.parametrize("kind, mode, window", [
    *[(kind, mode, None) for kind in ORDERS for mode in ("exact", "jacobi")],
    ("spread", "jacobi", 2)])
@pytest.mark.integration
def test_exact_modes_sample_the_ar_law_along_the_order(tiny5, kind, mode, window):
    """Burst sampling along each order family follows the enumerated AR law along that order,
    and the same test rejects the law along another order (so it has the power to tell)."""
    params, tokens, known = tiny5
    order = kind if kind != "explicit" else jnp.broadcast_to(
        jnp.array(ORDERS[kind], jnp.int32), tokens.shape)
    samples, stats = sample_burst(TINY5, params, jax.random.key(3), tokens, known, mode=mode,
                                  order=order, window=window)
    p_value, chi2, df = chi_square_pvalue(samples, *enumerated_law(TINY5, params, 5, KNOWN,
                                                                   order=ORDERS[kind]))
    assert p_value > 1e-3, (p_value, chi2, df)
    other = "explicit" if kind == "left_to_right" else "left_to_right"
    law = enumerated_law(TINY5, params, 5, KNOWN, order=ORDERS[other])
    assert chi_square_pvalue(samples, *law)[0] < 1e-3
    assert bool(stats.finished.all())
    if kind == "explicit":  # two-sample: burst and AR along the same explicit order
        ar, _ = sample_ar(TINY5, params, jax.random.key(4), tokens, known, order=order)
        p_value, chi2, df = two_sample_pvalue(samples, ar)
        assert p_value > 1e-3, (p_value, chi2, df)


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
def test_greedy_burst_is_greedy_ar_along_the_same_order(mode):
    """At temperature 0 both exact modes commit exactly what greedy AR commits along the same
    order, row by row (spread, fractal and random orders of ragged known sets, as one explicit
    [B, N] order), in fewer iterations than tokens."""
    params = peaked_params(SMALL, 7)
    b, n = 8, 10
    tokens = jax.random.randint(jax.random.key(0), (3 * b, n), 0, SMALL.vocab_size)
    known = jnp.concatenate([ragged_known(seed, b, n) for seed in (3, 4, 5)])
    order = jnp.concatenate([orders.spread_known_first(known[:b]),
                             orders.fractal_known_first(known[b:2 * b]),
                             orders.random_order(jax.random.key(4), known[2 * b:])])
    ar, _ = sample_ar(SMALL, params, jax.random.key(0), tokens, known, order=order,
                      temperature=0.0)
    burst, stats = sample_burst(SMALL, params, jax.random.key(1), tokens, known, mode=mode,
                                order=order, temperature=0.0, window=4)
    np.testing.assert_array_equal(burst, ar)
    assert (np.asarray(stats.iterations) < np.asarray(stats.generated)).any()


@pytest.mark.parametrize("window", [None, 3])
def test_jacobi_mechanics_on_a_peaked_model(window):
    params = peaked_params(SMALL, 3)
    b, n = 6, 10
    tokens = jax.random.randint(jax.random.key(1), (b, n), 0, SMALL.vocab_size)
    known = ragged_known(4, b, n)
    out, stats = sample_burst(SMALL, params, jax.random.key(2), tokens, known, mode="jacobi",
                              order="spread", window=window)
    r = np.asarray(n - known.sum(1))
    np.testing.assert_array_equal(jnp.where(known, out, tokens), tokens)
    np.testing.assert_array_equal(stats.generated, r)
    its = np.asarray(stats.iterations)
    assert (its <= r).all() and (its >= np.ceil(r / (window or n))).all()
    assert (its > np.ceil(r / (window or n))).any()  # some draft was replaced
    assert int(stats.forward_passes) == 2 + int(its.max())  # prefill, drafts, one per iteration


def test_paper_mode_takes_only_random_orders():
    params = peaked_params(SMALL, 6)
    tokens, known = jnp.zeros((1, 10), jnp.int32), jnp.zeros((1, 10), bool)
    with pytest.raises(ValueError, match="order='random'") as err:
        sample_burst(SMALL, params, jax.random.key(0), tokens, known, mode="paper",
                     order="spread")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="order must be"):
        sample_burst(SMALL, params, jax.random.key(0), tokens, known, order="zigzag")


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
def test_burst_states_steps_to_what_sample_burst_returns(mode):
    """The public stepping API yields the prefilled state, then one state per iteration; the
    last one holds exactly sample_burst's tokens and statistics."""
    from sigma_jax import burst_states

    params = peaked_params(SMALL, 3)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, SMALL.vocab_size)
    known = ragged_known(4, 3, 10)
    options = dict(mode=mode, order="spread", window=4)
    want, want_stats = sample_burst(SMALL, params, jax.random.key(2), tokens, known, **options)
    states = list(burst_states(SMALL, params, jax.random.key(2), tokens, known, **options))
    np.testing.assert_array_equal(states[0][0].filled, known)
    filled = [int(np.asarray(s.filled).sum()) for s, _ in states]
    assert filled == sorted(filled) and len(states) == 1 + int(want_stats.iterations.max())
    last, stats = states[-1]
    np.testing.assert_array_equal(last.tokens, want)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
