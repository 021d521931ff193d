"""The fused cache-free causal kernel (`ModelConfig.attention="fused"`,
jax.nn.dot_product_attention) against a plain reference and against the blocked kernel: the same
logits and gradients on CPU, the setting validated, 'auto' blocked on CPU, old configs loading."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from sigma_jax import ModelConfig, forward, init_params, log_prob, orders
from sigma_jax.attention import causal_kernel, fused_causal_attention
from sigma_jax.pretrained import MODELS, WEIGHTS_DIR, read
from sigma_jax.train import loss_fn

N = 80  # more than one query block (64) of the blocked kernel


def _cfg(attention: str, dtype: str = "float32", dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=23, block_size=N, n_layer=2, n_head=4, n_embd=32,
                       dropout=dropout, dtype=dtype, param_dtype=dtype, attention=attention)


def _batch(b: int = 3, seed: int = 0):
    """tokens int32 [b, N] and random orders int32 [b, N]."""
    k_tok, k_ord = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k_tok, (b, N), 0, 23)
    return tokens, orders.training_orders(k_ord, "random", 0, 1, b, N)


def _logits(cfg: ModelConfig, params, tokens, order, dropout_key=None):
    inputs, pos_in, pos_out, _ = orders.make_batch(tokens, order, bos=cfg.bos, bos_id=cfg.bos_id)
    return forward(cfg, params, inputs, pos_in, pos_out, dropout_key=dropout_key)


def _plain_causal(q, k, v):
    """float64 numpy: softmax(q k^T / sqrt(hd)) over keys u <= t, times v. [B,T,H,hd]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthd,buhd->bhtu", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhtu,buhd->bthd", p, v)


def test_fused_kernel_matches_a_plain_causal_softmax_and_hides_non_finite_keys():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (2.0 * jax.random.normal(kk, (2, 9, 3, 8)) for kk in keys)
    got = jax.jit(fused_causal_attention)(q, k, v)
    np.testing.assert_allclose(got, _plain_causal(q, k, v), rtol=1e-5, atol=1e-6)
    # A NaN key and an infinite value at slot 5 must not reach the queries before it, nor (as
    # zeros) change the others' normalisation beyond what a zero key/value gives.
    bad_k, bad_v = k.at[:, 5].set(jnp.nan), v.at[:, 5].set(jnp.inf)
    dirty = np.asarray(jax.jit(fused_causal_attention)(q, bad_k, bad_v))
    zeroed = _plain_causal(q, k.at[:, 5].set(0.0), v.at[:, 5].set(0.0))
    assert np.isfinite(dirty).all()
    np.testing.assert_allclose(dirty, zeroed, rtol=1e-5, atol=1e-6)


def test_fused_and_blocked_give_the_same_logits_and_gradients_in_float32():
    blocked, fused = _cfg("blocked"), _cfg("fused")
    params = init_params(blocked, jax.random.key(0))
    tokens, order = _batch()
    a, b = _logits(blocked, params, tokens, order), _logits(fused, params, tokens, order)
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)
    grad = lambda cfg: jax.jit(jax.grad(loss_fn, argnums=1), static_argnums=0)(
        cfg, params, tokens, order)
    g_blocked, g_fused = grad(blocked), grad(fused)
    for path, x in jax.tree_util.tree_leaves_with_path(g_blocked):
        y = _leaf(g_fused, path)
        tol = 1e-5 * float(jnp.max(jnp.abs(x)))
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=tol, err_msg=jax.tree_util.keystr(path))


def _leaf(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_fused_and_blocked_agree_in_bfloat16():
    blocked, fused = _cfg("blocked", "bfloat16"), _cfg("fused", "bfloat16")
    params = init_params(blocked, jax.random.key(0))
    tokens, order = _batch(seed=2)
    a, b = _logits(blocked, params, tokens, order), _logits(fused, params, tokens, order)
    reference = _logits(_cfg("blocked"), jax.tree.map(lambda p: p.astype(jnp.float32), params),
                        tokens, order)
    # Both bf16 kernels are as close to each other as bf16 rounding allows, and each is within
    # the same bound of the float32 model on the same (bf16-rounded) weights.
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(a - b))) < 2e-2 * scale
    for got in (a, b):
        assert float(jnp.max(jnp.abs(got - reference))) < 2e-2 * scale


def test_densities_are_the_same_with_either_kernel():
    blocked, fused = _cfg("blocked"), _cfg("fused")
    params = init_params(blocked, jax.random.key(3))
    tokens, _ = _batch(b=2, seed=4)
    known = jnp.arange(N)[None, :] % 4 == 0
    known = jnp.broadcast_to(known, tokens.shape)
    key = jax.random.key(5)
    np.testing.assert_allclose(log_prob(fused, params, tokens, known, key, n_orders=2),
                               log_prob(blocked, params, tokens, known, key, n_orders=2),
                               rtol=1e-5)


def test_training_with_dropout_uses_the_blocked_kernel():
    blocked, fused = _cfg("blocked", dropout=0.1), _cfg("fused", dropout=0.1)
    params = init_params(blocked, jax.random.key(0))
    tokens, order = _batch(b=2)
    key = jax.random.key(9)
    np.testing.assert_array_equal(_logits(fused, params, tokens, order, key),
                                  _logits(blocked, params, tokens, order, key))


def test_auto_is_the_blocked_kernel_on_cpu():
    assert jax.default_backend() == "cpu"
    assert causal_kernel("auto") == "blocked"
    assert (causal_kernel("fused"), causal_kernel("blocked")) == ("fused", "blocked")
    params = init_params(_cfg("auto"), jax.random.key(0))
    tokens, order = _batch(b=1)
    trace = lambda cfg: str(jax.make_jaxpr(_logits, static_argnums=0)(cfg, params, tokens,
                                                                       order))
    as_auto, as_blocked = trace(_cfg("auto")), trace(_cfg("blocked"))
    assert as_auto == as_blocked
    assert as_auto != trace(_cfg("fused"))


@pytest.mark.parametrize("bad", ["flash", "", None, "Fused"])
def test_attention_setting_is_validated(bad):
    with pytest.raises(ValueError, match="^attention must be one of 'auto', 'blocked', "
                                         "'fused'; got") as err:
        _cfg(bad)
    assert "\n" not in str(err.value)


def test_configs_without_the_field_load_as_auto():
    fields = dataclasses.asdict(_cfg("fused"))
    del fields["attention"]
    assert ModelConfig(**fields).attention == "auto"
    # The shipped model's stored config predates the field; it loads with the default.
    entry = MODELS["shakespeare_char"]
    stored = json.loads(_stored_config(WEIGHTS_DIR / entry.file))
    assert "attention" not in stored
    model_cfg, _, _ = read(WEIGHTS_DIR / entry.file, entry.sha256)
    assert model_cfg.attention == "auto"


def _stored_config(path) -> str:
    return serialization.msgpack_restore(path.read_bytes())["model_config"]
