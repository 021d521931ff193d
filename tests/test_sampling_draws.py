"""The random pieces every sampler shares, against numpy reference formulas: the sampling
distribution of logits (temperature, top-k, top-p, greedy), per-row keys, draws and uniforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax.sampling.draws import draw, row_keys, to_probs, uniforms


def _reference_probs(logits, temperature, top_k=None, top_p=None):
    """numpy: softmax(logits / T) truncated to the top k, then to the smallest set of most
    probable tokens whose mass before each reaches top_p, renormalized; one-hot argmax at T=0."""
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        return np.eye(logits.shape[-1])[np.argmax(logits, -1)]
    keep = np.ones_like(logits, bool)
    if top_k is not None:
        kth = np.sort(logits, -1)[..., -top_k][..., None]
        keep &= logits >= kth
    z = np.where(keep, logits / temperature, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None:
        out = np.zeros_like(p)
        for idx in np.ndindex(p.shape[:-1]):
            row = p[idx]
            ranked = np.argsort(-row, kind="stable")
            before = np.cumsum(row[ranked]) - row[ranked]
            chosen = ranked[(before < top_p) | (np.arange(row.size) == 0)]
            out[idx][chosen] = row[chosen] / row[chosen].sum()
        p = out
    return p


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.7, None, None), (1.3, 3, None), (1.0, None, 0.6), (0.8, 4, 0.5),
    (0.0, None, None), (1.0, None, 1e-4),
])
def test_to_probs_matches_the_reference_formula(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.key(0), (3, 5, 9)) * 2.0
    got = to_probs(logits, jnp.float32(temperature), top_k,
                   None if top_p is None else jnp.float32(top_p))
    np.testing.assert_allclose(got, _reference_probs(logits, temperature, top_k, top_p),
                               atol=2e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-5)


def test_row_keys_use_per_row_keys_as_is_and_fold_a_single_key():
    key = jax.random.key(4)
    folded = row_keys(key, 3)
    for i in range(3):
        np.testing.assert_array_equal(jax.random.key_data(folded[i]),
                                      jax.random.key_data(jax.random.fold_in(key, i)))
    per_row = jax.random.split(key, 3)
    np.testing.assert_array_equal(jax.random.key_data(row_keys(per_row, 3)),
                                  jax.random.key_data(per_row))
    for bad, match in [(per_row, "3 per-row keys for a batch of 2"),
                       (jax.random.PRNGKey(0), "typed PRNG key"), (7, "typed PRNG key"),
                       (jax.random.split(key, (2, 2)), "one key per row")]:
        with pytest.raises(ValueError, match=match):
            row_keys(bad, 2)


def test_draw_follows_the_probabilities_and_uniforms_are_per_row_streams():
    probs = jnp.asarray([[0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])  # [B=2, V=3]
    keys = jax.random.split(jax.random.key(1), 4000)
    tokens = jax.vmap(lambda k: draw(jax.random.split(k, 2), probs))(keys)  # [4000, 2]
    assert (np.asarray(tokens[:, 0]) == 1).all() and set(np.unique(tokens[:, 1])) == {0, 2}
    share = float(np.mean(np.asarray(tokens[:, 1]) == 2))
    assert abs(share - 0.8) < 4 * np.sqrt(0.8 * 0.2 / 4000)
    u = uniforms(jax.random.split(jax.random.key(2), 2), (5,))
    assert u.shape == (2, 5) and not np.array_equal(u[0], u[1])
    np.testing.assert_array_equal(u[1], jax.random.uniform(jax.random.split(
        jax.random.key(2), 2)[1], (5,)))


@pytest.mark.parametrize("group_rows", [1, 2, 6])  # 6 of 6 rows: one vmapped group
def test_row_groups_recompute_the_head_bit_for_bit(monkeypatch, group_rows):
    """Exact burst draws from p = softmax(head(h)) in groups of rows and, after the verify pass,
    recomputes p at each row's first rejection the same way: the two must agree bit for bit (a
    one-position product may round differently), in one program, grouped or not."""
    from sigma_jax import ModelConfig, init_params
    from sigma_jax.model import head_logits
    from sigma_jax.sampling import draws

    cfg = ModelConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=24,
                      dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    b, w = 6, 5
    monkeypatch.setattr(draws, "GROUP_BYTES", group_rows * 4 * w * cfg.vocab_size)
    probs = lambda h: to_probs(head_logits(cfg, params, h[None])[0], jnp.float32(0.7), None,
                               None)

    @jax.jit
    def both(h, keys, at):
        drafted = lambda key, h: (draws.draw_row(key, probs(h)), probs(h))
        tokens, p = draws.in_row_groups(drafted, 4 * w * cfg.vocab_size, keys, h)
        again = draws.in_row_groups(lambda h, a: probs(h)[a], 4 * w * cfg.vocab_size, h, at)
        return tokens, p[jnp.arange(b), at], again

    h = (3 * jax.random.normal(jax.random.key(1), (b, w, cfg.n_embd))).astype(jnp.bfloat16)
    at = jnp.array([0, 4, 2, 2, 1, 3])
    tokens, p_at, again = both(h, jax.random.split(jax.random.key(2), b), at)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(p_at))
    assert tokens.shape == (b, w) and tokens.dtype == jnp.int32
