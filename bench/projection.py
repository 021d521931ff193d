"""A roofline projection of the sampler passes on accelerators we cannot borrow.

For each model pass of the samplers — the cached AR step, the burst pass over W targets (exact
mode's drafts; over all N: jacobi's first drafts) and the causal verify pass over W slots (exact
and jacobi) — at a batch B and length N: FLOPs from XLA's cost analysis of the lowered pass
(abstract inputs: nothing is allocated or run), and the bytes a pass must move at least: the
parameters, the whole KV cache buffer (the kernels read every slot) and the float32 logits it
writes. On a device with peak compute F and memory bandwidth M, the projected time of a pass is
max(FLOPs / F, bytes / M): a lower bound, not a measurement.

Break-even: cached AR takes N + 1 calls of t_AR per sequence (the prefill is common to every
sampler and left out). Exact burst with window W takes t_burst(W) + t_verify(W) per iteration
(two calls), so it beats AR below 2 (N + 1) t_AR / (t_burst + t_verify) calls per sequence;
`burst_jacobi` takes t_burst(N) once, then t_verify(W) per iteration (one call each), so it beats
AR below 1 + ((N + 1) t_AR - t_burst(N)) / t_verify(W) calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.harness import DATASHEET, compile_aot, time_calls
from bench.models import kv_bytes, param_bytes
from sigma_jax.cache import init_cache
from sigma_jax.checks import check_int
from sigma_jax.config import MAX_SIZE, ModelConfig
from sigma_jax.decode import burst_pass, cache_capacity, extend_pass
from sigma_jax.model import init_params

# Devices by name: (published dense bf16 FLOP/s, memory bytes/s) from `harness.DATASHEET`.
DEVICES = {"a100": DATASHEET["A100"], "h100": DATASHEET["H100"], "h200": DATASHEET["H200"],
           "tpu-v5e": DATASHEET["TPU v5 lite"], "tpu-v5p": DATASHEET["TPU v5p"]}


def check_sizes(length, window) -> None:
    """One-line ValueError, naming the launcher's flags, unless --length is an integer in
    [1, MAX_SIZE] (the largest block_size: every position fits int32) and --window one in
    [1, --length]."""
    length = check_int("--length", length, 1, MAX_SIZE)
    if check_int("--window", window, 1) > length:
        raise ValueError(f"--window must be in [1, --length] = [1, {length}]; got {window}")


def _passes(cfg: ModelConfig, batch: int, length: int, window: int, concrete: bool = False):
    """{pass name: (jitted function, its arguments, queries)}: abstract arguments (nothing
    allocated), or with `concrete` random params, an empty cache and zero tokens."""
    params = (init_params(cfg, jax.random.key(0)) if concrete
              else jax.eval_shape(init_params, cfg, jax.random.key(0)))
    make_cache = lambda: init_cache(cfg, batch, cache_capacity(cfg, length, headroom=window))
    cache = make_cache() if concrete else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), jax.eval_shape(make_cache))
    ints = ((lambda *shape: jnp.zeros(shape, jnp.int32)) if concrete
            else (lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)))
    extend, burst = jax.jit(extend_pass), jax.jit(burst_pass)
    last = (ints(batch), ints(batch))
    return {
        "ar_step": (extend, (cfg, params, cache, ints(batch, 1), ints(batch, 1),
                             ints(batch, 1)), 1),
        "burst_pass": (burst, (cfg, params, cache, *last, ints(batch, window)), window),
        "burst_pass_all": (burst, (cfg, params, cache, *last, ints(batch, length)), length),
        "verify_pass": (extend, (cfg, params, cache, ints(batch, window), ints(batch, window),
                                 ints(batch, window)), window),
    }


def pass_costs(cfg: ModelConfig, batch: int, length: int, window: int) -> dict[str, dict]:
    """{pass name: {"flops", "bytes", "queries"}} of the AR step, the burst pass over `window`
    and over all `length` targets, and the verify pass over `window` slots."""
    passes = _passes(cfg, batch, length, window)
    params, cache = passes["ar_step"][1][1:3]
    fixed = param_bytes(params) + kv_bytes(cfg, batch, cache.capacity)
    return {name: {"flops": float(fn.lower(*args).cost_analysis()["flops"]), "queries": q,
                   "bytes": float(fixed + batch * q * cfg.vocab_size * 4)}
            for name, (fn, args, q) in passes.items()}


def measured_ms(cfg: ModelConfig, batch: int, length: int, window: int,
                repeats: int = 5) -> dict[str, float]:
    """{pass name: median ms per call} timed on the default device (compiled first)."""
    out = {}
    for name, (fn, args, _) in _passes(cfg, batch, length, window, concrete=True).items():
        kernel = compile_aot(fn, args)
        timing, _ = time_calls(lambda i, kernel=kernel, args=args: kernel(*args), repeats)
        out[name] = 1e3 * timing.median_s
    return out


def project(costs: dict[str, dict], device: str) -> dict[str, float]:
    """{pass name: projected seconds per call} on `device` (a key of DEVICES)."""
    flops_s, bytes_s = DEVICES[device]
    return {name: max(c["flops"] / flops_s, c["bytes"] / bytes_s) for name, c in costs.items()}


def break_even_calls(times: dict[str, float], length: int) -> dict[str, float]:
    """Calls per sequence below which each burst sampler beats cached AR (module docstring)."""
    ar = (length + 1) * times["ar_step"]
    return {"burst": 2 * ar / (times["burst_pass"] + times["verify_pass"]),
            "burst_jacobi": 1 + (ar - times["burst_pass_all"]) / times["verify_pass"]}


def projection_rows(cfg: ModelConfig, devices, batches, length: int, window: int,
                    measure: bool = False) -> list[dict]:
    """One row per (device, batch, pass): flops, bytes, intensity, projected ms (and, with
    `measure`, the ms measured on the default device); and one per (device, batch, sampler)
    with the break-even calls per sequence."""
    rows = []
    for batch in batches:
        costs = pass_costs(cfg, batch, length, window)
        measured = measured_ms(cfg, batch, length, window) if measure else {}
        for device in devices:
            times = project(costs, device)
            for name, c in costs.items():
                rows.append(dict(kind="pass", device=device, batch=batch, length=length,
                                 window=window, name=name, flops=c["flops"], bytes=c["bytes"],
                                 intensity=c["flops"] / c["bytes"],
                                 projected_ms=1e3 * times[name],
                                 measured_ms=measured.get(name)))
            for sampler, calls in break_even_calls(times, length).items():
                rows.append(dict(kind="break_even", device=device, batch=batch, length=length,
                                 window=window, name=sampler, calls=calls))
    return rows
