"""Device baselines and the decode roofline.

- `measure_matmul`: dense matmul FLOP/s, the denominator of the measured MFU.
- `measure_copy_bandwidth`: the memory bandwidth an elementwise pass reaches.
- `measure_decode`: one cached AR model call, its bytes read and their ratio to both bandwidths
  (decoding one token per row is bound by reading the weights and the cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bench.harness import compile_aot, time_calls
from bench.models import kv_bytes, param_bytes
from sigma_jax.cache import init_cache
from sigma_jax.config import ModelConfig
from sigma_jax.decode import extend_pass


@jax.jit
def _matmul(a, b):
    return a @ b


@jax.jit
def _scale_copy(x):
    return x * 2  # reads and writes every element once; cannot be simplified away


_DECODE_STEP = jax.jit(extend_pass)


def measure_matmul(n: int, dtype, repeats: int = 5) -> dict:
    """Dense [n, n] @ [n, n] in `dtype` on the default device: FLOP/s = 2 n^3 / median time."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    kernel = compile_aot(_matmul, (a, b))
    timing, _ = time_calls(lambda _: kernel(a, b), repeats)
    timing.compile_s, timing.lower_s = kernel.compile_s, kernel.lower_s
    return dict(suite="roofline", kind="matmul", n=n, dtype=jnp.dtype(dtype).name,
                flops_s=2.0 * n ** 3 / timing.median_s, **timing.as_dict())


def measure_copy_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """Memory bandwidth of an elementwise pass over a float32 array of `nbytes` (read + write)."""
    x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
    kernel = compile_aot(_scale_copy, (x,))
    timing, _ = time_calls(lambda _: kernel(x), repeats)
    timing.compile_s, timing.lower_s = kernel.compile_s, kernel.lower_s
    moved = 2 * x.size * 4
    return dict(suite="roofline", kind="copy", bytes=int(x.size * 4), bytes_moved=moved,
                bytes_s=moved / timing.median_s, **timing.as_dict())


def measure_decode(cfg: ModelConfig, params: dict, batch: int, context: int, *,
                   repeats: int = 10, copy_bytes_s: float | None = None,
                   datasheet_bytes_s: float | None = None) -> dict:
    """One cached AR model call (one new token per row over a cache of `context` valid slots):
    time per call, bytes read (params + the K/V cache buffer) and their ratio to the measured copy
    bandwidth and the datasheet bandwidth (None leaves a ratio None)."""
    capacity = context + 1
    cache = init_cache(cfg, batch, capacity)
    cache = dataclasses.replace(cache, length=jnp.full((batch,), context, jnp.int32))
    tok = jnp.zeros((batch, 1), jnp.int32)
    pos_in = jnp.full((batch, 1), max(context - 1, 0), jnp.int32)
    pos_out = jnp.full((batch, 1), min(context, cfg.block_size - 1), jnp.int32)
    args = (cfg, params, cache, tok, pos_in, pos_out)
    kernel = compile_aot(_DECODE_STEP, args)
    timing, _ = time_calls(lambda _: kernel(*args), repeats)
    t = timing.median_s
    nbytes = param_bytes(params) + kv_bytes(cfg, batch, capacity)
    row = dict(suite="roofline", kind="decode", batch=batch, length=context,
               dtype=cfg.dtype, param_dtype=cfg.param_dtype, bytes_per_call=nbytes,
               ms_per_call=1e3 * t, tokens_per_s=batch / t, bytes_s=nbytes / t,
               copy_bytes_s=copy_bytes_s, datasheet_bytes_s=datasheet_bytes_s,
               bw_frac_copy=nbytes / t / copy_bytes_s if copy_bytes_s else None,
               bw_frac_datasheet=nbytes / t / datasheet_bytes_s if datasheet_bytes_s else None,
               roofline_tokens_per_s=batch * copy_bytes_s / nbytes if copy_bytes_s else None,
               **timing.as_dict())
    row["compile_s"], row["lower_s"] = kernel.compile_s, kernel.lower_s
    row.update(kernel.costs)
    return row
