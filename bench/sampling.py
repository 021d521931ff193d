"""Sampler measurements: one sampler configuration, timed on its compiled kernel.

What is timed: the jitted kernels of `sample_ar_call` / `sample_burst_call` (the public prepared
calls that `sample_ar` / `sample_burst` run), compiled ahead of time. Preparing a call validates
the inputs (which reads arrays back to the host) and splits keys; that is per-call overhead of a
Python convenience layer, not of the sampler, and would distort the ms-per-sequence of small
configurations, so it is done before timing. `kernel_matches_public` checks that the compiled
kernel on the prepared arguments returns what the public function returns.

Counters (forward passes, iterations, tokens per iteration) always come from the `SampleStats`
the sampler returns (`sampler_figures`), never from timing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import compile_aot, time_calls, tree_signature
from bench.models import kv_bytes, param_bytes
from sigma_jax.config import ModelConfig
from sigma_jax.sampling import BURST_MODES, SampleOptions, prepare, sample


def unconditional_inputs(cfg: ModelConfig, batch: int, length: int):
    """tokens int32 [B, N] and known bool [B, N]: nothing known (with a start token), else the
    first token known (token 0)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    known = jnp.zeros((batch, length), bool)
    if not cfg.bos:
        known = known.at[:, 0].set(True)
    return tokens, known


def kernel_matches_public(cfg, params, options: SampleOptions, key, tokens, known) -> bool:
    """True when the AOT-compiled kernel on prepared arguments returns the public function's
    tokens and stats."""
    call = prepare(cfg, params, key, tokens, known, options)
    ours = compile_aot(call.kernel, call.args, call.static)(*call.args)
    theirs = sample(cfg, params, key, tokens, known, options)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        ours, theirs)
    return all(jax.tree.leaves(same))


def sampler_peak_bytes(cfg: ModelConfig, options: SampleOptions, length: int, batch: int) -> int:
    """A rough upper estimate of the device memory a sampler configuration needs: float32 logits
    and their sampling copies, attention scores over the cache plus the new block, the cache and
    the parameters. Used to skip configurations that cannot fit, before compiling them."""
    w = options.window_for(length)
    k = options.n_orders if options.sampler == "burst_paper" else 1
    q = batch * k * w  # query slots of the largest pass
    slots = options.cache_capacity(cfg, length)
    if options.sampler == "ar_nocache":
        q, w, k, slots = batch * (length + 1), length + 1, 1, 0
    logits = 6 * q * cfg.vocab_size * 4
    if options.sampler == "burst_jacobi":  # every position's draft distribution, in the loop state
        logits += 2 * batch * length * cfg.vocab_size * 4
    attention = 4 * batch * cfg.n_head * (k * w) * (slots + k * w) * 4
    hidden = 8 * q * max(cfg.hidden_dim, 3 * cfg.n_embd) * 4
    weights = cfg.n_layer * 12 * cfg.n_embd ** 2 * 4 + cfg.vocab_size * cfg.n_embd * 4
    return logits + attention + hidden + kv_bytes(cfg, batch, slots) * 2 + weights


def sampler_figures(outputs, median_s: float) -> dict:
    """The counters of R timed sampler outputs `(tokens, SampleStats)` whose median call took
    `median_s`: forward_passes (mean sequential model calls per batch call) and its max,
    iterations (mean per row) and its max, tokens_per_iteration (tokens committed per iteration),
    generated_per_seq, finished_frac, tokens_per_s (generated tokens per second) and ms_per_call
    (per sequential model call)."""
    stats = [jax.device_get(out[1]) for out in outputs]
    passes = np.array([s.forward_passes for s in stats], np.float64)  # [R]
    iterations = np.stack([s.iterations for s in stats]).astype(np.float64)  # [R, B]
    generated = np.stack([s.generated for s in stats]).astype(np.float64)  # [R, B]
    finished = np.stack([s.finished for s in stats])  # [R, B]
    return dict(
        forward_passes=float(passes.mean()), forward_passes_max=int(passes.max()),
        iterations=float(iterations.mean()), iterations_max=int(iterations.max()),
        tokens_per_iteration=float(generated.sum() / max(iterations.sum(), 1)),
        generated_per_seq=float(generated.mean()), finished_frac=float(finished.mean()),
        tokens_per_s=float(generated.sum(axis=1).mean()) / median_s,
        ms_per_call=1e3 * median_s / max(float(passes.mean()), 1.0),
    )


def measure_sampler(cfg: ModelConfig, params: dict, options: SampleOptions, length: int, batch: int,
                    *, repeats: int = 3, warmup: int = 2, seed: int = 0, weights: str = "init",
                    kernels: dict | None = None) -> dict:
    """Time one sampler configuration on unconditional generation of `batch` sequences of
    `length` tokens; each call (warm-up and timed) uses a different key. Returns a result row.

    kernels: a cache {key: Kernel} shared across calls, so the same program (e.g. the same shapes
    with other weights) is compiled once; the row reports that program's compile time.
    """
    if length > cfg.block_size:
        raise ValueError(f"length {length} exceeds the model's block_size {cfg.block_size}")
    tokens, known = unconditional_inputs(cfg, batch, length)
    calls = [prepare(cfg, params, jax.random.key(seed * 1000 + i), tokens, known, options)
             for i in range(warmup + repeats)]
    arg_sets = [call.args for call in calls]
    cache_key = (options, cfg, length, batch, tree_signature(params))
    kernels = {} if kernels is None else kernels
    if cache_key not in kernels:
        kernels[cache_key] = compile_aot(calls[0].kernel, arg_sets[0], calls[0].static)
    kernel = kernels[cache_key]
    timing, outputs = time_calls(lambda i: kernel(*arg_sets[i]), repeats, warmup)
    figures = sampler_figures(outputs, timing.median_s)  # after timing: no effect on it
    row = dict(
        suite="sampling", sampler=options.sampler, label=options.label, weights=weights,
        mode=BURST_MODES.get(options.sampler), order=options.order,
        window=options.window, window_eff=options.window_for(length),
        n_orders=options.n_orders if options.sampler == "burst_paper" else 1,
        length=length, batch=batch, n_known=int(np.asarray(known).sum(axis=1).min()),
        forward_passes=figures["forward_passes"],
        forward_passes_max=figures["forward_passes_max"],
        forward_passes_per_token=figures["forward_passes"] / max(length, 1),
        **{name: figures[name] for name in ("iterations", "iterations_max",
                                            "tokens_per_iteration", "generated_per_seq",
                                            "finished_frac", "tokens_per_s")},
        ms_per_seq=1e3 * timing.median_s / batch, ms_per_call=figures["ms_per_call"],
        **timing.as_dict(),
    )
    row["compile_s"], row["lower_s"] = kernel.compile_s, kernel.lower_s
    row.update(kernel.costs)
    if options.sampler != "ar_nocache":
        # Every cached model call reads the weights and the whole cache buffer (masked slots too).
        per_call = param_bytes(params) + kv_bytes(cfg, batch, options.cache_capacity(cfg, length))
        row["bytes_per_call_est"] = per_call
        row["hbm_gbps_est"] = per_call * figures["forward_passes"] / timing.median_s / 1e9
    return row
