"""Meshes, logical rules, constrain(), parameter/cache placement, and sharded == unsharded runs.

Needs 8 devices: tests/conftest.py forces 8 fake CPU devices before JAX starts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from sigma_jax import checkpoint, decode, orders
from sigma_jax import sharding as sh
from sigma_jax.cache import CACHE_KV_AXES, NEW_KV_AXES, KVCache, cache_sharding, init_cache, write
from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.model import forward, init_params
from sigma_jax.param_sharding import param_shardings, param_specs, shard_params
from sigma_jax.sampling import SampleOptions, engine, sample_sharded
from sigma_jax.train import init_state

P = jax.P

pytestmark = [pytest.mark.multidevice, pytest.mark.integration]

CFG = ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=32)
B, T = 8, 8
MESH_SHAPES = ("8:1:1", "2:2:2", "1:2:4")
BATCH = ("data", "fsdp")


def mesh_of(shape: str, axis_type: str = "auto"):
    return sh.make_mesh(sh.MeshConfig.parse(shape, axis_type))


def spec_equivalent(array, mesh, spec) -> bool:
    return array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    """tokens, order (known positions first, random), n_known; numpy RNG to save compiles."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32)
    known = rng.random((B, T)) < 0.5
    u = rng.random((B, T))
    order = np.argsort(np.where(known, u, 2.0 + u), axis=1, kind="stable").astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(order), jnp.asarray(known.sum(1), jnp.int32)


# ---------------------------------------------------------------------------------------- mesh


def test_mesh_config_parse_good():
    assert sh.MeshConfig.parse("2:2:2") == sh.MeshConfig(2, 2, 2, "auto")
    assert sh.MeshConfig.parse(" 8:1:1 ").shape == (8, 1, 1)
    cfg = sh.MeshConfig.parse("1:2:4", axis_type="explicit")
    assert (cfg.size, cfg.axis_type, str(cfg)) == (8, "explicit", "1:2:4")
    assert hash(cfg) == hash(sh.MeshConfig(1, 2, 4, "explicit"))


@pytest.mark.parametrize("text", ["", "2:2", "2:2:2:2", "a:1:1", "-1:1:1", "0:1:1", "2.0:1:1",
                                  "2,2,2", "²:1:1"])
def test_mesh_config_parse_bad(text):
    with pytest.raises(ValueError) as err:
        sh.MeshConfig.parse(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(data=0), dict(fsdp=True), dict(tensor=2.0),
                                    dict(axis_type="manual")])
def test_mesh_config_validates(kwargs):
    with pytest.raises(ValueError):
        sh.MeshConfig(**kwargs)


def test_mesh_config_takes_numpy_integers():
    config = sh.MeshConfig(data=np.int64(2), fsdp=np.int32(1))
    assert config == sh.MeshConfig(2, 1, 1) and type(config.data) is int
    with pytest.raises(ValueError, match="^mesh axis tensor must be an integer >= 1; got 0$"):
        sh.MeshConfig(tensor=np.int64(0))


