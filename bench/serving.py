"""Serving throughput: the same requests through the engine (continuous batching) and through
the one-shot sampler in static batches of `slots` consecutive requests.

The workload: request lengths drawn uniformly from [min_length, max_length]; half of the
requests unconditional, half infilling (known tokens scattered over a window of real text, each
position known with probability `known_frac`); one key per request; all from one seed.

What is reported per run: requests/s, tokens/s (generated tokens over the wall time), the p50
and p99 latency in model calls and in seconds, and the slot occupancy (the share of slot-steps
that held an unfinished request). Latency counts from the start of the run (queueing included):
in model calls, a static batch's requests wait for every earlier batch's calls; an engine
request's calls are its prefill and its own steps (`options.model_calls`). Compilation is done
before timing (one warm-up pass per configuration over the first `slots` requests).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.config import MAX_SEED, ModelConfig
from sigma_jax.sampling import Request, SampleOptions, sample, sample_sharded, serve
from sigma_jax.sampling.options import model_calls
from sigma_jax.sharding import MeshConfig, make_mesh, to_host


@dataclasses.dataclass(frozen=True)
class Workload:
    """requests: the Requests; lengths int [R]; generated: unknown positions per request."""

    requests: list
    lengths: np.ndarray
    generated: np.ndarray


KEY_STRIDE = 100_003  # request i's key is jax.random.key(seed * KEY_STRIDE + i)


def check_seed(seed, count: int, name: str = "seed") -> int:
    """`seed` as an int whose `count` request keys all lie in jax.random.key's range: in
    [0, (MAX_SEED - count + 1) // KEY_STRIDE], else a one-line ValueError naming `name`."""
    return check_int(name, seed, 0, (MAX_SEED - max(count, 1) + 1) // KEY_STRIDE)


def mixed_workload(text_ids: np.ndarray, count: int, min_length: int, max_length: int,
                   known_frac: float = 0.3, seed: int = 0, infill: bool = True) -> Workload:
    """`count` requests: lengths uniform in [min_length, max_length]; even indices
    unconditional, odd ones (with `infill`; else none) infilling a random window of `text_ids`
    (int [T]). seed: `check_seed`."""
    rng = np.random.default_rng(check_seed(seed, count))
    requests, lengths = [], rng.integers(min_length, max_length + 1, count)
    for i, length in enumerate(lengths):
        start = rng.integers(0, len(text_ids) - length)
        tokens = np.asarray(text_ids[start:start + length], np.int32)
        unconditional = i % 2 == 0 or not infill
        known = np.zeros(length, bool) if unconditional else rng.random(length) < known_frac
        requests.append(Request(tokens, known, jax.random.key(seed * KEY_STRIDE + i)))
    generated = np.array([len(r.tokens) - int(r.known.sum()) for r in requests])
    return Workload(requests, lengths.astype(np.int32), generated)


def run_engine(cfg: ModelConfig, params: dict, work: Workload, options: SampleOptions,
               slots: int, capacity: int, steps_per_call: int = 1, devices=None) -> dict:
    """One timed pass of the workload through `serve` (after a warm-up pass); devices: one
    engine per device (`serve(devices=...)`)."""
    warm = Workload(work.requests[:slots], work.lengths[:slots], work.generated[:slots])
    run = lambda requests: list(serve(cfg, params, requests, slots=slots, options=options,
                                      capacity=capacity, steps_per_call=steps_per_call,
                                      devices=devices))
    run(warm.requests)
    start = time.perf_counter()
    results = run(work.requests)
    wall = time.perf_counter() - start
    if any(r.error for r in results):
        raise ValueError(f"a request was refused: {next(r.error for r in results if r.error)}")
    calls = np.array([model_calls(options.mode, r.steps) for r in results])
    seconds = np.array([r.seconds for r in results])
    total_steps = max(r.at_step for r in results)
    occupancy = sum(r.steps for r in results) / (total_steps * slots)
    tokens = {r.index: r.tokens for r in results}
    return _row("engine", options, work, wall, calls, seconds, occupancy, slots) | {
        "engine_steps": total_steps, "tokens": tokens}


def run_static(cfg: ModelConfig, params: dict, work: Workload, options: SampleOptions,
               slots: int, capacity: int, devices=None) -> dict:
    """One timed pass of the workload as consecutive static batches of `slots` requests, each
    padded to `capacity` with its rows' lengths (after a warm-up batch); devices: each batch
    split over them, one loop per device (`sample_sharded` on a data mesh)."""
    batches = [list(range(lo, min(lo + slots, len(work.requests))))
               for lo in range(0, len(work.requests), slots)]
    mesh = None if devices is None else make_mesh(MeshConfig(data=len(devices)), devices)
    _static_batch(cfg, params, work, options, batches[0], capacity, mesh)  # compile
    calls, seconds, tokens, busy, slot_iters = [], [], {}, 0, 0
    done_calls, start = 0, time.perf_counter()
    for rows in batches:
        out, stats = _static_batch(cfg, params, work, options, rows, capacity, mesh)
        done_calls += int(stats.forward_passes)
        now = time.perf_counter() - start
        iterations = np.asarray(stats.iterations)
        busy += int(iterations.sum())
        slot_iters += int(iterations.max()) * slots
        for j, i in enumerate(rows):
            calls.append(done_calls)
            seconds.append(now)
            tokens[i] = out[j, :work.lengths[i]]
    wall = time.perf_counter() - start
    return _row("static", options, work, wall, np.array(calls), np.array(seconds),
                busy / max(slot_iters, 1), slots) | {"tokens": tokens}


def _static_batch(cfg, params, work: Workload, options, rows, capacity, mesh=None):
    tokens = np.zeros((len(rows), capacity), np.int32)
    known = np.zeros((len(rows), capacity), bool)
    for j, i in enumerate(rows):
        length = work.lengths[i]
        tokens[j, :length] = work.requests[i].tokens
        known[j, :length] = work.requests[i].known
    keys = jax.numpy.stack([work.requests[i].key for i in rows])
    if mesh is None:
        out, stats = sample(cfg, params, keys, tokens, known, options,
                            lengths=work.lengths[rows])
    else:
        out, stats = to_host(sample_sharded(cfg, params, keys, tokens, known, options, mesh=mesh,
                                            lengths=work.lengths[rows]))
    return np.asarray(out), jax.device_get(stats)


def _row(kind, options, work, wall, calls, seconds, occupancy, slots) -> dict:
    return dict(
        kind=kind, sampler=options.sampler, label=options.label, slots=slots,
        requests=len(work.requests), wall_s=wall, requests_per_s=len(work.requests) / wall,
        tokens_per_s=float(work.generated.sum()) / wall,
        calls_p50=float(np.percentile(calls, 50)), calls_p99=float(np.percentile(calls, 99)),
        seconds_p50=float(np.percentile(seconds, 50)),
        seconds_p99=float(np.percentile(seconds, 99)), occupancy=float(occupancy))


def plot(rows: list[dict], path) -> None:
    """tokens/s and p99 latency (seconds) of every (sampler, kind) pair, as bars (nothing
    without matplotlib, which is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    labels = sorted({r["label"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (median of rounds)"),
                           (axes[1], "seconds_p99", "p99 latency, s")):
        for k, kind in enumerate(("engine", "static")):
            values = [np.median([r[key] for r in rows if r["label"] == lab
                                 and r["kind"] == kind]) for lab in labels]
            ax.bar(np.arange(len(labels)) + 0.4 * k, values, width=0.4, label=kind)
        ax.set_xticks(np.arange(len(labels)) + 0.2, labels, fontsize=7)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
