"""The serving engine: each request's tokens are bitwise those of the one-shot sampler on it
alone with the same key and options, whatever slot it lands in, whenever it is inserted and
whoever shares the batch; steady state never recompiles; bad requests are refused alone."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params

from sigma_jax.sampling import SampleOptions, engine, sample
from sigma_jax.sampling import serving as serve_lib
from sigma_jax.sampling.serving import Request, serve

N = 10


@pytest.fixture(scope="module")
def params():
    return peaked_params(SMALL, 4)


def _requests(count, seed=0):
    """Mixed lengths in [2, N], scattered known tokens (some rows none), one key each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        length = int(rng.integers(2, N + 1))
        known = rng.random(length) < (0.0 if i % 3 == 0 else 0.35)
        tokens = rng.integers(0, SMALL.vocab_size, length).astype(np.int32)
        out.append(Request(tokens, known, jax.random.key(1000 + i)))
    return out


def _alone(params, request, options):
    """The one-shot sampler on the request alone, with its key: at N = the engine's capacity
    with the request's length (test_ragged: the same as at N = its length when the window
    fits)."""
    tokens, known, length = _pad(request)
    out, stats = sample(SMALL, params, request.key[None], tokens[None], known[None], options,
                        lengths=[length])
    return np.asarray(out)[0, :length], jax.device_get(stats)


OPTIONS = [SampleOptions("ar", order="spread"),
           SampleOptions("burst", order="random", window=3),
           SampleOptions("burst_jacobi", order="spread", window=2),
           SampleOptions("burst_jacobi", order="random"),
           SampleOptions("burst_jacobi", order="spread", window=3, temperature=0.7, top_p=0.9,
                         first_drafts="start"),
           SampleOptions("burst_paper", window=3, n_orders=2, temperature=0.8, top_k=6)]


@pytest.mark.parametrize("options", OPTIONS, ids=[o.label for o in OPTIONS])
@pytest.mark.integration
def test_served_requests_are_bitwise_the_one_shot_samples(params, options):
    requests = _requests(7, seed=1)
    results = list(serve(SMALL, params, requests, slots=3, options=options, capacity=N))
    assert sorted(r.index for r in results) == list(range(7))
    for r in results:
        want, stats = _alone(params, requests[r.index], options)
        assert r.error is None
        np.testing.assert_array_equal(r.tokens, want, err_msg=f"request {r.index}")
        np.testing.assert_array_equal(r.stats.generated, stats.generated)
        np.testing.assert_array_equal(r.stats.iterations, stats.iterations)
        assert int(r.stats.forward_passes) == int(stats.forward_passes)


@pytest.mark.integration
def test_a_request_samples_the_same_in_any_slot_at_any_time(params):
    """The same request inserted into slot 0 of an idle engine, and into slot 2 of a busy one
    three steps later, with other requests around it."""
    options = SampleOptions("burst", order="spread", window=2)
    request, *others = _requests(4, seed=2)
    args = lambda r: (*_pad(r), r.key)

    state = engine.init(SMALL, options, 3, N)
    state = engine.insert(SMALL, params, state, jnp.int32(0), *args(request))
    for _ in range(N):
        state = engine.step(SMALL, params, state)
    first, _ = engine.result(state, jnp.int32(0))

    state = engine.init(SMALL, options, 3, N)
    state = engine.insert(SMALL, params, state, jnp.int32(0), *args(others[0]))
    state = engine.insert(SMALL, params, state, jnp.int32(1), *args(others[1]))
    state = engine.step(SMALL, params, state, 3)
    state = engine.insert(SMALL, params, state, jnp.int32(2), *args(request))
    state = engine.insert(SMALL, params, state, jnp.int32(0), *args(others[2]))
    state = engine.step(SMALL, params, state, N)
    second, _ = engine.result(state, jnp.int32(2))
    want, _ = _alone(params, request, options)
    length = len(request.tokens)
    np.testing.assert_array_equal(np.asarray(first)[:length], want)
    np.testing.assert_array_equal(np.asarray(second)[:length], want)
    assert bool(engine.finished(state)[2])


def _pad(request):
    tokens, known = np.zeros(N, np.int32), np.zeros(N, bool)
    length = len(request.tokens)
    tokens[:length], known[:length] = request.tokens, request.known
    return tokens, known, np.int32(length)


