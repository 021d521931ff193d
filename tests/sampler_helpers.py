"""Shared fixtures for the sampler tests: tiny models, product-law models, ragged masks, and a
chi-square test against an enumerated law."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax import ModelConfig, init_params, log_prob

SMALL = ModelConfig(vocab_size=11, block_size=10, n_layer=2, n_head=2, n_embd=16)


def peaked_params(cfg, seed=0, scale=6.0):
    """A random model with large weights, so conditionals are peaked and context-dependent."""
    params = init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


def product_law_params(cfg, seed=0):
    """A model whose every conditional is the same fixed distribution (ignores all context):
    the final LayerNorm's scale is zero, so the logits are ln_f.bias @ wte.T."""
    params = init_params(cfg, jax.random.key(seed))
    params["ln_f"]["scale"] = jnp.zeros_like(params["ln_f"]["scale"])
    params["ln_f"]["bias"] = 3.0 * jax.random.normal(jax.random.key(seed + 1), (cfg.n_embd,))
    return params


def ragged_known(seed, b, n, bos=True):
    """Different, non-prefix known sets per row (row 0 knows nothing when bos allows it)."""
    known = np.array(jax.random.bernoulli(jax.random.key(seed), 0.35, (b, n)))
    known[0] = False if bos else known[0]
    known[:, 0] |= not bos
    return jnp.asarray(known)


def enumerated_random_order_law(cfg, params, n):
    """The uniform-random-order AR law over all V^n sequences (nothing known): the average over
    all n! orders of exp(log_prob(x | order)). Returns (sequences [V^n, n], probs [V^n])."""
    seqs = jnp.array(list(itertools.product(range(cfg.vocab_size), repeat=n)), jnp.int32)
    known = jnp.zeros(seqs.shape, bool)
    total = np.zeros(seqs.shape[0])
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        order = jnp.broadcast_to(jnp.array(perm, jnp.int32), seqs.shape)
        total += np.exp(np.asarray(log_prob(cfg, params, seqs, known, order=order)[:, 0],
                                   np.float64))
    return seqs, total / len(perms)


def chi_square_pvalue(samples, probs, vocab_size):
    """Pearson chi-square of sample counts against probs, merging bins with expected count < 5
    into one; p-value = Q(df/2, chi2/2) (regularised upper incomplete gamma)."""
    n_samples, n = samples.shape
    index = np.asarray(samples) @ (vocab_size ** np.arange(n - 1, -1, -1))
    counts = np.bincount(index, minlength=len(probs)).astype(np.float64)
    expected = probs * n_samples
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    chi2 = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    df = int(keep.sum()) - 1
    return float(jax.scipy.special.gammaincc(df / 2.0, chi2 / 2.0)), chi2, df