def test_mesh_arguments_must_be_meshes_and_say_what_to_pass(params, tmp_path):
    """Checked at each entry point, before any work: a mesh text, None or a MeshConfig where a
    Mesh is needed is one line, not an AttributeError (nor a checkpoint blamed for it)."""
    hint = "e.g. make_mesh(MeshConfig.parse('1:1:1')); got "
    mesh_or_none = "mesh must be a jax.sharding.Mesh or None, " + hint
    train_cfg = TrainConfig(max_steps=2, warmup_steps=0)
    cases = [
        (lambda: sh.as_mesh("1:1:1"),
         "mesh must be a jax.sharding.Mesh, a MeshConfig or None, " + hint + "'1:1:1'"),
        (lambda: init_state(CFG, train_cfg, mesh="1:1:1"),
         "mesh must be a jax.sharding.Mesh, a MeshConfig or None, " + hint + "'1:1:1'"),
        (lambda: shard_params(params, None), "mesh must be a jax.sharding.Mesh, " + hint + "None"),
        (lambda: shard_params(params, sh.MeshConfig()),
         "mesh must be a jax.sharding.Mesh, " + hint + "MeshConfig '1:1:1'"),
        (lambda: checkpoint.load(tmp_path, mesh="1:1:1"), mesh_or_none + "'1:1:1'"),
        (lambda: engine.init(CFG, SampleOptions(sampler="ar"), 2, 8, mesh="1:1:1"),
         mesh_or_none + "'1:1:1'"),
        (lambda: sample_sharded(CFG, params, None, None, None, SampleOptions(), mesh="2:2:2"),
         "mesh must be a jax.sharding.Mesh, " + hint + "'2:2:2'"),
        (lambda: sh.make_mesh("1:1:1"),
         "mesh_cfg must be a MeshConfig, e.g. MeshConfig.parse('1:1:1'); got '1:1:1'"),
    ]
    other_names = "mesh axes must be named among 'data', 'fsdp', 'tensor' and include the " \
                  "batch axes ('data', 'fsdp'), as make_mesh names them; got "
    for names in (("x",), ("data", "tensor")):
        mesh = jax.make_mesh((4,) + (1,) * (len(names) - 1), names)
        cases += [(lambda m=mesh: sample_sharded(CFG, params, jax.random.key(0),
                                                 np.zeros((2, 4), np.int32),
                                                 np.zeros((2, 4), bool), SampleOptions(), mesh=m),
                   other_names + str(names)),
                  (lambda m=mesh: engine.init(CFG, SampleOptions("ar"), 4, 8, mesh=m),
                   other_names + str(names))]
    for call, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()


@pytest.mark.parametrize("axis_type, kind", [("auto", AxisType.Auto),
                                             ("explicit", AxisType.Explicit)])
def test_make_mesh(axis_type, kind):
    mesh = mesh_of("2:2:2", axis_type)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.axis_sizes) == (2, 2, 2)
    assert mesh.axis_types == (kind,) * 3
    small = sh.make_mesh(sh.MeshConfig(1, 2, 2))  # divides 8: uses 4 devices
    assert small.devices.size == 4


@pytest.mark.parametrize("shape", ["4:4:1", "3:1:1", "1:1:5"])
def test_make_mesh_errors(shape):
    """One line; a mesh larger than the CPU devices says how to ask for more of them."""
    config = sh.MeshConfig.parse(shape)
    with pytest.raises(ValueError, match="8 available devices") as err:
        sh.make_mesh(config)
    assert "\n" not in str(err.value)
    assert ("jax_num_cpu_devices" in str(err.value)) == (config.size > 8)
    with pytest.raises(ValueError, match=r"1 available device \(on a CPU host, ask for 2 with "
                                         r"jax_num_cpu_devices .*--host_devices\)$"):
        sh.make_mesh(sh.MeshConfig(2, 1, 1), devices=jax.devices()[:1])


# ------------------------------------------------------------------------------------- rules


def test_logical_to_spec():
    assert sh.logical_to_spec(("batch", "seq", "heads", "head_dim")) == P(BATCH, None, "tensor",
                                                                          None)
    assert sh.logical_to_spec(("vocab", None)) == P("tensor", None)
    assert sh.logical_to_spec(("layers", "embed", "ff")) == P(None, "fsdp", "tensor")
    assert sh.logical_to_spec(()) == P()
    rules = sh.DEFAULT_RULES.replace(batch="data", seq="fsdp")
    assert sh.logical_to_spec(("batch", "seq"), rules) == P("data", "fsdp")


@pytest.mark.parametrize("names", [("heads", "ff"), ("batch", "embed"), ("vocab", "kv_heads")])
def test_logical_to_spec_duplicate_axis(names):
    with pytest.raises(ValueError, match="used by both"):
        sh.logical_to_spec(names)


def test_rules_validate():
    with pytest.raises(ValueError, match="unknown logical axis"):
        sh.logical_to_spec(("batchh",))
    with pytest.raises(ValueError):
        sh.LogicalRules(batch=3)


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = mesh_of("2:2:2")
    assert sh.fit_spec(P(BATCH, "tensor"), (2, 11), mesh) == P("data", None)
    assert sh.fit_spec(P(BATCH, "tensor"), (8, 6), mesh) == P(BATCH, "tensor")
    assert sh.fit_spec(P("fsdp"), (6, 3), mesh) == P("fsdp", None)
    assert sh.fit_spec(P(("nope", "tensor")), (4,), mesh) == P("tensor")


