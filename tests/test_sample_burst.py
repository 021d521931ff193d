"""Burst rejection sampling: exactness (chi-square against enumeration), mechanics, per-row
independence, infilling, and no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import (
    SMALL,
    chi_square_pvalue,
    enumerated_random_order_law,
    peaked_params,
    product_law_params,
    ragged_known,
)

from sigma_jax import ModelConfig
from sigma_jax.sample_ar import sample_ar
from sigma_jax.sample_burst import _sample_burst, sample_burst

TINY = ModelConfig(vocab_size=3, block_size=4, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def tiny_law():
    params = peaked_params(TINY, 11, scale=4.0)
    seqs, probs = enumerated_random_order_law(TINY, params, 4)
    return params, seqs, probs


def _draw(params, mode, n_samples, seed, **kw):
    tokens = jnp.zeros((n_samples, 4), jnp.int32)
    known = jnp.zeros((n_samples, 4), bool)
    return sample_burst(TINY, params, jax.random.key(seed), tokens, known, mode=mode, **kw)


def test_enumerated_law_is_normalised(tiny_law):
    _, _, probs = tiny_law
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_exact_mode_follows_the_random_order_law(tiny_law, window):
    params, _, probs = tiny_law
    samples, stats = _draw(params, "exact", 20000, 0, window=window)
    p_value, chi2, df = chi_square_pvalue(np.asarray(samples), probs, 3)
    assert p_value > 1e-3, (p_value, chi2, df)
    assert bool(stats.finished.all())


def test_paper_mode_is_biased_on_a_peaked_model(tiny_law):
    """Negative control: the published rule (best of K orders, no residual) fails the same test,
    so the test above has the power to catch a non-exact sampler."""
    params, _, probs = tiny_law
    samples, _ = _draw(params, "paper", 20000, 0, n_orders=5)
    p_value, _, _ = chi_square_pvalue(np.asarray(samples), probs, 3)
    assert p_value < 1e-3


def test_random_order_ar_follows_the_same_law(tiny_law):
    params, _, probs = tiny_law
    tokens = jnp.zeros((20000, 4), jnp.int32)
    samples, _ = sample_ar(TINY, params, jax.random.key(1), tokens, jnp.zeros((20000, 4), bool))
    p_value, _, _ = chi_square_pvalue(np.asarray(samples), probs, 3)
    assert p_value > 1e-3


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_a_product_law_finishes_in_one_iteration(mode):
    cfg = SMALL
    params = product_law_params(cfg)
    b, n = 8, 10
    known = ragged_known(2, b, n)
    tokens = jnp.zeros((b, n), jnp.int32)
    out, stats = sample_burst(cfg, params, jax.random.key(0), tokens, known, mode=mode)
    np.testing.assert_array_equal(stats.iterations, np.where(known.all(1), 0, 1))
    assert int(stats.forward_passes) == 3  # prefill + one draft + one verify
    assert bool(stats.finished.all())


@pytest.mark.parametrize("mode, window", [("exact", None), ("exact", 3), ("paper", None),
                                          ("paper", 4)])
def test_mechanics_on_a_peaked_model(mode, window):
    params = peaked_params(SMALL, 3, scale=3.0)
    b, n = 6, 10
    tokens = jax.random.randint(jax.random.key(1), (b, n), 0, SMALL.vocab_size)
    known = ragged_known(4, b, n)
    out, stats = sample_burst(SMALL, params, jax.random.key(2), tokens, known, mode=mode,
                              window=window)
    r = np.asarray(n - known.sum(1))
    np.testing.assert_array_equal(jnp.where(known, out, tokens), tokens)  # known kept exactly
    assert int(out.min()) >= 0 and int(out.max()) < SMALL.vocab_size
    np.testing.assert_array_equal(stats.generated, r)
    its = np.asarray(stats.iterations)
    assert (its <= r).all() and (its >= np.ceil(r / (window or n))).all()
    assert int(stats.forward_passes) == 1 + 2 * int(its.max())


def test_max_iters_stops_and_reports_unfinished_rows():
    params = peaked_params(SMALL, 3, scale=3.0)
    tokens = jnp.zeros((3, 10), jnp.int32)
    known = jnp.zeros((3, 10), bool).at[2].set(True)
    out, stats = sample_burst(SMALL, params, jax.random.key(0), tokens, known, window=2,
                              max_iters=2)
    np.testing.assert_array_equal(stats.finished, [False, False, True])
    assert (np.asarray(stats.generated[:2]) <= 4).all()
    assert int(stats.forward_passes) == 5


def test_unconditional_generation_and_per_row_independence():
    params = peaked_params(SMALL, 4, scale=3.0)
    b, n = 5, 10
    tokens = jax.random.randint(jax.random.key(0), (b, n), 0, SMALL.vocab_size)
    known = ragged_known(5, b, n)  # row 0 knows nothing
    keys = jax.random.split(jax.random.key(9), b)
    for mode in ("exact", "paper"):
        batch, bstats = sample_burst(SMALL, params, keys, tokens, known, mode=mode, window=4)
        for row in range(b):
            alone, astats = sample_burst(SMALL, params, keys[row : row + 1],
                                         tokens[row : row + 1], known[row : row + 1], mode=mode,
                                         window=4)
            np.testing.assert_array_equal(alone[0], batch[row])
            assert int(astats.iterations[0]) == int(bstats.iterations[row])


def test_greedy_exact_burst_of_an_order_free_model_equals_greedy_ar():
    """With a context-free model, greedy burst and greedy AR both give the argmax everywhere."""
    params = product_law_params(SMALL, 3)
    tokens = jnp.zeros((2, 10), jnp.int32)
    known = jnp.zeros((2, 10), bool).at[1, 4].set(True)
    burst, _ = sample_burst(SMALL, params, jax.random.key(0), tokens, known, temperature=0.0)
    ar, _ = sample_ar(SMALL, params, jax.random.key(1), tokens, known, temperature=0.0)
    np.testing.assert_array_equal(burst, ar)


def test_no_recompilation_when_only_values_change():
    params = peaked_params(SMALL, 6, scale=3.0)
    tokens = jax.random.randint(jax.random.key(0), (4, 10), 0, SMALL.vocab_size)
    known = ragged_known(1, 4, 10)
    sample_burst(SMALL, params, jax.random.key(0), tokens, known, window=3)
    before = _sample_burst._cache_size()
    sample_burst(SMALL, params, jax.random.key(5), (tokens + 1) % 11, ragged_known(2, 4, 10),
                 window=3, temperature=0.7, max_iters=4, top_p=None)
    sample_burst(SMALL, params, jax.random.split(jax.random.key(3), 4), tokens, known, window=3,
                 temperature=1.3)
    assert _sample_burst._cache_size() == before


def test_bad_options_raise_one_line_errors():
    params = peaked_params(SMALL, 6)
    tokens = jnp.zeros((1, 10), jnp.int32)
    known = jnp.zeros((1, 10), bool)
    for kwargs, match in [(dict(mode="fast"), "mode"), (dict(window=0), "window"),
                          (dict(window=11), "window"), (dict(n_orders=0), "n_orders"),
                          (dict(top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=match):
            sample_burst(SMALL, params, jax.random.key(0), tokens, known, **kwargs)


@pytest.mark.parametrize("sampler", ["ar", "burst"])
def test_prepared_call_compiles_ahead_of_time_and_matches_the_public_sampler(sampler):
    """One AOT-compiled executable serves prepared calls with other keys, tokens, masks and
    temperatures, and returns exactly what the public function returns for each."""
    from sigma_jax import sample_ar_call, sample_burst_call

    prepare, public = ((sample_ar_call, sample_ar) if sampler == "ar"
                       else (sample_burst_call, sample_burst))
    params = peaked_params(SMALL, 6, scale=3.0)
    tokens = jax.random.randint(jax.random.key(0), (4, 10), 0, SMALL.vocab_size)
    cases = [(jax.random.key(1), tokens, ragged_known(1, 4, 10), 1.0),
             (jax.random.key(2), (tokens + 3) % 11, ragged_known(2, 4, 10), 0.6)]
    compiled = prepare(SMALL, params, *cases[0][:3]).lower().compile()
    for key, toks, known, temperature in cases:
        call = prepare(SMALL, params, key, toks, known, temperature=temperature)
        got = compiled(*call.args)
        want = public(SMALL, params, key, toks, known, temperature=temperature)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="temperature must be a scalar"):
        prepare(SMALL, params, jax.random.key(0), tokens, cases[0][2], temperature=jnp.ones(2))
