"""Any-subset log-likelihoods and one-pass conditionals against enumeration and full forwards."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax import ModelConfig, conditionals, forward, init_params, log_prob, orders

TINY = ModelConfig(vocab_size=3, block_size=4, n_layer=2, n_head=2, n_embd=16)
ALL_SEQS = jnp.array(list(itertools.product(range(3), repeat=4)), jnp.int32)  # [81, 4]


def _params(cfg, seed=0):
    # Larger weights than the default init, so that the conditionals are far from uniform.
    params = init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)


@pytest.mark.parametrize("bos, encoding", [(True, "learned"), (True, "sinusoidal"),
                                           (False, "learned")])
def test_normalisation_over_all_sequences(bos, encoding):
    cfg = TINY.replace(bos=bos, pos_encoding=encoding)
    params = _params(cfg)
    order = jnp.broadcast_to(jnp.array([2, 0, 3, 1]), (81, 4))
    if bos:  # nothing known: the full joint sums to one
        known = jnp.zeros((81, 4), bool)
        total = jnp.exp(log_prob(cfg, params, ALL_SEQS, known, order=order)).sum()
        np.testing.assert_allclose(float(total), 1.0, atol=1e-5)
    # Known positions {2, 0}: for every assignment of the known tokens, the completions sum to 1.
    known = jnp.broadcast_to(jnp.array([True, False, True, False]), (81, 4))
    probs = np.exp(np.asarray(log_prob(cfg, params, ALL_SEQS, known, order=order)))[:, 0]
    key_of = np.asarray(ALL_SEQS)[:, [0, 2]] @ np.array([3, 1])
    sums = np.bincount(key_of, weights=probs, minlength=9)
    np.testing.assert_allclose(sums, np.ones(9), atol=1e-5)


def test_log_prob_matches_the_sum_of_autoregressive_conditionals():
    """log p(x_A | x_C) equals the sum of per-step log-softmax values of separate forwards."""
    cfg = ModelConfig(vocab_size=7, block_size=9, n_layer=2, n_head=2, n_embd=16)
    params = _params(cfg, 1)
    tokens = jax.random.randint(jax.random.key(2), (3, 9), 0, 7)
    known = jax.random.bernoulli(jax.random.key(3), 0.4, (3, 9))
    order = orders.random_order(jax.random.key(4), known)
    got = np.asarray(log_prob(cfg, params, tokens, known, order=order))[:, 0]
    inp, pin, pout, tgt = (np.asarray(x) for x in orders.make_batch(tokens, order, bos=True,
                                                                     bos_id=cfg.bos_id))
    for row in range(3):
        n_known = int(known[row].sum())
        total = 0.0
        for step in range(n_known, 9):  # a fresh forward for every unknown target
            cut = (slice(row, row + 1), slice(0, step + 1))
            logits = np.asarray(forward(cfg, params, inp[cut], pin[cut], pout[cut]), np.float64)
            z = logits[0, step]
            total += float(z[tgt[row, step]] - z.max() - np.log(np.exp(z - z.max()).sum()))
        np.testing.assert_allclose(got[row], total, atol=1e-5)


def test_log_prob_draws_independent_orders():
    params = _params(TINY)
    known = jnp.zeros((5, 4), bool)
    lp = np.asarray(log_prob(TINY, params, ALL_SEQS[:5], known, jax.random.key(0), n_orders=6))
    assert lp.shape == (5, 6)
    assert np.ptp(lp, axis=1).max() > 1e-3  # a random model is not order-consistent


def _conditional_by_full_forward(cfg, params, tokens, known, j):
    """p(x_j | x_known) from a teacher-forced pass with j placed right after the known tokens."""
    known_idx = [int(i) for i in np.flatnonzero(known)]
    rest = [i for i in range(len(known)) if i not in known_idx and i != j]
    order = jnp.array([known_idx + [j] + rest])
    inp, pin, pout, _ = orders.make_batch(np.asarray(tokens)[None], order, bos=cfg.bos,
                                          bos_id=cfg.bos_id)
    slot = len(known_idx) - (0 if cfg.bos else 1)
    logits = np.asarray(forward(cfg, params, inp, pin, pout), np.float64)[0, slot]
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


@pytest.mark.parametrize("bos", [True, False])
def test_conditionals_equal_full_forward_conditionals(bos):
    cfg = ModelConfig(vocab_size=11, block_size=10, n_layer=2, n_head=4, n_embd=32, bos=bos)
    params = _params(cfg, 2)
    b, n = 4, 10
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (b, n), 0, cfg.vocab_size))
    known = np.zeros((b, n), bool)
    known[0, [2, 7]] = True  # ragged, non-prefix known sets
    known[1, [0, 1, 5, 6, 9]] = True
    known[2, [4]] = True
    if bos:
        known[3] = False  # nothing known: unconditional marginals
    else:
        known[3, [8]] = True
    probs = np.asarray(conditionals(cfg, params, tokens, jnp.asarray(known),
                                    known_order="ascending"))
    assert probs.shape == (b, n, cfg.vocab_size)
    for row in range(b):
        for j in range(n):
            if known[row, j]:
                np.testing.assert_array_equal(probs[row, j], np.eye(11)[tokens[row, j]])
            else:
                expected = _conditional_by_full_forward(cfg, params, tokens[row], known[row], j)
                np.testing.assert_allclose(probs[row, j], expected, atol=1e-5)


def test_conditionals_follow_the_known_prefix_of_a_given_order():
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    params = _params(cfg, 3)
    tokens = jax.random.randint(jax.random.key(6), (1, 8), 0, 11)
    known = jnp.array([[False, True, False, True, True, False, False, False]])
    order = jnp.array([[4, 1, 3, 0, 2, 5, 6, 7]])  # known fed as 4, 1, 3
    probs = np.asarray(conditionals(cfg, params, tokens, known, order=order))
    for j in (0, 2, 5, 6, 7):
        rest = [i for i in (0, 2, 5, 6, 7) if i != j]
        o = jnp.array([[4, 1, 3, j] + rest])
        inp, pin, pout, _ = orders.make_batch(tokens, o, bos=True, bos_id=cfg.bos_id)
        expected = jax.nn.softmax(forward(cfg, params, inp, pin, pout)[0, 3])
        np.testing.assert_allclose(probs[0, j], np.asarray(expected), atol=1e-5)


KNOWN = jnp.array([False, True, False, True])  # two scattered known positions: 1 and 3


def _teacher_forced(cfg, params, tokens, order):
    """log-softmax of one teacher-forced pass in `order`: [B, T, V]."""
    inp, pin, pout, _ = orders.make_batch(tokens, order, bos=True, bos_id=cfg.bos_id)
    return jax.nn.log_softmax(forward(cfg, params, inp, pin, pout), axis=-1)


def test_log_prob_draws_its_orders_by_the_known_first_convention():
    """Every value of log_prob(key) is the teacher-forced value of one known-first order; both
    orders of the two known tokens occur about equally often (known_order='random'), only the
    ascending one with known_order='ascending'."""
    params = _params(TINY, 4)
    tokens = ALL_SEQS[40:41]
    known = KNOWN[None]
    firsts = {k: [list(k) + list(u) for u in itertools.permutations([0, 2])]
              for k in itertools.permutations([1, 3])}
    by_first = {k: np.asarray([float(log_prob(TINY, params, tokens, known, order=jnp.array([o]))
                                     [0, 0]) for o in os]) for k, os in firsts.items()}
    assert np.abs(by_first[(1, 3)][:, None] - by_first[(3, 1)][None]).min() > 1e-3
    for known_order, share in (("random", 0.5), ("ascending", 1.0)):
        lp = np.asarray(log_prob(TINY, params, tokens, known, jax.random.key(1), n_orders=400,
                                 known_order=known_order))[0]
        ascending = np.abs(lp[:, None] - by_first[(1, 3)][None]).min(1) < 1e-5
        descending = np.abs(lp[:, None] - by_first[(3, 1)][None]).min(1) < 1e-5
        assert (ascending | descending).all()
        np.testing.assert_allclose(ascending.mean(), share, atol=0.08)


def test_conditionals_feed_the_known_tokens_by_the_known_first_convention():
    """Each row of conditionals(key) is the next-token law after one order of the two known
    tokens, computed by a teacher-forced pass; over 200 rows both orders occur."""
    params = _params(TINY, 5)
    b = 200
    tokens = jnp.broadcast_to(ALL_SEQS[50], (b, 4))
    known = jnp.broadcast_to(KNOWN, (b, 4))
    got = np.asarray(conditionals(TINY, params, tokens, known, jax.random.key(2)))
    asc = np.asarray(conditionals(TINY, params, tokens[:1], known[:1], known_order="ascending"))
    want = {}
    for first in itertools.permutations([1, 3]):
        for j in (0, 2):
            order = jnp.array([list(first) + [j, 2 - j]])
            want[first, j] = np.exp(np.asarray(_teacher_forced(TINY, params, tokens[:1], order)
                                               [0, 2]))
    for j in (0, 2):
        np.testing.assert_allclose(asc[0, j], want[(1, 3), j], atol=1e-5)
        err = {f: np.abs(got[:, j] - want[f, j]).max(-1) for f in ((1, 3), (3, 1))}
        assert (np.minimum(err[(1, 3)], err[(3, 1)]) < 1e-5).all()
        assert 0.3 < (err[(1, 3)] < 1e-5).mean() < 0.7
    np.testing.assert_allclose(want[(1, 3), 0].sum(), 1.0, atol=1e-5)
    assert np.abs(want[(1, 3), 0] - want[(3, 1), 0]).max() > 1e-3  # the order matters


def test_bad_inputs_raise_one_line_errors():
    params = _params(TINY)
    known = jnp.zeros((2, 4), bool)
    with pytest.raises(ValueError, match="key"):
        log_prob(TINY, params, ALL_SEQS[:2], known)
    with pytest.raises(ValueError, match="token ids"):
        log_prob(TINY, params, ALL_SEQS[:2] + 5, known, jax.random.key(0))
    with pytest.raises(ValueError, match="known positions first"):
        log_prob(TINY, params, ALL_SEQS[:2], known.at[:, 3].set(True),
                 order=jnp.broadcast_to(jnp.arange(4), (2, 4)))
    with pytest.raises(ValueError, match="bos=False"):
        log_prob(TINY.replace(bos=False), _params(TINY.replace(bos=False)), ALL_SEQS[:2], known,
                 jax.random.key(0))
    with pytest.raises(ValueError, match="block_size"):
        conditionals(TINY, params, jnp.zeros((1, 5), jnp.int32), jnp.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        conditionals(TINY, params, ALL_SEQS[:2], known)
    with pytest.raises(ValueError, match="known_order"):
        log_prob(TINY, params, ALL_SEQS[:2], known, jax.random.key(0), known_order="sorted")