# --------------------------------------------------------------------------------- constrain

QKV = ("batch", "seq", "heads", "head_dim")


def test_constrain_without_mesh_is_identity():
    x = jnp.arange(8 * 2 * 4 * 3.0).reshape(8, 2, 4, 3)
    assert sh.constrain(x, QKV) is x
    np.testing.assert_array_equal(jax.jit(lambda a: sh.constrain(a, QKV))(x), x)
    assert "sharding_constraint" not in jax.jit(lambda a: sh.constrain(a, QKV)).lower(x).as_text()


def test_constrain_auto_mesh():
    mesh = mesh_of("2:2:2", "auto")
    x = jnp.arange(8 * 2 * 4 * 3.0).reshape(8, 2, 4, 3)
    f = jax.jit(lambda a: sh.constrain(a, QKV) * 2)
    with jax.set_mesh(mesh):
        y = f(x)
        lowered = f.lower(x).as_text()
        eager = sh.constrain(x, QKV)
    assert "sharding_constraint" in lowered and '{"data", "fsdp"}' in lowered  # inside jit
    assert spec_equivalent(y, mesh, P(BATCH, None, "tensor", None))  # outside jit
    assert spec_equivalent(eager, mesh, P(BATCH, None, "tensor", None))
    np.testing.assert_array_equal(y, 2 * x)


def test_constrain_explicit_mesh():
    mesh = mesh_of("2:2:2", "explicit")
    x = jnp.arange(8 * 2 * 4 * 3.0).reshape(8, 2, 4, 3)
    seen = []

    @jax.jit
    def f(a):
        out = sh.constrain(a, QKV)
        seen.append(jax.typeof(out).sharding.spec)
        return out * 2

    with jax.set_mesh(mesh):
        y = f(x)
        eager = sh.constrain(x, QKV)
    expected = P(BATCH, None, "tensor", None)
    assert seen == [expected]  # inside jit: the sharding is part of the type
    assert y.sharding.spec == expected and eager.sharding.spec == expected
    np.testing.assert_array_equal(y, 2 * x)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_constrain_fits_small_shapes(axis_type):
    mesh = mesh_of("2:2:2", axis_type)
    x = jnp.ones((2, 5, 3, 4))  # batch 2 < 4 batch devices, 3 heads on tensor=2
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: sh.constrain(a, QKV))(x)
        with pytest.raises(ValueError, match="logical axes"):
            sh.constrain(x, ("batch", "seq"))
    assert spec_equivalent(y, mesh, P("data", None, None, None))


def test_auto_axes_call_needs_a_mesh_for_explicit_inputs():
    mesh = mesh_of("2:2:2", "explicit")
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P(BATCH)))
    assert sh.auto_axes_call(lambda a: a + 1, ("batch", None), jnp.ones(3)).shape == (3,)
    with pytest.raises(ValueError, match="set_mesh"):
        sh.auto_axes_call(lambda a: a + 1, ("batch", None), x)


# -------------------------------------------------------------------------------- parameters


def _expected_specs(cfg):
    layer = {
        "attn": {"c_attn": {"kernel": P(None, "fsdp", "tensor"), "bias": P(None, "tensor")},
                 "c_proj": {"kernel": P(None, "tensor", "fsdp"), "bias": P(None, "fsdp")}},
        "mlp": {"c_fc": {"kernel": P(None, "fsdp", "tensor"), "bias": P(None, "tensor")},
                "c_proj": {"kernel": P(None, "tensor", "fsdp"), "bias": P(None, "fsdp")}},
        "ln_1": {"scale": P(None, "fsdp"), "bias": P(None, "fsdp")},
        "ln_2": {"scale": P(None, "fsdp"), "bias": P(None, "fsdp")},
    }
    specs = {"h": layer, "ln_f": {"scale": P("fsdp"), "bias": P("fsdp")},
             "wte": {"embedding": P("tensor", None)}}
    if cfg.pos_encoding == "learned":
        specs["pos"] = {"wpe": P(None, None)}
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": P("fsdp", "tensor")}
    if not cfg.bias:
        for module in (layer["attn"]["c_attn"], layer["attn"]["c_proj"], layer["mlp"]["c_fc"],
                       layer["mlp"]["c_proj"], layer["ln_1"], layer["ln_2"], specs["ln_f"]):
            module.pop("bias")
    return specs


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(tie_embeddings=False, bias=False,
                                                  pos_encoding="sinusoidal")])
