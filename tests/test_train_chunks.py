"""The train step's gradient chunks and lanes (`loss_and_grads(chunk=..., lanes=...)`,
`rows_per_chunk`, `lanes_per_chunk`): the loss and gradient of a batch equal the unsplit ones,
and the chunk size and lanes follow the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.model import init_params
from sigma_jax.sharding import local_mesh
from sigma_jax.train import loss_and_grads
from sigma_jax.train.step import CPU_CHUNK_TOKENS, CPU_LANES, lanes_per_chunk, rows_per_chunk

CFG = ModelConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("accum,chunk,lanes", [(1, 2, 1), (1, 1, 1), (2, 3, 1), (1, 6, 2),
                                               (1, 2, 2), (2, 3, 3), (1, 6, 3)])
def test_chunked_loss_and_gradient_equal_the_whole_batch(accum, chunk, lanes):
    train_cfg = TrainConfig(order_policy="random", grad_accum=accum)
    params = init_params(CFG, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (6, 12), 0, 11)
    key = jax.random.key(2)
    run = jax.jit(lambda c, lanes: loss_and_grads(CFG, train_cfg, params, batch, key, 0, chunk=c,
                                                  lanes=lanes), static_argnums=(0, 1))
    loss, grads, orders = run(None, 1)
    loss_c, grads_c, orders_c = run(chunk, lanes)
    np.testing.assert_array_equal(orders_c, orders)  # the orders do not depend on the chunks
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_chunk_must_divide_the_micro_batch():
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="chunks of 4"):
        loss_and_grads(CFG, TrainConfig(), params, jnp.zeros((6, 12), jnp.int32),
                       jax.random.key(0), 0, chunk=4)


def test_lanes_must_divide_the_chunk():
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="into 4 lanes"):
        loss_and_grads(CFG, TrainConfig(), params, jnp.zeros((6, 12), jnp.int32),
                       jax.random.key(0), 0, chunk=6, lanes=4)


def test_lanes_per_chunk_on_one_cpu_device():
    mesh = local_mesh()
    assert CPU_LANES == 2
    assert lanes_per_chunk(8, mesh) == 2
    assert lanes_per_chunk(7, mesh) == 1  # no equal split
    assert lanes_per_chunk(1, mesh) == 1


def test_rows_per_chunk_on_one_cpu_device():
    mesh = local_mesh()
    assert mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"
    rows = CPU_CHUNK_TOKENS // 256
    assert rows_per_chunk(32, 256, mesh) == rows  # the reference step: 32 rows of 256
    assert rows_per_chunk(rows - 1, 256, mesh) == rows - 1  # small batches stay whole
    assert rows_per_chunk(7, CPU_CHUNK_TOKENS, mesh) == 1
    assert rows_per_chunk(12, CPU_CHUNK_TOKENS // 5, mesh) == 4  # a divisor, at most 5 rows
    assert rows_per_chunk(3, 4 * CPU_CHUNK_TOKENS, mesh) == 1
