"""Time a sampler of the shipped model: cached any-order AR by default (for A/B runs across
commits).

    python experiments/time_decode.py --batch=16 --length=256 [--calls=5] [--tag=new]
    python experiments/time_decode.py --sampler=burst_jacobi --order=spread --window=16
    python experiments/time_decode.py --dtype=bfloat16

Compiles `sample_ar_call(cfg, params, key, tokens, known, order="random")` (or, for a burst
sampler, `sample_burst_call(..., mode=..., order=..., window=...)`) ahead of time for the
shipped `shakespeare_char` model (4 x 128, block 256) at the given batch and sequence length,
unconditional (tokens zeros, nothing known), with the KV cache. After one warm-up call it times
`--calls` calls, each with a fresh key and waited for with `jax.block_until_ready`, and prints one
JSON line: batch, length, median and min ms per sequence call (all B rows filled), ms per model
call (the median divided by `stats.forward_passes`: prefill + one call per generated token), the
median process CPU ms per model call (all threads; steadier than wall time on a shared machine),
generated tokens/s, compile seconds, and the directory sigma_jax was imported from. Only the
public API is used, so the same script times any commit; experiments/ab_decode.sh interleaves two.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import sigma_jax
from sigma_jax import pretrained, sample_ar_call, sample_burst_call

MODES = {"burst": "exact", "burst_jacobi": "jacobi"}


def main(batch: int, length: int, calls: int, tag: str, sampler: str = "ar",
         order: str = "random", window: int | None = None, dtype: str = "float32") -> None:
    cfg, params, _, _ = pretrained.load("shakespeare_char")
    if dtype != "float32":  # the same weights, rounded, computed and stored in `dtype`
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    tokens = jnp.zeros((batch, length), jnp.int32)
    known = jnp.zeros((batch, length), bool)

    def prepared(seed: int):
        key = jax.random.key(seed)
        if sampler == "ar":
            return sample_ar_call(cfg, params, key, tokens, known, order=order)
        return sample_burst_call(cfg, params, key, tokens, known, mode=MODES[sampler],
                                 order=order, window=window)

    start = time.perf_counter()
    compiled = prepared(0).lower().compile()
    compile_s = time.perf_counter() - start
    out, stats = jax.block_until_ready(compiled(*prepared(0).args))  # warm-up
    passes = int(stats.forward_passes)
    times, cpu_times = [], []
    for seed in range(1, calls + 1):
        args = jax.block_until_ready(prepared(seed).args)
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    median = float(np.median(times))
    print(json.dumps(dict(
        tag=tag, sampler=sampler, order=order, window=window, batch=batch, length=length,
        dtype=dtype,
        median_ms=round(1e3 * median, 1),
        min_ms=round(1e3 * min(times), 1), ms_per_model_call=round(1e3 * median / passes, 3),
        cpu_ms_per_model_call=round(1e3 * float(np.median(cpu_times)) / passes, 3),
        model_calls=passes, tokens_per_s=round(batch * length / median),
        compile_s=round(compile_s, 2), sigma_jax=os.path.dirname(sigma_jax.__file__))),
        flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--calls", type=int, default=5, help="timed calls after one warm-up")
    parser.add_argument("--tag", default="", help="label printed with the line")
    parser.add_argument("--sampler", default="ar", choices=["ar", *MODES])
    parser.add_argument("--order", default="random")
    parser.add_argument("--window", type=int, default=None, help="burst window (default all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute and storage dtype (the shipped weights rounded to it)")
    flags = parser.parse_args()
    main(flags.batch, flags.length, flags.calls, flags.tag, flags.sampler, flags.order,
         flags.window, flags.dtype)