@pytest.mark.integration
def test_steady_state_never_recompiles_and_max_iters_caps_each_request(params):
    options = SampleOptions("burst_jacobi", order="spread", window=2, max_iters=2)
    list(serve(SMALL, params, _requests(2, seed=3), slots=2, options=options, capacity=N))
    functions = (engine._insert, serve_lib._advance, serve_lib._collect)
    sizes = [f._cache_size() for f in functions]
    assert all(sizes)
    requests = _requests(6, seed=4)
    results = list(serve(SMALL, params, requests, slots=2, options=options, capacity=N))
    assert [f._cache_size() for f in functions] == sizes
    for r in results:
        want, stats = _alone(params, requests[r.index], options)
        np.testing.assert_array_equal(r.tokens, want)
        assert int(r.stats.iterations[0]) <= 2
        np.testing.assert_array_equal(r.stats.finished, stats.finished)


def _exact(message):
    """pytest.raises' match for exactly `message`, one line."""
    return f"^{re.escape(message)}$"


def test_bad_requests_are_refused_alone(params):
    """Served with the default capacity (the longest request the model can serve: N here), so
    a request longer than block_size, or whose tokens are not [L], is refused alone."""
    good = _requests(2, seed=5)
    good[1] = Request(*_pad(good[1])[:2], good[1].key)  # length N
    bad = [Request(np.zeros(N + 1, np.int32), np.zeros(N + 1, bool), jax.random.key(0)),
           Request(np.full(3, 99, np.int32), np.ones(3, bool), jax.random.key(0)),
           Request(np.zeros(3, np.float32), np.zeros(3, bool), jax.random.key(0)),
           Request(np.zeros(3, np.int32), np.zeros(3, bool), 7),
           Request(None, np.zeros(3, bool), jax.random.key(0)),
           Request(np.int32(3), np.bool_(False), jax.random.key(0)),
           (np.zeros(3, np.int32), np.zeros(3, bool), jax.random.key(0))]
    results = {r.index: r for r in serve(SMALL, params, [good[0], *bad, good[1]], slots=2,
                                          options=SampleOptions("ar"))}
    assert len(results) == 9 and results[0].error is None and results[8].error is None
    assert len(results[8].tokens) == N
    for index, match in zip(range(1, 8), ["request length 11 exceeds the model's block_size 10",
                                          "token ids", "integer ids", "typed PRNG key",
                                          "tokens and known must both be [L]; got () and (3,)",
                                          "tokens and known must both be [L]; got () and ()",
                                          "a request must be a sigma_jax.sampling.Request"],
                            strict=True):
        assert match in results[index].error and "\n" not in results[index].error
        assert results[index].tokens is None
    state = engine.init(SMALL, SampleOptions("burst"), np.int64(2), np.int64(N))
    assert (state.slots, state.capacity) == (2, N)
    tokens, known, length = _pad(good[0])
    for args, message in [((jnp.int32(2), tokens, known, length, good[0].key), "slot"),
                          ((-1, tokens, known, length, good[0].key), "slot"),
                          ((0, tokens[:5], known[:5], length, good[0].key), "\\[N\\] = \\[10\\]"),
                          ((0, tokens, known, 0, good[0].key), "length"),
                          ((0, tokens, known, N + 1, good[0].key), "length"),
                          ((0, tokens + 99, np.ones(N, bool), length, good[0].key), "token ids"),
                          ((0, tokens, known, length, 3), "typed PRNG key"),
                          ((0, tokens, known, np.array([length]), good[0].key),
                           _exact("length must be a scalar integer; got shape (1,)")),
                          ((np.array([0]), tokens, known, length, good[0].key),
                           _exact("slot must be a scalar integer; got shape (1,)"))]:
        with pytest.raises(ValueError, match=message):
            engine.insert(SMALL, params, state, *args)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=_exact(f"iterations must be an integer >= 1; got "
                                                    f"{bad}")):
            engine.step(SMALL, params, state, bad)
    for bad in (2, -1):
        with pytest.raises(ValueError, match="slot"):
            engine.result(state, bad)
        with pytest.raises(ValueError, match="slot"):
            engine.release(state, bad)
    with pytest.raises(ValueError, match="steps_per_call"):
        next(serve(SMALL, params, good, slots=2, options=SampleOptions("ar"), steps_per_call=0))
    with pytest.raises(ValueError, match=_exact("options must be a sigma_jax.SampleOptions, "
                                                "e.g. SampleOptions('burst_jacobi'); got None")):
        next(serve(SMALL, params, good, slots=2, options=None))
    for bad_init, message in [(dict(options=SampleOptions("ar_nocache")), "ar_nocache"),
                              (dict(slots=0), "slots"), (dict(capacity=SMALL.block_size + 1),
                                                         "capacity"),
                              (dict(options=SampleOptions(window=N + 1)), "window"),
                              (dict(options="burst"), _exact(
                                  "options must be a sigma_jax.SampleOptions, e.g. "
                                  "SampleOptions('burst_jacobi'); got 'burst'")),
                              (dict(slots=True), _exact("slots must be an integer >= 1; got True")),
                              (dict(capacity=True), _exact(
                                  f"capacity must be an integer in [1, {N}]; got True"))]:
        kwargs = dict(options=SampleOptions("burst"), slots=2, capacity=N) | bad_init
        with pytest.raises(ValueError, match=message):
            engine.init(SMALL, kwargs["options"], kwargs["slots"], kwargs["capacity"])


