"""SampleOptions: every invalid option has its one-line message, numpy integers are ints, the
derived quantities follow their formulas, and the traced fields never recompile a kernel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params

from sigma_jax.sampling import SAMPLERS, SampleOptions, sample
from sigma_jax.sampling.burst import _sample_burst
from sigma_jax.sampling.options import model_calls

BAD = [
    (dict(sampler="fast"), "sampler must be one of"),
    (dict(order="zigzag"), "order must be one of"),
    (dict(order=np.zeros((2, 3), int)), "order must be one of .*shape \\(2, 3\\)"),
    (dict(sampler="burst_paper", order="spread"), "order='random'"),
    (dict(known_order="sorted"), "known_order"),
    (dict(window=0), "window must be an integer >= 1; got 0"),
    (dict(sampler="ar", window=3), "window applies to the burst samplers only; got sampler 'ar'"),
    (dict(window=2.0), "window must be an integer"),
    (dict(window=True), "window must be an integer"),
    (dict(n_orders=0), "n_orders must be an integer >= 1"),
    (dict(draft_support=0), "draft_support must be an integer >= 1"),
    (dict(sampler="burst_jacobi", first_drafts="none"), "first_drafts must be one of"),
    (dict(sampler="burst", first_drafts="start"), "first_drafts applies to burst_jacobi only"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=jnp.ones(2)), "temperature must be a scalar"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=0.0), "top_p must be None or in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be None or in \\(0, 1\\]"),
    (dict(top_p=jnp.float32(-0.5)), "top_p must be None or in \\(0, 1\\]"),
    (dict(max_iters=0), "max_iters must be an integer in \\[1, 2147483647\\]"),
    (dict(max_iters=-3), "max_iters must be an integer in \\[1, 2147483647\\]"),
    (dict(max_iters=10**12), "max_iters must be an integer in \\[1, 2147483647\\]"),
    (dict(window=jnp.ones(2, jnp.int32)), "window must be an integer"),
    (dict(max_iters=2.5), "max_iters must be an integer"),
    (dict(sampler="ar", max_iters=5), "max_iters applies to the burst samplers only; got "
                                      "sampler 'ar' with max_iters=5"),
    (dict(sampler="ar_nocache", max_iters=np.int64(5)), "max_iters applies to the burst"),
    (dict(sampler="ar", n_orders=3), "n_orders applies to burst_paper only; got sampler 'ar'"),
    (dict(sampler="burst", n_orders=2), "n_orders applies to burst_paper only; got sampler "
                                        "'burst' with n_orders=2"),
    (dict(sampler="burst_jacobi", n_orders=np.int32(2)), "n_orders applies to burst_paper"),
    (dict(sampler="burst_paper", draft_support=8), "draft_support applies to burst_jacobi "
                                                   "only; got sampler 'burst_paper'"),
    (dict(sampler="ar", draft_support=8), "draft_support applies to burst_jacobi only"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m.split()[0] + str(i)
                                                        for i, (_, m) in enumerate(BAD)])
def test_each_bad_option_has_its_one_line_message(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        SampleOptions(**changes)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_checks_that_need_the_model_and_the_length():
    too_large = [(SampleOptions(top_k=SMALL.vocab_size + 1),
                  f"top_k must be an integer in \\[1, {SMALL.vocab_size}\\]"),
                 (SampleOptions(window=11), "window must be an integer in \\[1, 10\\]")]
    for options, message in too_large:
        with pytest.raises(ValueError, match=message):
            options.check_for(SMALL, 10)
    with pytest.raises(ValueError, match="order='random'"):
        SampleOptions("burst_paper").check_for(SMALL, 10, explicit_order=True)
    SampleOptions(top_k=SMALL.vocab_size, window=10).check_for(SMALL, 10)  # the bounds pass
    with pytest.raises(ValueError, match="first_drafts='start' needs a model with a start token"):
        SampleOptions("burst_jacobi", first_drafts="start").check_for(
            dataclasses.replace(SMALL, bos=False), 10)
    SampleOptions("burst_jacobi", first_drafts="start").check_for(SMALL, 10)


def test_numpy_integers_are_ints_and_concrete_traced_values_are_python_numbers():
    options = SampleOptions("burst_paper", window=np.int64(4), n_orders=np.int32(3),
                            top_k=np.int64(2), temperature=jnp.float32(0.5),
                            top_p=np.float64(0.25), max_iters=jnp.int32(7))
    assert (options.window, options.n_orders, options.top_k, options.max_iters) == (4, 3, 2, 7)
    assert all(type(v) is int for v in (options.window, options.n_orders, options.top_k,
                                        options.max_iters))
    assert (options.temperature, options.top_p) == (0.5, 0.25)
    assert options == SampleOptions("burst_paper", window=4, n_orders=3, top_k=2,
                                    temperature=0.5, top_p=0.25, max_iters=7)
    assert hash(options) == hash(options.replace())


def test_the_traced_fields_are_a_property_of_the_type():
    assert SampleOptions.traced_fields() == ("temperature", "top_p", "max_iters")
    options = SampleOptions("burst", window=4, temperature=0.3, top_p=0.5, max_iters=2)
    assert options.static_part() == SampleOptions("burst", window=4)
    static = [f.name for f in dataclasses.fields(SampleOptions)
              if f.name not in SampleOptions.traced_fields()]
    assert static == ["sampler", "order", "window", "n_orders", "top_k", "known_order",
                      "draft_support", "first_drafts"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_derived_quantities_follow_their_formulas(sampler):
    n, n_known, iterations = 10, 3, 4
    burst = sampler.startswith("burst")
    for window in (None, 1, 4, 10) if burst else (None,):  # AR samplers take no window
        paper = {"n_orders": 3} if sampler == "burst_paper" else {}
        options = SampleOptions(sampler, window=window, **paper)
        w = (window or n) if burst else 1
        assert options.window_for(n) == w
        capacity = 0 if sampler == "ar_nocache" else n + int(SMALL.bos) + w
        assert options.cache_capacity(SMALL, n) == capacity
        calls = {"ar": 1 + (n - n_known), "ar_nocache": n - n_known,
                 "burst": 1 + 2 * iterations, "burst_paper": 1 + 2 * iterations,
                 "burst_jacobi": 2 + iterations}[sampler]
        assert options.expected_forward_passes(n, n_known, iterations) == calls
        kernel = options.kernel_options(n)
        assert (kernel.window, kernel.n_orders) == (w, 3 if sampler == "burst_paper" else 1)
        assert kernel.cache_capacity(SMALL, n) == n + int(SMALL.bos) + w


def test_options_a_sampler_ignores_are_refused_only_away_from_their_defaults():
    """Each sampler takes every default and the options it reads; an option it ignores is
    refused even as a tracer, and the traced values it reads go back into its options."""
    for sampler in SAMPLERS:
        SampleOptions(sampler, n_orders=5, draft_support=64, first_drafts="known")
        SampleOptions(sampler, n_orders=1)  # one order: what every sampler but the paper does
    SampleOptions("burst", window=3, max_iters=np.int64(2))
    SampleOptions("burst_paper", n_orders=2, max_iters=2)
    SampleOptions("burst_jacobi", draft_support=8, first_drafts="start", max_iters=2)
    assert SampleOptions("ar").reads("temperature") and not SampleOptions("ar").reads("max_iters")
    with pytest.raises(ValueError, match="max_iters applies to the burst samplers only"):
        jax.jit(lambda m: SampleOptions("ar", max_iters=m).temperature)(3)
    for sampler in SAMPLERS:
        options = SampleOptions(sampler, top_p=0.5)
        traced = options.traced_arguments(10)
        assert set(traced) == {"temperature", "top_p", *(("max_iters",) * options.is_burst)}
        assert int(traced.get("max_iters", 10)) == 10
        assert jax.jit(lambda t, o=options: o.static_part().replace(**t).top_p)(traced) == 0.5


def test_model_calls_of_arrays_and_ints_agree():
    steps = jnp.arange(5, dtype=jnp.int32)
    for mode in ("ar", "ar_nocache", "exact", "jacobi", "paper"):
        np.testing.assert_array_equal(model_calls(mode, steps),
                                      [model_calls(mode, int(s)) for s in steps])


def test_labels_name_the_sampler_order_and_window():
    assert SampleOptions("ar").label == "ar[random]"
    assert SampleOptions("burst_jacobi", order="spread").label == "burst_jacobi[spread](W=all)"
    assert SampleOptions("burst_paper", window=16).label == "burst_paper[random](W=16,K=5)"


@pytest.mark.integration
def test_traced_options_never_recompile_the_kernel():
    """Temperature, top_p and max_iters as Python numbers, numpy scalars or jax arrays, with
    any value, reuse the one compiled burst kernel."""
    params = peaked_params(SMALL, 6)
    tokens = jnp.zeros((2, 10), jnp.int32)
    known = jnp.zeros((2, 10), bool).at[1, 3].set(True)
    base = SampleOptions("burst", window=3, top_p=0.9)
    sample(SMALL, params, jax.random.key(0), tokens, known, base)
    before = _sample_burst._cache_size()
    for changes in (dict(temperature=0.3), dict(temperature=np.float64(2.0), top_p=0.2),
                    dict(temperature=jnp.float32(0.0), max_iters=2),
                    dict(max_iters=np.int64(9), top_p=jnp.float32(1.0))):
        _, stats = sample(SMALL, params, jax.random.key(1), tokens, known, base.replace(**changes))
        if "max_iters" in changes:
            assert int(stats.forward_passes) <= 1 + 2 * int(changes["max_iters"])
    assert _sample_burst._cache_size() == before
