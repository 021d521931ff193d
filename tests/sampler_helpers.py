"""Shared fixtures for the sampler tests: tiny models, product-law models, ragged masks, and a
chi-square test against an enumerated law."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax import ModelConfig, init_params, log_prob

SMALL = ModelConfig(vocab_size=11, block_size=10, n_layer=2, n_head=2, n_embd=16)


def peaked_params(cfg, seed=0, scale=10.0, sharpness=4.0):
    """A random model with large weights (matrices x scale) and a sharpened readout (final
    LayerNorm scale x sharpness), so conditionals are peaked and strongly context-dependent: on
    SMALL with nothing known, exact burst needs >= N/3 iterations on average (a test checks it)."""
    params = init_params(cfg, jax.random.key(seed))
    params = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)
    params["ln_f"]["scale"] = params["ln_f"]["scale"] * sharpness
    return params


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


def enumerated_law(cfg, params, n, known_tokens=None, known_order="random", order=None):
    """The law of sample_ar(order='random') given known tokens, by brute force: the average over
    every known-first order (the known positions in every order, or ascending with
    known_order='ascending', then the unknown ones in every order) of exp(log_prob(x | order)),
    over all completions; with `order` (a list of the n positions, known ones first) the AR law
    along that one order. known_tokens: {position: token} (None = nothing known).
    Returns (sequences int32 [V^R, n], probs float64 [V^R]), sequences in lexicographic order."""
    known_tokens = known_tokens or {}
    kpos = sorted(known_tokens)
    upos = [i for i in range(n) if i not in known_tokens]
    seqs = np.zeros((cfg.vocab_size ** len(upos), n), np.int32)
    seqs[:, kpos] = [known_tokens[i] for i in kpos]
    seqs[:, upos] = list(itertools.product(range(cfg.vocab_size), repeat=len(upos)))
    known = jnp.zeros(seqs.shape, bool).at[:, kpos].set(True)
    known_perms = [kpos] if known_order == "ascending" else itertools.permutations(kpos)
    orders = [list(k) + list(u) for k in known_perms for u in itertools.permutations(upos)]
    orders = orders if order is None else [list(order)]
    total = np.zeros(seqs.shape[0])
    for order in orders:
        order = jnp.broadcast_to(jnp.array(order, jnp.int32), seqs.shape)
        lp = log_prob(cfg, params, jnp.asarray(seqs), known, order=order)[:, 0]
        total += np.exp(np.asarray(lp, np.float64))
    return seqs, total / len(orders)


def chi_square_pvalue(samples, seqs, probs):
    """Pearson chi-square of sample counts against probs over the sequences seqs [M, n]
    (lexicographic, as `enumerated_law` returns them), merging bins with expected count < 5
    into one; p-value = Q(df/2, chi2/2) (regularised upper incomplete gamma). A sample outside
    seqs gives p = 0."""
    samples, seqs = np.asarray(samples), np.asarray(seqs)
    base = max(int(seqs.max()), int(samples.max())) + 1
    weights = base ** np.arange(seqs.shape[1] - 1, -1, -1)
    index = np.searchsorted(seqs @ weights, samples @ weights)
    index = np.minimum(index, len(seqs) - 1)
    if not (seqs[index] == samples).all():
        return 0.0, np.inf, 0
    counts = np.bincount(index, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    chi2 = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    df = int(keep.sum()) - 1
    return float(jax.scipy.special.gammaincc(df / 2.0, chi2 / 2.0)), chi2, df


def two_sample_pvalue(a, b):
    """Pearson chi-square test that two sample sets [M, n] (equal sizes) come from one law:
    counts over the sequences seen, bins with a pooled count < 10 merged into one, p-value =
    Q(df/2, chi2/2) with df = bins - 1."""
    a, b = np.asarray(a), np.asarray(b)
    seqs, index = np.unique(np.concatenate([a, b]), axis=0, return_inverse=True)
    index = index.reshape(-1)
    count_a = np.bincount(index[: len(a)], minlength=len(seqs)).astype(np.float64)
    count_b = np.bincount(index[len(a):], minlength=len(seqs)).astype(np.float64)
    small = count_a + count_b < 10
    count_a = np.append(count_a[~small], count_a[small].sum())
    count_b = np.append(count_b[~small], count_b[small].sum())
    keep = count_a + count_b > 0
    count_a, count_b = count_a[keep], count_b[keep]
    expected = (count_a + count_b) / 2.0
    chi2 = float(np.sum((count_a - expected) ** 2 / expected + (count_b - expected) ** 2
                        / expected))
    df = len(count_a) - 1
    return float(jax.scipy.special.gammaincc(df / 2.0, chi2 / 2.0)), chi2, df
