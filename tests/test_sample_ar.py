"""Any-order autoregressive sampling: cached == uncached, known tokens kept, per-row keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params, ragged_known

from sigma_jax import orders
from sigma_jax.sampling.ar import sample_ar

pytestmark = pytest.mark.integration  # every test here compiles and runs whole AR sampler kernels


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("order", ["left_to_right", "random", "fractal"])
def test_cached_equals_uncached_at_temperature_one(order, bos):
    cfg = SMALL.replace(bos=bos)
    params = peaked_params(cfg, 1)
    b, n = 5, 10
    tokens = jax.random.randint(jax.random.key(2), (b, n), 0, cfg.vocab_size)
    known = ragged_known(3, b, n, bos)
    cached, s1 = sample_ar(cfg, params, jax.random.key(4), tokens, known, order=order)
    uncached, s2 = sample_ar(cfg, params, jax.random.key(4), tokens, known, order=order,
                             use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(jnp.where(known, cached, tokens), tokens)  # known kept
    assert int(cached.min()) >= 0 and int(cached.max()) < cfg.vocab_size
    r = n - known.sum(1)
    np.testing.assert_array_equal(s1.generated, r)  # exactly R tokens each
    assert int(s1.forward_passes) == 1 + int(r.max())  # prefill + one call per step
    assert int(s2.forward_passes) == int(r.max())


def test_explicit_order_is_followed():
    """Greedy decoding in an explicit order equals step-by-step argmax of full forwards."""
    from sigma_jax import forward

    params = peaked_params(SMALL, 5)
    tokens = jnp.array([[3, 0, 0, 7, 0, 0, 0, 0, 0, 0]])
    known = tokens > 0
    order = jnp.array([[3, 0, 9, 2, 5, 1, 8, 4, 6, 7]])
    out, _ = sample_ar(SMALL, params, jax.random.key(0), tokens, known, order=order,
                       temperature=0.0)
    seq = np.array(tokens)
    for step in range(2, 10):
        inputs, p_in, p_out, _ = orders.make_batch(jnp.asarray(seq), order, bos=True,
                                                   bos_id=SMALL.bos_id)
        logits = forward(SMALL, params, inputs, p_in, p_out)
        seq[0, order[0, step]] = int(jnp.argmax(logits[0, step]))
    np.testing.assert_array_equal(out, seq)


def test_per_row_keys_make_rows_independent_of_the_batch():
    params = peaked_params(SMALL, 2)
    b, n = 6, 10
    tokens = jax.random.randint(jax.random.key(0), (b, n), 0, SMALL.vocab_size)
    known = ragged_known(1, b, n)
    keys = jax.random.split(jax.random.key(7), b)
    batch, _ = sample_ar(SMALL, params, keys, tokens, known)
    for row in (0, 3, 5):
        alone, _ = sample_ar(SMALL, params, keys[row : row + 1], tokens[row : row + 1],
                             known[row : row + 1])
        np.testing.assert_array_equal(alone[0], batch[row])


def test_top_k_one_is_greedy_and_bad_inputs_fail_early():
    params = peaked_params(SMALL, 3)
    tokens = jnp.zeros((2, 10), jnp.int32)
    known = jnp.zeros((2, 10), bool).at[:, 0].set(True)
    greedy, _ = sample_ar(SMALL, params, jax.random.key(0), tokens, known, temperature=0.0,
                          order="left_to_right")
    top1, _ = sample_ar(SMALL, params, jax.random.key(1), tokens, known, top_k=1,
                        order="left_to_right")
    np.testing.assert_array_equal(greedy, top1)
    with pytest.raises(ValueError, match="order"):
        sample_ar(SMALL, params, jax.random.key(0), tokens, known, order="spiral")
    with pytest.raises(ValueError, match="typed PRNG key"):
        sample_ar(SMALL, params, jax.random.PRNGKey(0), tokens, known)
    with pytest.raises(ValueError, match="block_size"):
        sample_ar(SMALL, params, jax.random.key(0), jnp.zeros((1, 12), jnp.int32),
                  jnp.zeros((1, 12), bool))
