"""Every compiled entry point lowers for the accelerators: `jax.export` for platforms cuda and tpu
on abstract inputs (jax.ShapeDtypeStruct; nothing allocated), at the test size and at GPT-2-small
size (12 x 768, V 50,304, N 1,024, bfloat16 compute and storage).

The entry points: the train step on the default local mesh (`train.make_train_step`), `forward`,
`log_prob`, `conditionals`, `sample_ar` (cached and uncached) and `sample_burst` in every mode,
along random and spread orders, and the serving engine's `insert` and `step` for cached AR and
every burst mode. A sampler is exported whole: `sample_*_call(...)()` traced in one jitted
function, so the order construction before the kernel is lowered too.

Attention: the train step and `forward` are exported with both cache-free causal kernels
('blocked', 'fused'); the densities and samplers with 'fused', the kernel that
`attention='auto'` resolves to on gpu and tpu (their cached passes are the same either way).
Tracing runs on this CPU host, so the fused kernel is exported in JAX's XLA formulation.

Each entry point is exported once for both platforms (as `sampling.export` exports the engine):
JAX lowers every platform-dependent operation by the rules of each platform, so one export
checks both. The exported module must report both platforms and the output shapes and dtypes
the entry point promises; a failure names the entry point, the size and the lowering error, and
which platform fails alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from sigma_jax import (
    ModelConfig,
    conditionals,
    forward,
    init_params,
    log_prob,
    sample_ar_call,
    sample_burst_call,
)
from sigma_jax.presets import PRESETS
from sigma_jax.sampling import engine
from sigma_jax.sampling.options import SampleOptions
from sigma_jax.train import init_state, make_train_step

PLATFORMS = ("cuda", "tpu")
SIZES = ("test", "gpt2_small")
F32, I32 = jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)
SAMPLE_BATCH = 4  # rows of the density and sampler exports
# (name, attention setting, sampler options) of every entry point, at every size.
ENTRIES = (
    [(f"train_step[{a}]", a, None) for a in ("blocked", "fused")]
    + [(f"forward[{a}]", a, None) for a in ("blocked", "fused")]
    + [("log_prob", "fused", None), ("conditionals", "fused", None)]
    + [(f"sample_ar[{'cached' if c else 'uncached'},{o}]", "fused",
        dict(use_cache=c, order=o)) for c in (True, False) for o in ("random", "spread")]
    + [(f"sample_burst[{m},{o}]", "fused", dict(mode=m, order=o))
       for m in ("exact", "jacobi") for o in ("random", "spread")]
    + [("sample_burst[paper,random]", "fused", dict(mode="paper", order="random"))]
    + [(f"engine_{f}[{s}]", "fused", dict(sampler=s, order="random"))
       for f in ("insert", "step") for s in ("ar", "burst", "burst_jacobi", "burst_paper")]
)
ENGINE_SLOTS = 2


def _configs(size: str, attention: str):
    """(ModelConfig, TrainConfig, burst window) of a size."""
    if size == "test":
        preset = PRESETS["tiny"]
        cfg = ModelConfig(vocab_size=16, **preset.model, attention=attention)
        return cfg, preset.train, 8
    preset = PRESETS["gpt2_small"]
    cfg = ModelConfig(**{**preset.model, "dtype": "bfloat16", "param_dtype": "bfloat16",
                         "attention": attention})
    return cfg, preset.train, 64


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


@functools.cache
def _entry(size: str, name: str):
    """(jitted function, abstract arguments, expected (shape, dtype) of its leading output
    leaves). Cached, so a failure's per-platform exports reuse the jitted function and its
    abstract arguments (JAX traces it once)."""
    attention, options = next((a, o) for n, a, o in ENTRIES if n == name)
    cfg, train_cfg, window = _configs(size, attention)
    n, b = cfg.block_size, SAMPLE_BATCH
    if name.startswith("train_step"):  # the new state has the old state's shapes and dtypes
        state = jax.eval_shape(functools.partial(init_state, cfg, train_cfg))
        batch = _spec((train_cfg.global_batch, n), jnp.int32)  # [B * grad_accum, N]
        expected = tuple((s.shape, s.dtype) for s in jax.tree.leaves(state))
        return make_train_step(cfg, train_cfg), (state, batch), expected
    params = jax.eval_shape(init_params, cfg, jax.random.key(0))
    tokens, known = _spec((b, n), jnp.int32), _spec((b, n), jnp.bool_)
    key = _spec((), jax.random.key(0).dtype)
    if name.startswith("forward"):
        fn = jax.jit(lambda p, t, i, o: forward(cfg, p, t, i, o))
        return fn, (params, tokens, tokens, tokens), (((b, n, cfg.vocab_size), F32),)
    if name == "log_prob":
        fn = jax.jit(lambda p, t, m, k: log_prob(cfg, p, t, m, k, n_orders=2))
        return fn, (params, tokens, known, key), (((b, 2), F32),)
    if name == "conditionals":
        fn = jax.jit(lambda p, t, m, k: conditionals(cfg, p, t, m, k))
        return fn, (params, tokens, known, key), (((b, n, cfg.vocab_size), F32),)
    if name.startswith("engine"):
        return _engine_entry(cfg, params, name, options, window)
    prepare = sample_ar_call if name.startswith("sample_ar") else functools.partial(
        sample_burst_call, window=window)
    truncation = dict(temperature=0.8, top_p=0.9)
    fn = jax.jit(lambda p, k, t, m: prepare(cfg, p, k, t, m, **options, **truncation)())
    return fn, (params, key, tokens, known), (((b, n), I32),)  # tokens [B, N], stats


def _engine_entry(cfg, params, name, options, window):
    """The engine's insert (one request into a traced slot) or step, on an abstract state of
    ENGINE_SLOTS slots of capacity block_size: each returns a state of the same leaves."""
    n = cfg.block_size
    burst_window = None if options["sampler"] == "ar" else window
    state = jax.eval_shape(lambda: engine.init(
        cfg, SampleOptions(**options, window=burst_window, temperature=0.8, top_p=0.9),
        ENGINE_SLOTS, n))
    expected = tuple((s.shape, s.dtype) for s in jax.tree.leaves(state))
    if name.startswith("engine_step"):
        return jax.jit(lambda p, s: engine.step(cfg, p, s)), (params, state), expected
    request = (_spec((), jnp.int32), _spec((n,), jnp.int32), _spec((n,), jnp.bool_),
               _spec((), jnp.int32), _spec((), jax.random.key(0).dtype))
    fn = jax.jit(lambda p, s, *r: engine._insert(cfg, p, s, *r))
    return fn, (params, state, *request), expected


def _lowering_error(fn, args, platform: str) -> str | None:
    """The first line of the error exporting `fn` for `platform` alone (None if it lowers)."""
    try:
        jax.export.export(fn, platforms=[platform])(*args)
    except Exception as err:
        lines = str(err).strip().splitlines() or [""]
        return f"{type(err).__name__}: {lines[0]}"
    return None


@pytest.mark.parametrize("name", [e[0] for e in ENTRIES])
@pytest.mark.parametrize("size", SIZES)
def test_entry_point_lowers(size, name):
    """Exported for cuda and tpu at once, as `sampling.export` does: one lowering in which every
    platform-dependent operation is lowered by the rules of each platform. A failure is
    reported per platform, exporting for each alone."""
    fn, args, expected = _entry(size, name)
    try:
        exported = jax.export.export(fn, platforms=list(PLATFORMS))(*args)
    except Exception as err:  # every lowering error is a finding: report it by name
        lines = str(err).strip().splitlines() or [""]
        alone = {p: _lowering_error(fn, args, p) for p in PLATFORMS}
        pytest.fail(f"{name} at {size} size does not lower for {', '.join(PLATFORMS)}: "
                    f"{type(err).__name__}: {lines[0]}; "
                    + "; ".join(f"for {p} alone: {e or 'lowers'}" for p, e in alone.items()),
                    pytrace=False)
    assert exported.platforms == PLATFORMS
    got = tuple((a.shape, a.dtype) for a in exported.out_avals[:len(expected)])
    assert got == expected, name
