"""The public samplers and density functions take their inputs the way users pass them (orders
as lists or arrays, numpy integers for int options) and refuse bad ones with one line, before
any work: empty batches and sequences, non-integer tokens, n_orders < 1, max_iters < 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params

from sigma_jax import conditionals, log_prob, orders, sample_ar, sample_burst


@pytest.fixture(scope="module")
def params():
    return peaked_params(SMALL, 2)


def _inputs(b=2, n=10):
    tokens = jnp.asarray(np.arange(b * n).reshape(b, n) % SMALL.vocab_size, jnp.int32)
    known = jnp.zeros((b, n), bool).at[:, 2].set(True)
    return tokens, known


def _one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


FUNCTIONS = {
    "sample_ar": lambda p, t, k, **kw: sample_ar(SMALL, p, jax.random.key(0), t, k, **kw),
    "sample_burst": lambda p, t, k, **kw: sample_burst(SMALL, p, jax.random.key(0), t, k,
                                                       window=kw.pop("window", 3), **kw),
    "log_prob": lambda p, t, k, **kw: log_prob(SMALL, p, t, k, jax.random.key(0), **kw),
    "conditionals": lambda p, t, k, **kw: conditionals(SMALL, p, t, k, jax.random.key(0), **kw),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_empty_and_non_integer_inputs_fail_with_one_line(params, name):
    run = FUNCTIONS[name]
    _one_line(lambda: run(params, jnp.zeros((0, 10), jnp.int32), jnp.zeros((0, 10), bool)),
              "B = 0")
    _one_line(lambda: run(params, jnp.zeros((2, 0), jnp.int32), jnp.zeros((2, 0), bool)),
              "N = 0")
    tokens, known = _inputs()
    _one_line(lambda: run(params, tokens.astype(jnp.float32) + 0.5, known), "integer token ids")
    _one_line(lambda: run(params, np.asarray(tokens) > 3, known), "integer token ids")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_an_order_given_as_a_nested_list_is_an_order(params, name):
    tokens, known = _inputs()
    order = orders.order_from_mask("spread", known, jax.random.split(jax.random.key(3), 2))
    want = FUNCTIONS[name](params, tokens, known, order=order)
    got = FUNCTIONS[name](params, tokens.tolist(), known.tolist(),
                          order=np.asarray(order).tolist())
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(got)[0]),
                                  np.asarray(jax.tree.leaves(want)[0]))


def test_density_counts_and_iteration_caps_below_one_are_refused(params):
    tokens, known = _inputs()
    _one_line(lambda: log_prob(SMALL, params, tokens, known, jax.random.key(0), n_orders=0),
              "n_orders must be an integer >= 1")
    for bad in (0, -3):
        _one_line(lambda bad=bad: sample_burst(SMALL, params, jax.random.key(0), tokens, known,
                                               max_iters=bad), "max_iters must be an integer")
    _one_line(lambda: sample_ar(SMALL, params, 0, tokens, known), "typed PRNG key")


@pytest.mark.integration
def test_numpy_integers_work_wherever_ints_do(params):
    tokens, known = _inputs()
    np.testing.assert_array_equal(
        log_prob(SMALL, params, tokens, known, jax.random.key(0), n_orders=np.int64(2)),
        log_prob(SMALL, params, tokens, known, jax.random.key(0), n_orders=2))
    want = sample_burst(SMALL, params, jax.random.key(1), tokens, known, window=3, top_k=4,
                        max_iters=5)[0]
    got = sample_burst(SMALL, params, jax.random.key(1), np.asarray(tokens, np.int64), known,
                       window=np.int64(3), top_k=np.int32(4), max_iters=np.int64(5))[0]
    np.testing.assert_array_equal(got, want)
