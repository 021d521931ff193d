"""burst_jacobi's first drafts given each row's known tokens against given the start token alone
(`SampleOptions.first_drafts`), side by side on the shipped model, infilling real text.

    python experiments/time_first_drafts.py [--batches=16,1] [--known=0.3] [--rounds=3]

Each batch row is a window of tiny-shakespeare ($SIGMA_JAX_DATA, default ../shared/data) with
each position known with probability --known (one seed). Both settings are compiled ahead of
time (`sample_burst_call(...).lower().compile()`), then timed in interleaved rounds (known,
start, known, start, ...), --calls calls each, every call with a fresh key. One JSON line per
run: setting, batch, median and min ms per batch call, model calls (mean over the calls), mean
iterations per row, tokens/s (generated tokens over the median), compile seconds; then, per
batch, the start/known ratio of tokens/s in each round.
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax import pretrained, sample_burst_call

SETTINGS = ("known", "start")


def _inputs(encode, batch: int, n: int, known_frac: float, seed: int):
    """tokens int32 [B, N] (windows of the text) and known bool [B, N]."""
    path = Path(os.environ.get("SIGMA_JAX_DATA", "../shared/data")) / "tinyshakespeare/input.txt"
    ids = np.asarray(encode(path.read_text()[:200_000]), np.int32)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - n, batch)
    tokens = np.stack([ids[s:s + n] for s in starts])
    return jnp.asarray(tokens), jnp.asarray(rng.random((batch, n)) < known_frac)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,1")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--known", type=float, default=0.3, help="share of known positions")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--order", default="spread")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg, params, encode, _ = pretrained.load("shakespeare_char")
    for batch in (int(b) for b in args.batches.split(",")):
        tokens, known = _inputs(encode, batch, args.length, args.known, args.seed)
        generated = int(jnp.sum(~known))
        compiled = {}
        for setting in SETTINGS:
            call = sample_burst_call(cfg, params, jax.random.key(0), tokens, known,
                                     mode="jacobi", order=args.order, window=args.window,
                                     first_drafts=setting)
            start = time.perf_counter()
            compiled[setting] = (call, call.lower().compile(), time.perf_counter() - start)
            jax.block_until_ready(compiled[setting][1](*call.args))
        tokens_per_s = {setting: [] for setting in SETTINGS}
        for round_ in range(args.rounds):
            for setting in SETTINGS:
                call, run, compile_s = compiled[setting]
                times, calls, iterations = [], [], []
                for i in range(args.calls):
                    key = jax.random.split(jax.random.key(1000 * round_ + i), batch)
                    call_args = (*call.args[:2], key, *call.args[3:])
                    start = time.perf_counter()
                    _, stats = jax.block_until_ready(run(*call_args))
                    times.append(time.perf_counter() - start)
                    calls.append(int(stats.forward_passes))
                    iterations.append(float(np.mean(stats.iterations)))
                median = float(np.median(times))
                tokens_per_s[setting].append(generated / median)
                print(json.dumps(dict(
                    setting=setting, round=round_, batch=batch, length=args.length,
                    known=args.known, window=args.window, order=args.order,
                    median_ms=round(1e3 * median, 1), min_ms=round(1e3 * min(times), 1),
                    model_calls=float(np.mean(calls)), iterations=round(np.mean(iterations), 2),
                    tokens_per_s=round(generated / median), compile_s=round(compile_s, 2))),
                      flush=True)
        ratios = [s / k for s, k in zip(tokens_per_s["start"], tokens_per_s["known"], strict=True)]
        print(f"# batch {batch}: start / known tokens/s per round: "
              + ", ".join(f"{r:.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
