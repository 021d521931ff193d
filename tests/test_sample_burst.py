"""Burst rejection sampling: exactness and the known-first convention (chi-square against
enumeration), greedy decoding against enumerated greedy AR, mechanics, per-row independence,
infilling, input checks and no recompilation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import (
    SMALL,
    chi_square_pvalue,
    enumerated_law,
    peaked_params,
    product_law_params,
    ragged_known,
)

from sigma_jax import ModelConfig
from sigma_jax.sampling.ar import _sample_ar, sample_ar
from sigma_jax.sampling.burst import _sample_burst, sample_burst

TINY = ModelConfig(vocab_size=3, block_size=4, n_layer=2, n_head=2, n_embd=16)
KNOWN = {0: 2, 2: 1}  # two scattered known tokens: their feeding order changes the law
N_SAMPLES = 20000


@pytest.fixture(scope="module")
def tiny_laws():
    """A peaked tiny model and its enumerated laws: nothing known, and KNOWN fed in the
    convention (every order of the known tokens) or ascending."""
    params = peaked_params(TINY, 11, scale=6.0, sharpness=2.0)
    laws = {"none": enumerated_law(TINY, params, 4),
            "random": enumerated_law(TINY, params, 4, KNOWN),
            "ascending": enumerated_law(TINY, params, 4, KNOWN, known_order="ascending")}
    return params, laws


def _tiny_inputs(known_tokens, n_samples=N_SAMPLES):
    tokens = np.zeros((n_samples, 4), np.int32)
    known = np.zeros((n_samples, 4), bool)
    for pos, tok in known_tokens.items():
        tokens[:, pos], known[:, pos] = tok, True
    return jnp.asarray(tokens), jnp.asarray(known)


def _sample_tiny(params, sampler, known_tokens, seed, n_samples=N_SAMPLES, **kw):
    tokens, known = _tiny_inputs(known_tokens, n_samples)
    if sampler == "ar":
        return sample_ar(TINY, params, jax.random.key(seed), tokens, known, **kw)
    return sample_burst(TINY, params, jax.random.key(seed), tokens, known, **kw)


@pytest.mark.integration
def test_enumerated_laws_are_normalised(tiny_laws):
    _, laws = tiny_laws
    for _, probs in laws.values():
        np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
    assert 0.5 * np.abs(laws["random"][1] - laws["ascending"][1]).sum() > 0.03  # they differ


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.integration
def test_exact_mode_follows_the_random_order_law(tiny_laws, window):
    params, laws = tiny_laws
    samples, stats = _sample_tiny(params, "burst", {}, 0, mode="exact", window=window)
    p_value, chi2, df = chi_square_pvalue(samples, *laws["none"])
    assert p_value > 1e-3, (p_value, chi2, df)
    assert bool(stats.finished.all())


@pytest.mark.parametrize("draft_support, window", [(1, 2), (2, None)])
@pytest.mark.integration
def test_jacobi_with_truncated_first_drafts_follows_the_law(tiny_laws, draft_support, window):
    """Jacobi's first drafts drawn from their K < V most probable tokens (K = 1: the argmax,
    deterministic) are still accepted by the distribution they came from: the law is exact."""
    params, laws = tiny_laws
    samples, stats = _sample_tiny(params, "burst", {}, 4, mode="jacobi", window=window,
                                  draft_support=draft_support)
    p_value, chi2, df = chi_square_pvalue(samples, *laws["none"])
    assert p_value > 1e-3, (p_value, chi2, df)
    assert bool(stats.finished.all())


@pytest.mark.integration
def test_jacobi_drafted_from_the_start_token_alone_follows_the_known_token_law(tiny_laws):
    """first_drafts='start': every first draft is drawn as if nothing were known, yet the
    samples with KNOWN follow the law given KNOWN (acceptance divides by what was drawn from)."""
    params, laws = tiny_laws
    samples, stats = _sample_tiny(params, "burst", KNOWN, 7, mode="jacobi", window=2,
                                  first_drafts="start")
    p_value, chi2, df = chi_square_pvalue(samples, *laws["random"])
    assert p_value > 1e-3, (p_value, chi2, df)
    assert bool(stats.finished.all())


@pytest.mark.integration
def test_random_order_ar_follows_the_same_law(tiny_laws):
    params, laws = tiny_laws
    samples, _ = _sample_tiny(params, "ar", {}, 1)
    p_value, chi2, df = chi_square_pvalue(samples, *laws["none"])
    assert p_value > 1e-3, (p_value, chi2, df)


@pytest.mark.parametrize("sampler, known_order", [("burst", "random"), ("ar", "random"),
                                                  ("burst", "ascending"), ("ar", "ascending"),
                                                  ("jacobi", "random")])
@pytest.mark.integration
def test_samplers_follow_the_known_first_convention(tiny_laws, sampler, known_order):
    """With two scattered known tokens, both exact burst modes and random-order AR sample the
    enumerated law of the convention (the average over the known tokens' orders, or the
    ascending one), and the same test rejects the other law: it can tell them apart."""
    params, laws = tiny_laws
    kw = {"burst": dict(mode="exact"), "jacobi": dict(mode="jacobi"), "ar": {}}[sampler]
    samples, _ = _sample_tiny(params, sampler, KNOWN, 2, known_order=known_order, **kw)
    other = "ascending" if known_order == "random" else "random"
    p_value, chi2, df = chi_square_pvalue(samples, *laws[known_order])
    assert p_value > 1e-3, (p_value, chi2, df)
    assert chi_square_pvalue(samples, *laws[other])[0] < 1e-3


@pytest.mark.integration
def test_paper_mode_is_biased_on_a_peaked_model(tiny_laws):
    """Negative control: the published rule (best of K orders, no residual) fails the same test,
    so the test above has the power to catch a non-exact sampler. The bias is large: 2,000
    samples give chi2 of about 650 on 75 degrees of freedom."""
    params, laws = tiny_laws
    samples, _ = _sample_tiny(params, "burst", {}, 0, n_samples=2000, mode="paper", n_orders=5)
    assert chi_square_pvalue(samples, *laws["none"])[0] < 1e-3


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
@pytest.mark.integration
def test_exact_mode_in_bfloat16_follows_the_bfloat16_model_law(mode):
    """The same chi-square test with bfloat16 activations, cache and weights, against the law
    that teacher-forced bfloat16 passes enumerate (both exact modes)."""
    cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                          peaked_params(TINY, 11, scale=6.0, sharpness=2.0))
    seqs, probs = enumerated_law(cfg, params, 4)
    tokens, known = _tiny_inputs({})
    samples, stats = sample_burst(cfg, params, jax.random.key(3), tokens, known, window=2,
                                  mode=mode)
    p_value, chi2, df = chi_square_pvalue(samples, seqs, probs)
    assert p_value > 1e-3, (p_value, chi2, df)
    assert bool(stats.finished.all()) and int(stats.forward_passes) > 3


@pytest.mark.parametrize("mode", ["exact", "paper"])
@pytest.mark.integration
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


@pytest.mark.integration
def test_peaked_params_are_really_peaked():
    """Exact burst on the peaked models the sampler tests use (seeds 2-7) needs >= N/3
    iterations on average (N = 10, nothing known, 48 rows each) and >= N/4 on each model: most
    drafts are rejected, so the tests exercise the rejection path."""
    b, n = 48, 10
    tokens, known = jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool)
    means = [float(np.mean(sample_burst(SMALL, peaked_params(SMALL, seed), jax.random.key(seed),
                                        tokens, known)[1].iterations)) for seed in range(2, 8)]
    assert np.mean(means) >= n / 3 and min(means) >= n / 4, means


@pytest.mark.parametrize("mode, window", [("exact", None), ("exact", 3), ("paper", None),
                                          ("paper", 4)])
@pytest.mark.integration
def test_mechanics_on_a_peaked_model(mode, window):
    params = peaked_params(SMALL, 3)
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
    fewest = np.ceil(r / (window or n))
    assert (its <= r).all() and (its >= fewest).all()
    assert (its > fewest).any()  # some draft was rejected
    assert int(stats.forward_passes) == 1 + 2 * int(its.max())


@pytest.mark.integration
def test_max_iters_stops_and_reports_unfinished_rows():
    params = peaked_params(SMALL, 3)
    tokens = jnp.zeros((3, 10), jnp.int32)
    known = jnp.zeros((3, 10), bool).at[2].set(True)
    out, stats = sample_burst(SMALL, params, jax.random.key(0), tokens, known, window=2,
                              max_iters=2)
    np.testing.assert_array_equal(stats.finished, [False, False, True])
    assert (np.asarray(stats.generated[:2]) <= 4).all()
    assert int(stats.forward_passes) == 5


@pytest.mark.integration
def test_unconditional_generation_and_per_row_independence():
    """Each row of a batch (row 0 knows nothing) comes out as it does alone: moved to another
    slot of a same-shape batch whose other rows are fully known (so they stop at once and the
    loop runs only as long as this row needs), with its own key, it gives the same tokens in
    the same number of iterations."""
    params = peaked_params(SMALL, 4)
    b, n = 5, 10
    tokens = jax.random.randint(jax.random.key(0), (b, n), 0, SMALL.vocab_size)
    known = ragged_known(5, b, n)  # row 0 knows nothing
    keys = jax.random.split(jax.random.key(9), b)
    moved = (jnp.arange(b) - 2) % b  # slot s holds row s - 2
    for mode in ("exact", "paper"):
        batch, bstats = sample_burst(SMALL, params, keys, tokens, known, mode=mode, window=4)
        assert bool(bstats.finished.all()) and int(bstats.generated[0]) == n
        for row in range(b):
            slot = (row + 2) % b
            alone_known = jnp.ones((b, n), bool).at[slot].set(known[row])
            alone, astats = sample_burst(SMALL, params, keys[moved], tokens[moved], alone_known,
                                         mode=mode, window=4)
            np.testing.assert_array_equal(alone[slot], batch[row])
            assert int(astats.iterations[slot]) == int(bstats.iterations[row])
            assert int(astats.iterations.sum()) == int(bstats.iterations[row])  # only this row


@pytest.mark.integration
def test_greedy_exact_burst_is_greedy_ar_in_some_known_first_order():
    """On a context-dependent model, greedy exact burst commits, in the order it happens to
    follow, exactly what greedy AR would: each sample equals greedy AR in one of the
    enumerated known-first orders (2 known orders x 4! unknown orders), while different orders
    give different greedy completions."""
    n, known_pos = 6, [1, 4]
    params = peaked_params(SMALL, 7)
    base = np.array([0, 3, 0, 0, 8, 0], np.int32)
    unknown_pos = [i for i in range(n) if i not in known_pos]
    all_orders = [list(k) + list(u) for k in itertools.permutations(known_pos)
                  for u in itertools.permutations(unknown_pos)]
    m = len(all_orders)  # 48
    known = np.zeros((m, n), bool)
    known[:, known_pos] = True
    ar, _ = sample_ar(SMALL, params, jax.random.key(0), np.tile(base, (m, 1)), known,
                      order=jnp.array(all_orders, jnp.int32), temperature=0.0)
    greedy = {tuple(row) for row in np.asarray(ar).tolist()}
    assert len(greedy) >= 3  # the model is context-dependent: the order matters
    b = 16
    burst, stats = sample_burst(SMALL, params, jax.random.key(1), np.tile(base, (b, 1)),
                                known[:b], temperature=0.0)
    missing = [row for row in np.asarray(burst).tolist() if tuple(row) not in greedy]
    assert not missing, f"not greedy AR in any known-first order: {missing}"
    assert int(np.asarray(stats.iterations).max()) > 1  # rejections happened


@pytest.mark.parametrize("sampler", ["ar", "burst"])
@pytest.mark.integration
def test_no_recompilation_when_only_values_change(sampler):
    """New keys, tokens, masks, temperatures, top_p values and iteration caps reuse the kernel."""
    params = peaked_params(SMALL, 6)
    tokens = jax.random.randint(jax.random.key(0), (4, 10), 0, SMALL.vocab_size)
    known = ragged_known(1, 4, 10)
    if sampler == "ar":
        run, kernel, extra = sample_ar, _sample_ar, {}
    else:
        run, kernel, extra = sample_burst, _sample_burst, dict(window=3)
    run(SMALL, params, jax.random.key(0), tokens, known, top_p=0.9, **extra)
    before = kernel._cache_size()
    run(SMALL, params, jax.random.key(5), (tokens + 1) % 11, ragged_known(2, 4, 10),
        temperature=0.7, top_p=0.5, **extra)
    run(SMALL, params, jax.random.split(jax.random.key(3), 4), tokens, known, temperature=1.3,
        top_p=1.0, **extra)
    if sampler == "burst":
        run(SMALL, params, jax.random.key(4), tokens, known, top_p=0.3, max_iters=4, **extra)
    assert kernel._cache_size() == before


@pytest.mark.parametrize("sampler", ["ar", "burst"])
def test_bad_options_raise_one_line_errors(sampler):
    params = peaked_params(SMALL, 6)
    tokens = jnp.zeros((1, 10), jnp.int32)
    known = jnp.zeros((1, 10), bool)
    cases = [(dict(top_k=0), "top_k"), (dict(top_k=12), "top_k"), (dict(top_k=2.0), "top_k"),
             (dict(top_p=0.0), "top_p"), (dict(top_p=-0.5), "top_p"), (dict(top_p=1.5), "top_p"),
             (dict(top_p=jnp.float32(0.0)), "top_p"), (dict(temperature=-1.0), "temperature"),
             (dict(temperature=float("nan")), "temperature"),
             (dict(known_order="sorted"), "known_order")]
    if sampler == "burst":
        run = sample_burst
        cases += [(dict(mode="fast"), "mode"), (dict(window=0), "window"),
                  (dict(window=11), "window"), (dict(n_orders=0), "n_orders")]
    else:
        run = sample_ar
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            run(SMALL, params, jax.random.key(0), tokens, known, **kwargs)
        assert "\n" not in str(err.value)


@pytest.mark.integration
def test_a_traced_top_p_of_zero_keeps_the_top_token():
    """Unchecked (traced) top_p <= 0 reaches the kernel: the top token is kept, so sampling
    at temperature 1 with top_p = 0 is greedy decoding, never NaN."""
    from sigma_jax import sample_burst_call

    params = peaked_params(SMALL, 6)
    tokens = jax.random.randint(jax.random.key(0), (4, 10), 0, SMALL.vocab_size)
    known = ragged_known(1, 4, 10)
    call = sample_burst_call(SMALL, params, jax.random.key(2), tokens, known, window=3,
                             top_p=0.9)
    args = list(call.args)
    args[7] = jnp.float32(0.0)  # top_p, as a traced value the kernel cannot check
    out, stats = call.kernel(*args, **call.static)
    greedy, _ = sample_burst(SMALL, params, jax.random.key(2), tokens, known, window=3,
                             temperature=0.0, top_p=1.0)
    np.testing.assert_array_equal(out, greedy)
    assert bool(stats.finished.all())


@pytest.mark.parametrize("sampler", ["ar", "burst"])
@pytest.mark.integration
def test_prepared_call_compiles_ahead_of_time_and_matches_the_public_sampler(sampler):
    """One AOT-compiled executable serves prepared calls with other keys, tokens, masks and
    temperatures, and returns exactly what the public function returns for each."""
    from sigma_jax import sample_ar_call, sample_burst_call

    prepare, public = ((sample_ar_call, sample_ar) if sampler == "ar"
                       else (sample_burst_call, sample_burst))
    params = peaked_params(SMALL, 6)
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


@pytest.mark.parametrize("mode", ["exact", "jacobi"])
@pytest.mark.integration
def test_a_planted_mismatch_between_drawn_and_accepted_probabilities_fails(monkeypatch, mode):
    """The bfloat16 law test above can see acceptance computed from other probabilities than
    the drafts were drawn from: with every draw taken from p^2 (renormalized) while acceptance
    still divides by p, the same chi-square test rejects the samples. (Unplanted, acceptance
    reads the very float32 probabilities each draft was drawn from: `p` in exact mode, the
    stored `proposals` in jacobi mode.)"""
    from sigma_jax.sampling import burst_steps

    cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                          peaked_params(TINY, 11, scale=6.0, sharpness=2.0))
    seqs, probs = enumerated_law(cfg, params, 4)
    tokens, known = _tiny_inputs({})
    sharpened = lambda p: p * p / jnp.sum(p * p, axis=-1, keepdims=True)
    honest_draw, honest_draw_row = burst_steps.draw, burst_steps.draw_row
    monkeypatch.setattr(burst_steps, "draw", lambda keys, p: honest_draw(keys, sharpened(p)))
    monkeypatch.setattr(burst_steps, "draw_row",
                        lambda key, p: honest_draw_row(key, sharpened(p)))
    _sample_burst.clear_cache()  # retrace with the planted draw
    try:
        samples, _ = sample_burst(cfg, params, jax.random.key(3), tokens, known, window=2,
                                  mode=mode)
    finally:
        monkeypatch.undo()
        _sample_burst.clear_cache()
    p_value, chi2, df = chi_square_pvalue(samples, seqs, probs)
    assert p_value < 1e-6, (p_value, chi2, df)


@pytest.mark.parametrize("mode", ["exact", "jacobi", "paper"])
@pytest.mark.parametrize("group_bytes", [1, 2 * 3 * 11 * 4])  # 1 row per group; 2 of 6 rows
def test_rows_in_groups_give_the_same_samples(monkeypatch, mode, group_bytes):
    """Large batches run the output head, the draws and the verification in groups of rows
    (`draws.in_row_groups`) to bound memory; the samples must not change, bit for bit (paper
    mode: 2 candidate orders of 3, whose q of one row alone takes 2 x 3 x 11 x 4 bytes)."""
    from sigma_jax.sampling import draws

    cfg = ModelConfig(vocab_size=11, block_size=9, n_layer=1, n_head=2, n_embd=16)
    params = peaked_params(cfg, 5)
    tokens = jax.random.randint(jax.random.key(0), (6, 9), 0, cfg.vocab_size)
    known = ragged_known(3, 6, 9)
    order, orders = ("random", {"n_orders": 2}) if mode == "paper" else ("spread", {})
    run = lambda: sample_burst(cfg, params, jax.random.key(4), tokens, known, window=3,
                               mode=mode, order=order, **orders)
    whole, stats = run()
    monkeypatch.setattr(draws, "GROUP_BYTES", group_bytes)
    _sample_burst.clear_cache()  # retrace with the groups
    try:
        grouped, grouped_stats = run()
    finally:
        monkeypatch.undo()
        _sample_burst.clear_cache()
    np.testing.assert_array_equal(np.asarray(grouped), np.asarray(whole))
    np.testing.assert_array_equal(np.asarray(grouped_stats.forward_passes),
                                  np.asarray(stats.forward_passes))


@pytest.mark.parametrize("mode", ["exact", "jacobi", "paper"])
@pytest.mark.integration
def test_a_row_samples_the_same_alone_as_in_a_large_batch(mode):
    """Rows of a batch of 128 at N = 10, whose first-draft passes hold 8 positions of every
    row (decode.pass_slots), against the same rows sampled alone (one pass of all 10): the
    same tokens, bit for bit."""
    params = peaked_params(SMALL, 6)
    b, n = 128, SMALL.block_size
    tokens = jax.random.randint(jax.random.key(1), (b, n), 0, SMALL.vocab_size)
    known = ragged_known(5, b, n)
    keys = jax.random.split(jax.random.key(2), b)
    run = lambda rows: sample_burst(SMALL, params, keys[rows], tokens[rows], known[rows],
                                    mode=mode, window=4, order="random")[0]
    batch = np.asarray(run(slice(None)))
    for row in (0, 57, 127):
        np.testing.assert_array_equal(np.asarray(run(slice(row, row + 1)))[0], batch[row],
                                      err_msg=f"row {row}")
