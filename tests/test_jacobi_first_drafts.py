"""Jacobi's first drafts: each position's first distribution against the uncached model; the
passes of a batch whose rows share one history (B times fewer, the same values bit for bit)
against those of a batch whose rows differ; the engine's inserts of requests with no known
token, which run the passes once."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_helpers import SMALL, peaked_params

from sigma_jax.config import START_POS
from sigma_jax.model import forward
from sigma_jax.sampling import SampleOptions, burst_steps, engine
from sigma_jax.sampling.burst import sample_burst_call, start_state

K = 4  # draft_support: tokens kept of each first distribution
B = 256  # rows; at N = 10 each pass holds 4 positions of every row: 3 passes per row
NO_BOS = dataclasses.replace(SMALL, bos=False)


@contextlib.contextmanager
def _counted_passes():
    """A list that gets one entry per first-draft pass run by what is traced inside."""
    passes = []
    real = burst_steps.burst_pass

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: passes.append(1))
        return real(*args, **kwargs)

    burst_steps.burst_pass = counted
    try:
        yield passes
    finally:
        burst_steps.burst_pass = real


def _first_distributions(cfg, params, tokens, known, first_drafts="known"):
    """(first_ids, first_probs [B, N, K], first-draft passes run) of the jacobi start state
    along the left-to-right order, traced afresh so that the passes are counted."""
    call = sample_burst_call(cfg, params, jax.random.key(0), tokens, known, mode="jacobi",
                             window=2, draft_support=K, order="left_to_right",
                             first_drafts=first_drafts)
    _, _, keys, tokens, known, order, temperature, top_p, _, lengths, opts = call.args
    with _counted_passes() as passes:
        state = jax.jit(lambda *a: start_state(cfg, params, *a, temperature, top_p, opts))(
            keys, tokens, known, order, lengths)
        jax.block_until_ready(state)
    return np.asarray(state.first_ids), np.asarray(state.first_probs), len(passes)


def _batch(cfg, history: dict):
    """tokens, known [B, N]: every row knows the tokens of `history` {position: token}."""
    tokens = np.zeros((B, cfg.block_size), np.int32)
    known = np.zeros((B, cfg.block_size), bool)
    for pos, tok in history.items():
        tokens[:, pos], known[:, pos] = tok, True
    return tokens, known


def _uncached_first(cfg, params, history: dict):
    """The truncated first distributions given `history` fed in ascending order, one uncached
    forward pass per target position: (ids [N, K], probs [N, K])."""
    n = cfg.block_size
    fed = sorted(history.items())
    tok_in = ([cfg.bos_id] if cfg.bos else []) + [t for _, t in fed]
    pos_in = ([START_POS] if cfg.bos else []) + [p for p, _ in fed]
    pos_out = pos_in[1:] + [0]
    tile = lambda xs: jnp.tile(jnp.asarray(xs, jnp.int32)[None], (n, 1))
    targets = jnp.asarray(pos_out, jnp.int32)[None].repeat(n, 0).at[:, -1].set(jnp.arange(n))
    logits = forward(cfg, params, tile(tok_in), tile(pos_in), targets)[:, -1]  # [N, V]
    top, ids = jax.lax.top_k(jax.nn.softmax(logits), K)
    return np.asarray(ids), np.asarray(top / top.sum(-1, keepdims=True))


def _known_at(pos, tok):
    def change(tokens, known):
        tokens[-1, pos], known[-1, pos] = tok, True
    return change


def _moved(src, dst):
    def change(tokens, known):
        known[-1, src], known[-1, dst] = False, True
        tokens[-1, dst] = tokens[-1, src]
    return change


PROMPT = {1: 4, 6: 2}
CASES = {  # (config, the history of every row, how the last row's history is made another)
    "unconditional/another_cached_token": (SMALL, {}, _known_at(7, 3)),
    "prompt/another_cached_token": (SMALL, PROMPT, _known_at(1, 5)),
    "prompt/another_last_token": (SMALL, PROMPT, _known_at(6, 3)),
    "no_start_token/another_last_token": (NO_BOS, {3: 5}, _known_at(3, 6)),
    "no_start_token/another_last_position": (NO_BOS, {3: 5}, _moved(3, 4)),
}


def test_first_drafts_from_the_start_token_ignore_what_rows_know():
    """first_drafts='start': rows that know different tokens are drafted as if they knew
    nothing: 1 pass for the batch, the uncached model's distributions given the start token."""
    params = peaked_params(SMALL, 3)
    tokens, known = _batch(SMALL, PROMPT)
    _known_at(7, 3)(tokens, known)
    ids, probs, passes = _first_distributions(SMALL, params, tokens, known, first_drafts="start")
    assert passes == 1
    want_ids, want_probs = _uncached_first(SMALL, params, {})
    for row in (0, B - 1):
        np.testing.assert_array_equal(ids[row], want_ids)
        np.testing.assert_allclose(probs[row], want_probs, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_with_one_history_share_their_first_distributions(case):
    """B rows with one history run 1 first-draft pass, whose distributions equal the uncached
    model's; one row with another history (another cached token, another last token or last
    position) makes the batch run its 3 passes per row, and the other rows' distributions stay
    the same bit for bit."""
    cfg, history, another_history = CASES[case]
    params = peaked_params(cfg, 3)
    tokens, known = _batch(cfg, history)
    ids, probs, passes = _first_distributions(cfg, params, tokens, known)
    assert passes == 1
    want_ids, want_probs = _uncached_first(cfg, params, history)
    free = ~known[0]
    for row in (0, 99, B - 1):
        np.testing.assert_array_equal(ids[row][free], want_ids[free])
        np.testing.assert_allclose(probs[row][free], want_probs[free], rtol=2e-5, atol=1e-6)

    another_history(tokens, known)
    other_ids, other_probs, other_passes = _first_distributions(cfg, params, tokens, known)
    assert other_passes == 3
    np.testing.assert_array_equal(other_ids[:-1], ids[:-1])
    np.testing.assert_array_equal(other_probs[:-1], probs[:-1])
    assert not np.array_equal(other_probs[-1], probs[-1])


@pytest.mark.parametrize("first_drafts, want", [("known", [1, 0, 1, 0]),
                                                 ("start", [1, 0, 0, 0])])
def test_engine_inserts_run_the_passes_of_the_start_history_once(first_drafts, want):
    """Requests drafted from the start history alone (no known token, or first_drafts='start')
    after the first take their first distributions from the engine state (no pass); with
    'known', a request with known tokens runs its own. The kept distributions are the uncached
    model's (test_engine checks the served tokens against the one-shot sampler's, bit for
    bit)."""
    params = peaked_params(SMALL, 5)
    # an engine shape of this test alone (capacity, slots), so that its inserts trace afresh
    n, slots = SMALL.block_size - 1, 2 if first_drafts == "known" else 3
    options = SampleOptions("burst_jacobi", order="spread", window=2, draft_support=K,
                            first_drafts=first_drafts)
    state = engine.init(SMALL, options, slots, n)
    nothing, some = np.zeros(n, bool), np.arange(n) % 4 == 1
    tokens = np.arange(n, dtype=np.int32) % SMALL.vocab_size
    counts = []
    with _counted_passes() as passes:
        for i, known in enumerate([nothing, nothing, some, nothing]):
            before = len(passes)
            state = engine.insert(SMALL, params, state, jnp.int32(i % slots), tokens, known,
                                  np.int32(n), jax.random.key(i))
            jax.block_until_ready(state)
            counts.append(len(passes) - before)
    assert counts == want
    ids, probs, ready = state.start_first
    assert bool(ready)
    want_ids, want_probs = _uncached_first(SMALL, params, {})
    np.testing.assert_array_equal(np.asarray(ids), want_ids[:n])
    np.testing.assert_allclose(np.asarray(probs), want_probs[:n], rtol=2e-5, atol=1e-6)
