"""The model against an independent numpy transformer, the positional encodings, and causality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax import ModelConfig, count_params, forward, init_params, orders
from sigma_jax.positions import sinusoidal_encoding

CFG = ModelConfig(vocab_size=16, block_size=12, n_layer=2, n_head=4, n_embd=32)


@jax.jit
def _perturbed(params, key):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _params(cfg, seed=0):
    # Non-trivial LayerNorm and bias values so that the reference checks every parameter.
    return _perturbed(init_params(cfg, jax.random.key(seed)), jax.random.key(seed + 100))


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p.get("bias", 0.0)


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_gpt(cfg, params, tokens):
    """A plain causal GPT in numpy whose absolute position embedding at slot t is
    [wpe[t] | wpe[t+1]] (the σ-GPT left-to-right identity, bos=False)."""
    p = _np(params)
    b, t = tokens.shape
    wpe = p["pos"]["wpe"]
    x = p["wte"]["embedding"][tokens] + np.concatenate([wpe[:t], wpe[1 : t + 1]], -1)[None]
    h, hd = cfg.n_head, cfg.head_dim
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(cfg.n_layer):
        lp = jax.tree.map(lambda a, i=layer: a[i], p["h"])
        a = _layer_norm(x, lp["ln_1"])
        qkv = a @ lp["attn"]["c_attn"]["kernel"] + lp["attn"]["c_attn"]["bias"]
        q, k, v = (z.reshape(b, t, h, hd).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, -1))
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, cfg.n_embd)
        x = x + y @ lp["attn"]["c_proj"]["kernel"] + lp["attn"]["c_proj"]["bias"]
        a = _layer_norm(x, lp["ln_2"])
        hid = _gelu(a @ lp["mlp"]["c_fc"]["kernel"] + lp["mlp"]["c_fc"]["bias"])
        x = x + hid @ lp["mlp"]["c_proj"]["kernel"] + lp["mlp"]["c_proj"]["bias"]
    x = _layer_norm(x, p["ln_f"])
    return x @ p["wte"]["embedding"][: cfg.vocab_size].T


def test_left_to_right_is_a_plain_gpt():
    cfg = CFG.replace(bos=False)
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, cfg.vocab_size)
    order = orders.left_to_right(3, 12)
    full = jnp.concatenate([tokens, tokens[:, :1]], 1)  # 12 tokens -> 11 training slots
    inputs, pos_in, pos_out, _ = orders.make_batch(full, order, bos=False)
    logits = forward(cfg, params, inputs, pos_in, pos_out)
    expected = reference_gpt(cfg, params, np.asarray(inputs))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


def test_untied_head_and_no_bias_variant_runs_in_bf16():
    cfg = CFG.replace(tie_embeddings=False, bias=False, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert "lm_head" in params and "bias" not in params["ln_f"]
    assert params["wte"]["embedding"].dtype == jnp.float32  # f32 storage, bf16 compute
    tokens = jnp.zeros((2, 5), jnp.int32)
    pos = orders.left_to_right(2, 5)
    f32 = forward(cfg.replace(dtype="float32"), params, tokens, pos - 1, pos)
    bf16 = forward(cfg, params, tokens, pos - 1, pos)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.05)


def test_count_params_matches_the_gpt_formula():
    """Per layer 12 D^2 + 13 D (attention, MLP of width 4D, two LayerNorms, with biases); the
    final LayerNorm 2D; learned positions (block + 1) x D/2 (each half of the double encoding
    has D/2 dimensions); the tied embedding (V + 1) x D (with the start token). The same count
    from abstract shapes, without computing the parameters."""
    cfg = ModelConfig(vocab_size=11, block_size=10, n_layer=2, n_head=2, n_embd=16)
    d, layers = cfg.n_embd, cfg.n_layer
    want = layers * (12 * d * d + 13 * d) + 2 * d + 11 * d // 2 + 12 * d
    assert count_params(init_params(cfg, jax.random.key(0))) == want == 6872
    assert count_params(jax.eval_shape(init_params, cfg, jax.random.key(0))) == want


def test_count_params_counts_a_scalar_as_one_and_names_other_leaves():
    assert count_params({"a": 3, "b": np.zeros((2, 3))}) == 7
    with pytest.raises(ValueError, match="^params must hold arrays, ShapeDtypeStructs or "
                                         "numbers; got a leaf 'x'$"):
        count_params({"a": "x"})


def test_sinusoidal_encoding_matches_published_worked_example():
    # Method reference §2.2, D = 8 (half width 4): PE(-1), PE(0), PE(1), PE(3).
    got = np.asarray(sinusoidal_encoding(jnp.array([-1, 0, 1, 3]), 4, 8))
    expected = np.array([
        [-0.8415, 0.5403, -0.0562, 0.9984],
        [0.0, 1.0, 0.0, 1.0],
        [0.8415, 0.5403, 0.0562, 0.9984],
        [0.1411, -0.9900, 0.1679, 0.9858],
    ])
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("encoding", ["learned", "sinusoidal"])
def test_double_encoding_puts_the_input_position_first(encoding):
    cfg = CFG.replace(pos_encoding=encoding, n_layer=1)
    params = init_params(cfg, jax.random.key(0))
    from sigma_jax.positions import DoublePositionalEmbedding

    emb = lambda a, b: DoublePositionalEmbedding(cfg).apply(
        {"params": params.get("pos", {})}, jnp.array([[a]]), jnp.array([[b]]))[0, 0]
    half = cfg.n_embd // 2
    e_37, e_73 = np.asarray(emb(3, 7)), np.asarray(emb(7, 3))
    # One encoding serves both halves: swapping the positions swaps the halves.
    np.testing.assert_array_equal(e_37[:half], e_73[half:])
    np.testing.assert_array_equal(e_37[half:], e_73[:half])
    e_start = np.asarray(emb(-1, 3))
    np.testing.assert_array_equal(e_start[half:], e_37[:half])
    if encoding == "learned":  # the start position is the table's extra row
        np.testing.assert_array_equal(e_start[:half], params["pos"]["wpe"][cfg.block_size])
    else:
        np.testing.assert_allclose(e_start[:half], sinusoidal_encoding(jnp.array(-1), half, 32))


def test_sinusoidal_scale_multiplies_both_halves():
    from sigma_jax.positions import DoublePositionalEmbedding

    cfg = CFG.replace(pos_encoding="sinusoidal", sinusoidal_scale=0.1)
    got = np.asarray(DoublePositionalEmbedding(cfg).apply({}, jnp.array([[-1, 5]]),
                                                          jnp.array([[2, 0]])))[0]
    half = cfg.n_embd // 2
    pe = lambda p: 0.1 * np.asarray(sinusoidal_encoding(jnp.array(p), half, cfg.n_embd))
    np.testing.assert_allclose(got, np.stack([np.concatenate([pe(-1), pe(2)]),
                                              np.concatenate([pe(5), pe(0)])]), rtol=1e-6)


@pytest.mark.parametrize("bos", [True, False])
def test_causality_under_random_orders(bos):
    """The loss at order step t has exactly zero gradient w.r.t. the token and position
    embeddings used only by later steps, and a non-zero one w.r.t. earlier steps. (Untied head:
    a tied head would route every token row's gradient through the output layer.)"""
    cfg = CFG.replace(bos=bos, tie_embeddings=False)
    params = init_params(cfg, jax.random.key(3))
    n = 12
    tokens = jax.random.permutation(jax.random.key(4), cfg.vocab_size)[None, :n]  # distinct ids
    order = orders.random_order(jax.random.key(5), jnp.zeros((1, n), bool))
    inputs, pos_in, pos_out, targets = orders.make_batch(tokens, order, bos=bos,
                                                         bos_id=cfg.bos_id)
    t = 5

    def loss_at(p):
        logits = forward(cfg, p, inputs, pos_in, pos_out)
        return -jax.nn.log_softmax(logits[0, t])[targets[0, t]]

    grads = jax.jit(jax.grad(loss_at))(params)
    g_tok = np.abs(np.asarray(grads["wte"]["embedding"])).sum(-1)
    g_pos = np.abs(np.asarray(grads["pos"]["wpe"])).sum(-1)
    later_tokens = np.asarray(inputs[0, t + 1 :])
    earlier_tokens = np.asarray(inputs[0, : t + 1])
    later_positions = np.asarray(pos_out[0, t + 1 :])  # used by slots > t only
    assert (g_tok[later_tokens] == 0).all()
    assert (g_pos[later_positions] == 0).all()
    assert (g_tok[earlier_tokens] > 0).all()
    assert (g_pos[np.asarray(pos_out[0, : t + 1])] > 0).all()


@pytest.mark.parametrize(
    "field, value",
    [("vocab_size", 0), ("n_embd", 30), ("n_head", 5), ("pos_encoding", "rope"),
     ("dtype", "float16"), ("dropout", 1.5), ("bos", "yes"), ("d_ff", -1),
     ("sinusoidal_scale", 0.0), ("sinusoidal_scale", 0.5)],  # 0.5 with learned positions
)
def test_bad_config_raises_naming_the_field(field, value):
    kwargs = dict(vocab_size=16, block_size=12, n_embd=32, n_head=4)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_config_is_hashable_and_static():
    assert hash(CFG) == hash(CFG.replace())
    traces = []

    @jax.jit
    def f(cfg, x):
        traces.append(1)
        return x * cfg.n_layer

    f(CFG, jnp.ones(2))
    f(CFG.replace(), jnp.ones(2))
    assert len(traces) == 1


TINY = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16)


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bos", [True, False])
def test_forward_refuses_bad_inputs_in_one_line(bos):
    """Token ids outside the embedding ([0, V), plus the start token V with bos), positions
    outside it (no start position -1 without bos), shapes and dtypes: one line, before any work
    (abstract params: nothing runs)."""
    cfg = TINY.replace(bos=bos)
    params = jax.eval_shape(init_params, cfg, jax.random.key(0))
    pos = np.arange(4)[None]
    call = lambda t, i=pos, o=pos, p=params: lambda: forward(cfg, p, t, i, o)
    rows = 12 if bos else 11
    for bad in (-1, rows):
        _one_line_error(call(np.where(pos == 0, bad, pos)),
                        rf"tokens must hold token ids in \[0, {rows}\).*got values in")
    low = -1 if bos else 0
    _one_line_error(call(pos, pos + low - 1), rf"positions must lie in \[{low}, 16\)")
    _one_line_error(call(pos, o=pos + 16), "positions must lie in")
    _one_line_error(call(pos, pos[:, :3]), r"of one shape.*\(1, 4\), \(1, 3\) and \(1, 4\)")
    _one_line_error(call(pos[0], pos[0], pos[0]), r"must be \[B, T\] arrays")
    _one_line_error(call(pos * 1.0), "tokens must hold integer token ids; got dtype float64")
    _one_line_error(call(pos, pos * 1.0), "pos_in must hold integer positions")
    other = jax.eval_shape(init_params, cfg.replace(bos=not bos), jax.random.key(0))
    _one_line_error(call(pos, p=other), "different models")
    empty = jax.eval_shape(lambda p: forward(cfg, p, pos[:, :0], pos[:, :0], pos[:, :0]), params)
    assert empty.shape == (1, 0, 11)  # no slots (bos=False at N = 1): no logits
    # The start token at the start position with bos; lists as arrays (traced: nothing runs).
    if bos:
        ok = jax.eval_shape(lambda p: forward(cfg, p, [[11, 3]], [[-1, 0]], [[0, 1]]), params)
        assert ok.shape == (1, 2, 11)