def test_param_specs_every_leaf(cfg):
    shapes = jax.eval_shape(init_params, cfg, jax.random.key(0))
    assert param_specs(shapes) == _expected_specs(cfg)


def test_param_specs_unknown_param():
    with pytest.raises(ValueError, match="no sharding rule for param extra/kernel"):
        param_specs({"extra": {"kernel": jnp.zeros((2, 2))}})


def test_shard_params_really_shards(params):
    mesh = mesh_of("2:2:2")
    sharded = shard_params(params, mesh)
    kernel = sharded["h"]["attn"]["c_attn"]["kernel"]  # [L, D, 3D] = [2, 32, 96]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 16, 48)}
    # wte [12, 32]: 12 rows split over tensor=2; every spec is the logical one, fitted.
    assert sharded["wte"]["embedding"].sharding.spec == P("tensor", None)
    for leaf, spec in zip(jax.tree.leaves(sharded), jax.tree.leaves(param_specs(params)),
                          strict=True):
        assert leaf.sharding.spec == sh.fit_spec(spec, leaf.shape, mesh)
    jax.tree.map(np.testing.assert_array_equal, sharded, params)
    # On tensor=4 the 12-row table still splits; an 11-wide vocab would not (fitted away).
    assert param_shardings(params, mesh_of("1:2:4"))["wte"]["embedding"].spec == P("tensor",
                                                                                     None)


def test_batch_cache_and_replicated_shardings():
    mesh = mesh_of("2:2:2")
    assert sh.batch_rows(mesh).spec == P(BATCH)
    assert sh.replicated(mesh).spec == P()
    cache_sh = cache_sharding(mesh)
    assert cache_sh.k.spec == cache_sh.v.spec == P(None, BATCH, "tensor", None, None)
    assert cache_sh.length.spec == P(BATCH)
    cache = jax.jit(lambda: init_cache(CFG, B, 12), out_shardings=cache_sh)()
    assert cache.k.sharding.spec == P(None, BATCH, "tensor", None, None)
    fitted = cache_sharding(mesh, jax.eval_shape(lambda: init_cache(CFG.replace(n_head=1), 2,
                                                                       4)))
    assert fitted.k.spec == P(None, "data", None, None, None) and fitted.length.spec == P("data")


def test_batch_divisibility():
    mesh = mesh_of("2:2:2")
    assert sh.batch_multiple(mesh) == 4
    sh.check_batch(8, mesh)
    with pytest.raises(ValueError) as err:
        sh.check_batch(6, mesh)
    assert str(err.value) == ("batch 6 is not divisible by the 4 devices of the data×fsdp axes; "
                              "use a multiple of 4")