def test_serve_takes_numpy_and_array_integers_and_refuses_bad_devices(params):
    """slots, capacity and steps_per_call as numpy or 0-d array integers, with or without
    devices, serve what Python ints serve; bad requests or devices are one line each."""
    requests = _requests(2, seed=5)
    options = SampleOptions("ar")
    tokens = lambda results: {r.index: r.tokens.tolist() for r in results}
    want = tokens(serve(SMALL, params, requests, slots=2, options=options, capacity=N))
    for slots, capacity, steps, devices in [(np.int64(2), jnp.int32(N), np.int64(1),
                                             jax.devices()[:1]),
                                            (jnp.int32(2), np.int64(N), jnp.int32(1), None)]:
        assert tokens(serve(SMALL, params, requests, slots=slots, options=options,
                            capacity=capacity, steps_per_call=steps, devices=devices)) == want
    one_device = "devices must be a non-empty list of jax devices, e.g. jax.devices(); got "
    for kwargs, message in [(dict(devices=[]), one_device + "[]"),
                            (dict(devices=jax.devices()[0]), one_device),
                            (dict(devices=["cpu"]), one_device + "['cpu']"),
                            (dict(devices=jax.devices()[:1] * 3),
                             "slots (2) must be at least the number of devices (3): each "
                             "device runs an engine of >= 1 slot"),
                            (dict(slots=np.int64(0), devices=jax.devices()[:1]),
                             "slots must be an integer >= 1; got 0"),
                            (dict(requests=None), "requests must be an iterable of "
                                                  "sigma_jax.sampling.Request; got None")]:
        kwargs = dict(requests=requests, slots=2, options=options) | kwargs
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            next(serve(SMALL, params, kwargs.pop("requests"), **kwargs))


def test_a_donated_state_is_refused_in_one_line(params):
    """step, insert and release donate the state they are given: passing it again to any
    engine function is one line saying so (checked before any work; tracers pass)."""
    state = engine.init(SMALL, SampleOptions("ar"), 2, N)
    fresh = engine.release(state, 0)
    request = (*_pad(_requests(1)[0])[:3], jax.random.key(0))
    donated = ("this engine state was donated to an earlier step, insert or release and its "
               "buffers are deleted: use the state that call returned")
    for call in (lambda s: engine.step(SMALL, params, s),
                 lambda s: engine.insert(SMALL, params, s, 0, *request),
                 lambda s: engine.release(s, 0), lambda s: engine.result(s, 0),
                 engine.finished):
        with pytest.raises(ValueError, match=_exact(donated)):
            call(state)
        with pytest.raises(ValueError, match=_exact("state must be an engine state "
                                                    "(engine.init); got 'state'")):
            call("state")
    assert not np.asarray(engine.finished(fresh)).any()
    assert not np.asarray(jax.jit(engine.finished)(fresh)).any()
    assert engine.result(fresh, 1)[0].shape == (N,)
