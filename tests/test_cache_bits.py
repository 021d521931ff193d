"""bfloat16 caches held as bits: per-layer buffers of uint16 patterns that the cached attention
reads, on CPU, in float32 blocks of slots. Checked against a float32 softmax reference on the
same bfloat16 values, against the whole-cache bfloat16 products other backends run, and in the
compiled program: no float32 copy of a whole layer's cache is left in it.

Block sizes are module constants read at trace time; each test that patches them uses shapes no
other test traces, so no cached trace of another size hides the patch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax import ModelConfig, cache_attention, init_params, sample_ar_call, sample_burst_call
from sigma_jax.attention import CAUSAL, DIAGONAL, SelfMask
from sigma_jax.cache import BF16_BITS, LayerCaches, as_entries, init_cache, split_layers, write
from sigma_jax.sampling import draws
from tests.test_attention import _reference, _self_mask


def _bf16_inputs(t, s, lengths, seed=3):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(kk, (3, t, 2, 8)).astype(jnp.bfloat16) for kk in keys[:3])
    k_cache, v_cache = (jax.random.normal(kk, (3, s, 2, 8)).astype(jnp.bfloat16)
                        for kk in keys[3:])
    cache_valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
    return q, k, v, k_cache, v_cache, cache_valid


def _bits(c):  # token layout [B, S, H, hd] bfloat16 -> heads-major uint16 bits
    return jax.lax.bitcast_convert_type(jnp.swapaxes(c, 1, 2), BF16_BITS)


@pytest.mark.parametrize("block_slots", [1, 4, 7])  # 7 of 7 slots: one block
@pytest.mark.parametrize("mask,t", [(CAUSAL, 5), (DIAGONAL, 4), (SelfMask(blocks=2), 6),
                                    (CAUSAL, 1)])
def test_widened_blocks_match_a_float32_reference(monkeypatch, block_slots, mask, t):
    """Rows with 7, 5 and 0 valid slots of 7; with 4-slot blocks the second block starts at
    slot 3 and must not count slot 3 twice."""
    monkeypatch.setattr(cache_attention, "WIDE_BLOCK_BYTES", 1)
    monkeypatch.setattr(cache_attention, "WIDE_BLOCK_SLOTS", block_slots)
    q, k, v, k_cache, v_cache, cache_valid = _bf16_inputs(t, 7, [7, 5, 0])
    got = cache_attention.cached_attention(q, k, v, _bits(k_cache), _bits(v_cache), cache_valid,
                                           mask, chunk=2)
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    want = _reference(*f32(q, k, v, k_cache, v_cache), cache_valid, _self_mask(mask, t))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_cpu_blocks_and_whole_bfloat16_products_agree(monkeypatch):
    """The two sides of the platform switch: float32 blocks (CPU) and whole-cache bfloat16
    products on the same bits (every other backend)."""
    monkeypatch.setattr(cache_attention, "WIDE_BLOCK_BYTES", 1)
    monkeypatch.setattr(cache_attention, "WIDE_BLOCK_SLOTS", 3)
    q, _, _, k_cache, v_cache, cache_valid = _bf16_inputs(4, 9, [9, 2, 6], seed=4)
    qh = jnp.swapaxes(q, 1, 2)
    scores_new = jnp.zeros((3, 2, 4, 1), jnp.float32)
    args = (qh, _bits(k_cache), _bits(v_cache), cache_valid, scores_new)
    y_blocks, p_blocks = cache_attention._widened_blocks(*args)
    y_whole, p_whole = cache_attention._whole(*args)
    np.testing.assert_allclose(np.asarray(y_blocks, np.float32), np.asarray(y_whole, np.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(p_blocks, p_whole, rtol=1e-5, atol=1e-6)


CFG = ModelConfig(vocab_size=7, block_size=24, n_layer=2, n_head=2, n_embd=16,
                  dtype="bfloat16", param_dtype="bfloat16")


def test_layer_caches_hold_bfloat16_as_bits_and_give_back_the_same_entries():
    cache = init_cache(CFG, 2, 6)
    entries = lambda x: jax.random.normal(jax.random.key(x), (2, 2, 3, 2, 8)).astype(jnp.bfloat16)
    layers = split_layers(cache)
    assert all(b.dtype == BF16_BITS for b in layers.k + layers.v)
    stacked = write(cache, entries(1), entries(2), jnp.array([3, 1]))
    held = layers.write(entries(1), entries(2), jnp.array([3, 1]))
    for got, want in ((held.stacked().k, stacked.k), (held.stacked().v, stacked.v)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    block = held.write_block(jnp.int32(4), entries(3), entries(4))
    np.testing.assert_array_equal(np.asarray(as_entries(block.k[1])[:, :, 4:], np.float32),
                                  np.asarray(jnp.swapaxes(entries(3)[1], 1, 2)[:, :, :2],
                                             np.float32))
    assert isinstance(block, LayerCaches) and block.k[0].dtype == BF16_BITS


@pytest.mark.parametrize("sampler", ["ar", "exact", "jacobi"])
def test_no_float32_copy_of_a_whole_layer_cache_is_compiled(monkeypatch, sampler):
    """XLA:CPU converts a bfloat16 buffer it multiplies or scatters into a float32 copy of all
    of it; the bits and the widened blocks leave none ([B, H, S, hd] float32) in the program."""
    monkeypatch.setattr(cache_attention, "WIDE_BLOCK_BYTES", 1)
    monkeypatch.setattr(cache_attention, "WIDE_BLOCK_SLOTS", 4)
    b, n, w = 3, 23, 4
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    spec = jax.ShapeDtypeStruct
    args = (params, spec((), jax.random.key(0).dtype), spec((b, n), jnp.int32),
            spec((b, n), jnp.bool_))
    if sampler == "ar":
        call, capacity = sample_ar_call, n + 1 + 1
    else:
        call = lambda *a: sample_burst_call(*a, mode=sampler, window=w, order="spread")
        capacity = n + 1 + w
    hlo = jax.jit(lambda *a: call(CFG, *a)()).lower(*args).compile().as_text()
    layer = f"{b},{CFG.n_head},{capacity},{CFG.head_dim}"
    assert re.search(rf"bf16\[(1,)?{layer}\]|u16\[(1,)?{layer}\]", hlo)  # the cache is there
    assert not re.search(rf"f32\[(1,)?{layer}\]", hlo), "a float32 copy of a layer's cache"


def test_grouped_draws_are_the_draws_of_one_group(monkeypatch):
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(5), (5, 3, 11)) * 3, axis=-1)
    keys = jax.random.split(jax.random.key(6), 5)
    together = draws.draw(keys, probs)
    monkeypatch.setattr(draws, "GROUP_BYTES", 2 * 3 * 11 * 4)  # two rows per group, one partial
    np.testing.assert_array_equal(draws.draw(keys, probs), together)
    monkeypatch.setattr(draws, "GROUP_BYTES", 1)  # one row per group
    np.testing.assert_array_equal(draws.draw(keys, probs), together)
