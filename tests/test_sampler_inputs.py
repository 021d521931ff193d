"""The public samplers and density functions take their inputs the way users pass them (orders
as lists or arrays, numpy integers for int options) and refuse bad ones with one line, before
any work: empty batches and sequences, non-integer tokens, masks that are not bool [B, N] like
tokens, params of another model, keys and options of the wrong kind, n_orders < 1,
max_iters < 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params

from sigma_jax import (
    SampleOptions,
    burst_states,
    conditionals,
    init_params,
    log_prob,
    orders,
    sample_ar,
    sample_burst,
    sampling,
)


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


@pytest.mark.parametrize("name", FUNCTIONS)
def test_masks_shapes_and_params_of_another_model_fail_with_one_line(params, name):
    """A known mask that is not bool [B, N] like tokens, tokens of another shape (never
    broadcast), and params that are not those of the config: one line naming what is wrong."""
    run = FUNCTIONS[name]
    tokens, known = _inputs()
    _one_line(lambda: run(params, tokens, np.asarray(known, np.float32) * 0.5), "bool mask")
    _one_line(lambda: run(params, tokens, None), "bool mask")
    _one_line(lambda: run(params, tokens, known[:, :5]), r"both be \[B, N\]; got shapes")
    _one_line(lambda: run(params, tokens[0], known), r"both be \[B, N\]; got shapes \(10,\)")
    other = init_params(SMALL.replace(vocab_size=13), jax.random.key(0))
    _one_line(lambda: run(other, tokens, known), "'wte/embedding' has shape .* different models")
    fewer = {k: v for k, v in params.items() if k != "ln_f"}
    _one_line(lambda: run(fewer, tokens, known), "params lack 'ln_f/")
    as_ints = jax.tree.map(lambda x: x.astype(jnp.int32), params)
    _one_line(lambda: run(as_ints, tokens, known), "must be floating point")
    _one_line(lambda: run(None, tokens, known), "params must be the nested dict")


def test_keys_options_and_flags_of_the_wrong_kind_fail_with_one_line(params):
    tokens, known = _inputs()
    for density in (log_prob, conditionals):
        _one_line(lambda f=density: f(SMALL, params, tokens, known, jax.random.PRNGKey(0)),
                  "typed PRNG key")
        _one_line(lambda f=density: f(SMALL, params, tokens, known,
                                      jax.random.split(jax.random.key(0), 2)),
                  "one typed PRNG key; got shape")
    _one_line(lambda: sample_ar(SMALL, params, jax.random.key(0), tokens, known,
                                use_cache="no"), "use_cache must be True or False")
    _one_line(lambda: sample_ar({"vocab_size": 11}, params, jax.random.key(0), tokens, known),
              "cfg must be a sigma_jax.ModelConfig; got ")
    _one_line(lambda: init_params(None, jax.random.key(0)), "cfg must be a sigma_jax.ModelConfig")
    for bad in ("burst", None, {"sampler": "burst"}):
        _one_line(lambda bad=bad: sampling.sample(SMALL, params, jax.random.key(0), tokens,
                                                  known, bad), "must be a sigma_jax.SampleOptions")
    _one_line(lambda: sampling.sample(SMALL, params, jax.random.key(0), tokens, known,
                                      SampleOptions("ar"), order="spread"),
              "^order must be an explicit \\[B, N\\] integer array here; got the order kind "
              "'spread': set it in the options, SampleOptions\\(order='spread'\\)$")
    states = lambda **kw: burst_states(SMALL, params, jax.random.key(0), tokens, known, **kw)
    _one_line(lambda: states(options=SampleOptions("ar")), "sampler 'ar' does not run here")
    _one_line(lambda: states(options=SampleOptions("burst"), mode="jacobi"),
              "takes only order= and lengths=")
    _one_line(lambda: states(window=0), "window must be an integer")  # at the call, not later


def test_conditionals_ignore_the_tokens_at_unknown_positions(params):
    """Any value there, out-of-vocabulary ones included, gives the same conditionals."""
    tokens, known = _inputs()
    key = jax.random.key(2)
    want = conditionals(SMALL, params, jnp.where(known, tokens, 0), known, key)
    np.testing.assert_array_equal(
        conditionals(SMALL, params, jnp.where(known, tokens, 99), known, key), want)


@pytest.mark.integration
def test_a_model_without_start_token_reads_a_single_known_position(params):
    """bos=False at N = 1: the one position is known, so every sampler returns it, its log
    probability is 0 (nothing unknown) and its conditional is its one-hot."""
    cfg = SMALL.replace(bos=False)
    no_bos = init_params(cfg, jax.random.key(0))
    tokens, known = jnp.array([[3], [7]], jnp.int32), jnp.ones((2, 1), bool)
    for options in (SampleOptions("ar"), SampleOptions("ar_nocache"), SampleOptions("burst"),
                    SampleOptions("burst_jacobi"), SampleOptions("burst_paper")):
        out, stats = sampling.sample(cfg, no_bos, jax.random.key(1), tokens, known, options)
        np.testing.assert_array_equal(out, tokens)
        np.testing.assert_array_equal(stats.generated, [0, 0])
    np.testing.assert_array_equal(log_prob(cfg, no_bos, tokens, known, jax.random.key(1)), 0.0)
    np.testing.assert_array_equal(conditionals(cfg, no_bos, tokens, known, jax.random.key(1)),
                                  jax.nn.one_hot(tokens, cfg.vocab_size))


def test_a_known_order_an_explicit_order_would_ignore_is_refused(params):
    """An explicit order lists the known positions itself: known_order='ascending' beside it is
    one line in every sampler and density (before any work). The default passes, and so does a
    key given to a density with an explicit order (unread: the densities with and without it
    are equal)."""
    tokens, known = _inputs()
    order = orders.order_from_mask("spread", known)
    key = jax.random.key(0)
    message = "^known_order applies to the orders a sampler draws: an explicit order lists"
    for call in (lambda: sample_ar(SMALL, params, key, tokens, known, order=order,
                                   known_order="ascending"),
                 lambda: sample_burst(SMALL, params, key, tokens, known, order=order,
                                      known_order="ascending"),
                 lambda: sampling.prepare(SMALL, params, key, tokens, known,
                                          SampleOptions("ar", known_order="ascending"), order),
                 lambda: log_prob(SMALL, params, tokens, known, order=order,
                                  known_order="ascending"),
                 lambda: conditionals(SMALL, params, tokens, known, order=order,
                                      known_order="ascending")):
        _one_line(call, message)
    np.testing.assert_array_equal(log_prob(SMALL, params, tokens, known, key, order=order),
                                  log_prob(SMALL, params, tokens, known, order=order))
    np.testing.assert_array_equal(conditionals(SMALL, params, tokens, known, key, order=order),
                                  conditionals(SMALL, params, tokens, known, order=order))
