"""The KV cache: per-row block writes land exactly where they should, and committed blocks give
the same conditionals as full forwards."""

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax import ModelConfig, forward, init_params, orders
from sigma_jax.cache import init_cache, write
from sigma_jax.decode import burst_pass, extend_pass, prefill

CFG = ModelConfig(vocab_size=11, block_size=10, n_layer=2, n_head=2, n_embd=16)


def _block(value, t):
    return jnp.full((CFG.n_layer, 2, t, CFG.n_head, CFG.head_dim), value, jnp.float32)


def test_per_row_writes_advance_independently():
    cache = init_cache(CFG, 2, 8)
    cache = write(cache, _block(1.0, 3), _block(1.0, 3), jnp.array([3, 1]))
    cache = write(cache, _block(2.0, 2), _block(2.0, 2), jnp.array([2, 2]))
    np.testing.assert_array_equal(cache.length, [5, 3])
    np.testing.assert_array_equal(cache.k[0, 0, 0, :, 0], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(cache.k[0, 1, 0, :, 0], [1, 2, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(cache.valid()[1], [1, 1, 1, 0, 0, 0, 0, 0])


def test_a_write_at_the_end_lands_in_place_and_never_shifts():
    cache = init_cache(CFG, 2, 6)
    cache = write(cache, _block(1.0, 5), _block(1.0, 5), jnp.array([5, 3]))
    # Row 0 writes its block at slots 5..7: slot 5 lands in place, the overhang is dropped.
    # (lax.dynamic_update_slice would clamp the start to 3 and overwrite valid slots 3 and 4.)
    cache = write(cache, _block(7.0, 3), _block(7.0, 3), jnp.array([1, 3]))
    np.testing.assert_array_equal(cache.k[0, 0, 0, :, 0], [1, 1, 1, 1, 1, 7])
    np.testing.assert_array_equal(cache.k[0, 1, 0, :, 0], [1, 1, 1, 7, 7, 7])
    np.testing.assert_array_equal(cache.length, [6, 6])


def test_committed_verify_block_gives_full_forward_conditionals():
    """Prefill known tokens, run a causal block of 3 new tokens, commit 2 of them (the cache
    invariant: everything accepted but the last), then the burst pass must equal teacher-forced
    conditionals of a full forward in the history order."""
    params = init_params(CFG, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params)
    b, n = 2, 10
    tokens = jax.random.randint(jax.random.key(1), (b, n), 0, CFG.vocab_size)
    known = jnp.array([[1, 0, 0, 1, 0, 0, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]], bool)
    order = orders.random_order(jax.random.key(2), known)
    n_known = known.sum(1).astype(jnp.int32)
    cache, last_tok, last_pos = prefill(CFG, params, tokens, order, n_known, n + 1 + 3)
    cache = cache.stacked()
    # Three new history entries per row: the next three positions of the order.
    new_pos = jnp.take_along_axis(order, n_known[:, None] + jnp.arange(3)[None], 1)
    new_tok = jnp.take_along_axis(tokens, new_pos, 1)
    tok_in = jnp.concatenate([last_tok[:, None], new_tok[:, :2]], 1)
    pos_in = jnp.concatenate([last_pos[:, None], new_pos[:, :2]], 1)
    _, k_new, v_new = extend_pass(CFG, params, cache, tok_in, pos_in, new_pos)
    cache = write(cache, k_new, v_new, jnp.array([3, 3]))  # commit [last, new_0, new_1]
    targets = jnp.broadcast_to(jnp.arange(n), (b, n))
    got = jax.nn.softmax(burst_pass(CFG, params, cache, new_tok[:, 2], new_pos[:, 2], targets))
    inputs, p_in, p_out, _ = orders.make_batch(tokens, order, bos=True, bos_id=CFG.bos_id)
    for row in range(b):
        hist = int(n_known[row]) + 3  # entries after the start token
        for j in range(n):
            if j in set(np.asarray(order[row, :hist])):
                continue
            p_out_j = p_out[row : row + 1, : hist + 1].at[0, hist].set(j)
            logits = forward(CFG, params, inputs[row : row + 1, : hist + 1],
                             p_in[row : row + 1, : hist + 1], p_out_j)
            np.testing.assert_allclose(got[row, j], jax.nn.softmax(logits[0, hist]), atol=1e-5)


def test_prefill_in_several_passes_matches_one_pass_and_the_full_forward():
    """A prefill of 3-slot passes (6 tokens per pass at B = 2) commits the entries of a one-pass
    prefill, and the conditionals it gives equal a teacher-forced full forward: every pass
    attends to the passes before it, and rows of different known counts stop where they should."""
    params = init_params(CFG, jax.random.key(3))
    b, n = 2, 10
    tokens = jax.random.randint(jax.random.key(4), (b, n), 0, CFG.vocab_size)
    known = jnp.arange(n)[None, :] < jnp.array([[8], [4]])  # 8 and 4 known tokens
    order = orders.random_order(jax.random.key(5), known)
    n_known = known.sum(1).astype(jnp.int32)
    several, tok_a, pos_a = prefill(CFG, params, tokens, order, n_known, n + 2, tokens_per_pass=6)
    one, tok_b, pos_b = prefill(CFG, params, tokens, order, n_known, n + 2, tokens_per_pass=64)
    several, one = several.stacked(), one.stacked()
    np.testing.assert_array_equal(several.length, n_known)  # history minus the last, start in
    np.testing.assert_array_equal(one.length, n_known)
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_array_equal(pos_a, pos_b)
    for row in range(b):
        m = int(n_known[row])
        np.testing.assert_allclose(several.k[:, row, :, :m], one.k[:, row, :, :m], atol=1e-5)
        np.testing.assert_allclose(several.v[:, row, :, :m], one.v[:, row, :, :m], atol=1e-5)
    targets = jnp.broadcast_to(jnp.arange(n), (b, n))
    got = jax.nn.softmax(burst_pass(CFG, params, several, tok_a, pos_a, targets))
    inputs, p_in, p_out, _ = orders.make_batch(tokens, order, bos=True, bos_id=CFG.bos_id)
    for row in range(b):
        m = int(n_known[row])
        rep = [jnp.broadcast_to(x[row, : m + 1], (n, m + 1)) for x in (inputs, p_in, p_out)]
        p_out_j = rep[2].at[:, m].set(jnp.arange(n))  # every position as the next target
        logits = forward(CFG, params, rep[0], rep[1], p_out_j)[:, m]  # [N, V]
        np.testing.assert_allclose(got[row], jax.nn.softmax(logits), atol=1e-5)