def test_init_params_wants_one_typed_key():
    for key in (0, None, jax.random.split(jax.random.key(0), 2)):
        _one_line_error(lambda key=key: init_params(TINY, key), "key must be")
    shapes = jax.eval_shape(init_params, TINY, jax.random.key(0))
    assert shapes["wte"]["embedding"].shape == (12, 16)


@pytest.mark.parametrize("tie", [True, False])
def test_head_of_the_activations_gives_the_logits(tie):
    """forward_masked(head=False) returns the activations the logits are the head of, over a
    cache (per-layer buffers) and without one (the stacked model)."""
    from sigma_jax.cache import init_cache, split_layers
    from sigma_jax.model import forward_masked, head_logits

    cfg = CFG.replace(tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    layers = split_layers(init_cache(cfg, 2, 4))
    for cache in (None, layers):
        logits, k, v = forward_masked(cfg, params, tokens, pos - 1, pos, cache=cache)
        hidden, k2, v2 = forward_masked(cfg, params, tokens, pos - 1, pos, cache=cache,
                                        head=False)
        assert hidden.shape == (2, 5, cfg.n_embd)
        np.testing.assert_allclose(head_logits(cfg, params, hidden), logits, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(v, v2)
    np.testing.assert_allclose(logits, forward(cfg, params, tokens, pos - 1, pos), rtol=1e-5,
                               atol=1e-5)