# ------------------------------------------------------------------------- sharded == unsharded


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_forward_sharded_matches_unsharded(params, batch, shape, axis_type):
    tokens, order, _ = batch
    inputs, pos_in, pos_out, _ = orders.make_batch(tokens, order, bos=True, bos_id=CFG.bos_id)
    expected = forward(CFG, params, inputs, pos_in, pos_out)
    mesh = mesh_of(shape, axis_type)
    with jax.set_mesh(mesh):
        arrays = jax.device_put((inputs, pos_in, pos_out), sh.batch_rows(mesh))
        logits = forward(CFG, shard_params(params, mesh), *arrays)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    logits_spec = sh.fit_spec(sh.logical_to_spec(("batch", "seq", "vocab")), logits.shape, mesh)
    assert spec_equivalent(logits, mesh, logits_spec)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_cache_write_sharded_matches_unsharded(axis_type):
    rng = np.random.default_rng(2)
    k_new = jnp.asarray(rng.standard_normal((CFG.n_layer, B, 3, CFG.n_head, CFG.head_dim)),
                        jnp.float32)
    n_new = jnp.asarray(rng.integers(0, 4, (B,)), jnp.int32)

    @jax.jit
    def two_writes(k_new, n_new):
        cache = init_cache(CFG, B, 7)
        cache = write(cache, k_new, -k_new, n_new)
        return write(cache, 2 * k_new, k_new, n_new)

    expected = two_writes(k_new, n_new)
    mesh = mesh_of("2:2:2", axis_type)
    with jax.set_mesh(mesh):
        kv_spec = sh.logical_to_spec(NEW_KV_AXES)  # a pass's new entries
        got = two_writes(jax.device_put(k_new, NamedSharding(mesh, kv_spec)),
                         jax.device_put(n_new, sh.batch_rows(mesh)))
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    cache_spec = sh.logical_to_spec(CACHE_KV_AXES)
    assert spec_equivalent(got.k, mesh, cache_spec) and spec_equivalent(got.v, mesh, cache_spec)
    assert spec_equivalent(got.length, mesh, P(BATCH))


@jax.jit
def _prefill_and_burst(cfg, params, tokens, order, n_known):
    capacity = decode.cache_capacity(cfg, tokens.shape[1])
    cache, last_tok, last_pos = decode.prefill(cfg, params, tokens, order, n_known, capacity)
    cache = cache.stacked()
    return cache, decode.burst_pass(cfg, params, cache, last_tok, last_pos, order)


@pytest.mark.parametrize("shape, axis_type", [("2:2:2", "auto"), ("2:2:2", "explicit")])
def test_prefill_and_burst_sharded_match_unsharded(params, batch, shape, axis_type):
    tokens, order, n_known = batch
    expected_cache, expected_logits = _prefill_and_burst(CFG, params, tokens, order, n_known)
    mesh = mesh_of(shape, axis_type)
    with jax.set_mesh(mesh):
        arrays = jax.device_put((tokens, order, n_known), sh.batch_rows(mesh))
        cache, logits = _prefill_and_burst(CFG, shard_params(params, mesh), *arrays)
    assert isinstance(cache, KVCache)
    np.testing.assert_array_equal(cache.length, expected_cache.length)
    valid = np.asarray(expected_cache.valid())[None, :, None, :, None]  # [L, B, H, S, hd]
    for got, want in ((cache.k, expected_cache.k), (cache.v, expected_cache.v)):
        np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    cache_spec = cache_sharding(mesh, cache)
    assert spec_equivalent(cache.k, mesh, cache_spec.k.spec)
    assert spec_equivalent(cache.length, mesh, cache_spec.length.spec)


@jax.jit
def _loss_and_grad(cfg, params, inputs, pos_in, pos_out, key):
    def loss(params):
        logits = forward(cfg, params, inputs, pos_in, pos_out, dropout_key=key)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    return jax.value_and_grad(loss)(params)


@pytest.mark.slow  # ~40 s on 2 cores: two compiles of a scanned backward pass with dropout
def test_grad_with_dropout_under_explicit_mesh_matches_unsharded(params, batch):
    """Differentiation and dropout pass through the auto_axes region of forward_masked."""
    cfg = CFG.replace(dropout=0.1)
    tokens, order, _ = batch
    inputs, pos_in, pos_out, _ = orders.make_batch(tokens, order, bos=True, bos_id=CFG.bos_id)
    key = jax.random.key(3)
    expected_loss, expected_grad = _loss_and_grad(cfg, params, inputs, pos_in, pos_out, key)
    mesh = mesh_of("2:2:2", "explicit")
    with jax.set_mesh(mesh):
        arrays = jax.device_put((inputs, pos_in, pos_out), sh.batch_rows(mesh))
        loss, grad = _loss_and_grad(cfg, shard_params(params, mesh), *arrays, key)
    np.testing.assert_allclose(loss, expected_loss, atol=1e-5, rtol=0)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-5, rtol=0), grad,
                 expected_grad)
    assert grad["h"]["attn"]["c_attn"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
