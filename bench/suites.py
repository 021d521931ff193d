"""The benchmark suites (sampling, training, decode roofline, compiled memory, the shipped model's
samplers) and `run`, which runs them in turn.

Each suite turns a `BenchConfig` into result rows (`ResultWriter`): a configuration that does not
fit (length, memory, uncached cost, time budget) is recorded as skipped, one that fails as an
error row with the first line of its exception, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.config import BenchConfig, load_model
from bench.harness import datasheet, device_kind, device_memory_bytes
from bench.memory import preset_train_config, run_memory_suite
from bench.models import preset_model_config, variant_params
from bench.report import ResultWriter, environment, format_value, plot_sampling, write_json
from bench.roofline import measure_copy_bandwidth, measure_decode, measure_matmul
from bench.sampling import measure_sampler, sampler_peak_bytes
from bench.shipped import NOTE, run_shipped_suite
from bench.training import measure_training
from sigma_jax.model import count_params
from sigma_jax.sampling import BURST_MODES, SampleOptions

# The fixed training-throughput configuration: the shipped reference model's step (4 x 128,
# block 256, batch 32, random order, float32), comparable across machines and commits.
TRAIN_REFERENCE = dict(preset="shakespeare_char_ref", batch=32, length=256)


class Clock:
    """Seconds since the run started, against an optional budget (None: no budget)."""

    def __init__(self, budget_s: float | None):
        self.start, self.budget_s = time.monotonic(), budget_s

    def over(self, grace: float = 0.0) -> bool:
        """Past the budget (plus `grace` x budget)."""
        if self.budget_s is None:
            return False
        return time.monotonic() - self.start > self.budget_s * (1.0 + grace)


def first_line(error: BaseException) -> str:
    """`<type>: <first line of the message>`, at most 300 characters (an error row's note)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def sampling_jobs(config: BenchConfig, primary: str) -> list[tuple]:
    """(weights, SampleOptions, length, batch, part) of the sampling suite, in measuring order.

    part 'grid': every sampler of the main grid at every point, primary weights; exact burst
    along every order, AR along random orders (its cost does not depend on the order), the
    published rule with its own random orders. part 'sweep': at (lengths[-1], batches[0]) for
    every weights, cached AR, exact burst over `windows` and paper burst over `n_orders`.
    The order makes a time budget cut what costs most and tells least: the length sweep; the
    sweep rows that reuse its programs (other weights: no compile); the sweep rows that need new
    programs, grouped by program; then the other batch sizes.
    """
    paper_k = config.n_orders[-1]
    main = [SampleOptions(s, order=o, window=config.burst_window if s in BURST_MODES else None,
                          **({"n_orders": paper_k} if s == "burst_paper" else {}))
            for s in config.samplers for o in config.orders
            if o == "random" or s in ("burst", "burst_jacobi")]
    at_batch = set(config.samplers if config.batch_samplers is None else config.batch_samplers)
    jobs = [(primary, options, n, b, "grid") for n, b in config.points() for options in main
            if b == config.batches[0] or options.sampler in at_batch]
    sweep_n, sweep_b = config.lengths[-1], config.batches[0]
    for weights in dict.fromkeys((primary, *[w for w in config.weights if w != "checkpoint"])):
        jobs.append((weights, SampleOptions("ar"), sweep_n, sweep_b, "sweep"))
        if "burst" in config.samplers:
            for window in config.windows:
                jobs.append((weights, SampleOptions("burst", window=window), sweep_n,
                             sweep_b, "sweep"))
        if "burst_paper" in config.samplers:
            for k in config.n_orders:
                jobs.append((weights, SampleOptions("burst_paper", window=config.burst_window,
                                                    n_orders=k), sweep_n, sweep_b, "sweep"))
    # A window of N drafts everything: the same program as window None.
    jobs = [(w, options.replace(window=None) if options.window and options.window >= n
             else options, n, b, part) for w, options, n, b, part in jobs]
    first = [j for j in jobs if j[4] == "grid" and j[3] == sweep_b]
    rest = [j for j in jobs if j[4] == "grid" and j[3] != sweep_b]
    compiled = {j[1:4] for j in first}
    reuse = [j for j in jobs if j[4] == "sweep" and j[1:4] in compiled]
    new = [j for j in jobs if j[4] == "sweep" and j[1:4] not in compiled]
    programs = list(dict.fromkeys(j[1:4] for j in new))
    new.sort(key=lambda j: programs.index(j[1:4]))
    return first + reuse + new + rest


def run_sampling_suite(config: BenchConfig, cfg, params, primary: str, writer: ResultWriter,
                       clock: Clock, log=print) -> list[dict]:
    """The main grid (every sampler at every point, primary weights) and the burst sweeps
    (`sampling_jobs`); rows carry the ratio to cached AR at the same N, B and weights."""
    kernels: dict = {}
    memory = device_memory_bytes()
    done: set = set()
    ar_rows: dict = {}
    rows = []
    variants, ready = {}, set()
    for weights, options, n, b, part in sampling_jobs(config, primary):
        if (weights, options, n, b) in done:
            continue
        done.add((weights, options, n, b))
        base = dict(suite="sampling", part=part, sampler=options.sampler, label=options.label,
                    order=options.order, weights=weights, window=options.window,
                    n_orders=options.n_orders, length=n, batch=b)
        skip = None
        if n > cfg.block_size:
            skip = f"length > block_size {cfg.block_size}"
        elif options.sampler == "ar_nocache" and b * n * (n + 1) > config.max_uncached_tokens:
            skip = f"uncached cost B*N*(N+1) > {config.max_uncached_tokens}"
        elif sampler_peak_bytes(cfg, options, n, b) > 0.7 * memory:
            skip = f"estimated memory > 70% of {memory / 2**30:.0f} GiB"
        elif clock.over(grace=0.1 if (options, n, b) in ready else 0.0):
            skip = "time budget"  # a compiled program (other weights) gets 10% grace
        if skip:
            rows.append(writer.add({**base, "skipped": skip}))
            continue
        ready.add((options, n, b))
        if weights not in variants:
            variants[weights] = variant_params(weights, cfg, params, config.seed)
        try:
            row = measure_sampler(cfg, variants[weights], options, n, b, repeats=config.repeats,
                                  warmup=config.warmup, seed=config.seed, weights=weights,
                                  kernels=kernels)
        except Exception as error:  # e.g. out of device memory: record it and go on
            rows.append(writer.add({**base, "error": first_line(error)}))
            log(f"  {options.label} N={n} B={b} [{weights}] failed: {first_line(error)}")
            continue
        row.update(part=part, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   params=count_params(params), device_kind=device_kind())
        if options.sampler == "ar":
            ar_rows[(weights, n, b)] = row
        ar = ar_rows.get((weights, n, b))
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar["tokens_per_s"] if ar else None
        row["passes_vs_ar"] = row["forward_passes"] / ar["forward_passes"] if ar else None
        rows.append(writer.add(row))
        log(f"  {options.label:28s} N={n:<5d} B={b:<4d} [{weights}] "
            f"{row['tokens_per_s']:.4g} tok/s, {row['forward_passes']:.4g} passes, "
            f"compile {row['compile_s']:.2f}s")
    return rows


def run_training_suite(config: BenchConfig, cfg, writer: ResultWriter, baselines: dict,
                       clock: Clock, log=print) -> list[dict]:
    """The train step of the benchmarked model at (train_batch, train_length) and, with
    `train_reference`, of the TRAIN_REFERENCE configuration."""
    seq = config.train_length or min(cfg.block_size, max(config.lengths))
    train_cfg = cfg
    if config.dtype == "bfloat16":  # mixed precision: bf16 compute, float32 master weights
        train_cfg = cfg.replace(dtype="bfloat16", param_dtype="float32")
    jobs = [("benchmarked model", train_cfg, config.train_batch, seq, config.preset)]
    if config.train_reference:
        ref = TRAIN_REFERENCE
        jobs.append(("reference 4x128 B32 T256 random f32",
                     preset_model_config(ref["preset"], ref["length"]), ref["batch"],
                     ref["length"], ref["preset"]))
    rows = []
    for label, model_cfg, batch, length, preset in jobs:
        base = dict(suite="training", config=label, batch=batch, length=length)
        if clock.over():
            rows.append(writer.add({**base, "skipped": "time budget"}))
            continue
        try:
            row = measure_training(model_cfg, batch, length, repeats=max(config.repeats, 3),
                                   warmup=config.warmup, preset=preset,
                                   matmul_flops_s=baselines.get("matmul_flops_s"),
                                   peak_flops_s=baselines.get("peak_flops_s"))
        except Exception as error:
            log(f"  training ({label}) failed: {first_line(error)}")
            rows.append(writer.add({**base, "error": first_line(error)}))
            continue
        row.update(config=label, device_kind=device_kind())
        log(f"  train step [{label}] B={batch} T={length}: {row['step_ms']:.4g} ms, "
            f"{row['tokens_per_s']:.4g} tok/s, {row['model_flops_s'] / 1e9:.3g} GFLOP/s "
            f"(matmul {format_value((row['matmul_flops_s'] or 0) / 1e9)} GFLOP/s, "
            f"MFU {format_value(row['mfu'])}), compile {row['compile_s']:.2f}s")
        rows.append(writer.add(row))
    return rows


def measure_baselines(config: BenchConfig, writer: ResultWriter, log=print) -> dict:
    """Dense matmul FLOP/s (bf16 on accelerators, f32 on CPU) and copy bandwidth, same run:
    {matmul_flops_s, peak_flops_s, copy_bytes_s, datasheet_bytes_s, rows}."""
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    peak, bandwidth = datasheet()
    mm = measure_matmul(config.matmul_n, dtype, repeats=max(config.repeats, 5))
    mm.update(datasheet_flops_s=peak, device_kind=device_kind())
    cp = measure_copy_bandwidth(config.copy_bytes, repeats=max(config.repeats, 5))
    cp.update(datasheet_bytes_s=bandwidth, device_kind=device_kind(),
              bw_frac_datasheet=cp["bytes_s"] / bandwidth if bandwidth else None)
    writer.add(mm)
    writer.add(cp)
    log(f"  matmul {config.matmul_n}^3 {jnp.dtype(dtype).name}: {mm['flops_s']:.4g} FLOP/s; "
        f"copy {config.copy_bytes / 2**20:.0f} MiB: {cp['bytes_s'] / 1e9:.4g} GB/s")
    return dict(matmul_flops_s=mm["flops_s"], peak_flops_s=peak, copy_bytes_s=cp["bytes_s"],
                datasheet_bytes_s=bandwidth, rows=[mm, cp])


def run_roofline_suite(config: BenchConfig, cfg, params, writer: ResultWriter, baselines: dict,
                       clock: Clock, log=print) -> list[dict]:
    """One cached decode call per batch of `roofline_batches` (default `batches`) over the
    longest context that fits, against the measured copy and datasheet bandwidths."""
    context = min(max(config.lengths), cfg.block_size)
    rows = []
    for b in config.roofline_batches or config.batches:
        base = dict(suite="roofline", kind="decode", batch=b, length=context)
        if clock.over():
            rows.append(writer.add({**base, "skipped": "time budget"}))
            continue
        try:
            row = measure_decode(cfg, params, b, context, repeats=max(config.repeats, 10),
                                 copy_bytes_s=baselines.get("copy_bytes_s"),
                                 datasheet_bytes_s=baselines.get("datasheet_bytes_s"))
        except Exception as error:
            rows.append(writer.add({**base, "error": first_line(error)}))
            continue
        row["device_kind"] = device_kind()
        rows.append(writer.add(row))
        log(f"  decode B={b} ctx={context}: {row['ms_per_call']:.4g} ms/call, "
            f"{row['bytes_s'] / 1e9:.4g} GB/s ({format_value(row['bw_frac_copy'])} of copy)")
    return rows


def run(config: BenchConfig, *, argv: Sequence[str] | None = None, model=None,
        log=print) -> dict:
    """Run the chosen suites; write <out>/{sampling,training,roofline,memory,shipped}.jsonl,
    env.json and plots when `config.out` is set. model: `load_model(config)` if already loaded.
    Returns {"rows": {suite: rows}, "env": env, "plots": paths}."""
    clock = Clock(config.budget_s)
    plain_log = log
    log = lambda message: plain_log(f"[{time.monotonic() - clock.start:6.1f}s] {message}")
    writer = ResultWriter(config.out)
    cfg, params, primary, info = model if model is not None else load_model(config)
    name = info.get("preset") or info.get("shipped") or "ckpt"
    log(f"device {device_kind()} ({jax.default_backend()}); model {name}"
        f" {cfg.n_layer}x{cfg.n_embd} V={cfg.vocab_size} block={cfg.block_size} "
        f"{cfg.dtype}/{cfg.param_dtype}, {info['params']:,} params")
    env = environment(argv, dict(model_info=info, config=dataclasses.asdict(config)))
    if config.out:
        write_json(Path(config.out, "env.json"), env)
    baselines = {}
    # Sampling runs last: it is the open-ended suite, so a time budget cuts only its tail.
    try:
        if "training" in config.suites or "roofline" in config.suites:
            log("baselines:")
            baselines = measure_baselines(config, writer, log)
        if "training" in config.suites:
            log("training:")
            run_training_suite(config, cfg, writer, baselines, clock, log)
        if "roofline" in config.suites:
            log("roofline:")
            run_roofline_suite(config, cfg, params, writer, baselines, clock, log)
        if "memory" in config.suites:
            log("memory (compile only):")
            run_memory_suite(config, cfg, params, preset_train_config(config.preset), writer,
                             clock, log)
        if "shipped" in config.suites:
            log(f"shipped (interleaved rounds; {NOTE}):")
            run_shipped_suite(config, writer, clock, log,
                              model=(cfg, params) if primary == "shipped" else None)
        if "sampling" in config.suites:
            log("sampling:")
            run_sampling_suite(config, cfg, params, primary, writer, clock, log)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep what was measured, still plot
        env["interrupted"] = True
        log("interrupted: writing what was measured")
    plots = []
    if config.out and writer.rows.get("sampling"):
        plots = plot_sampling(writer.rows["sampling"], config.out, sweep_batch=config.batches[0],
                              sweep_length=config.lengths[-1])
    env["wall_s"] = time.monotonic() - clock.start
    env["skipped_for_time"] = sum(r.get("skipped") == "time budget"
                                  for rows in writer.rows.values() for r in rows)
    if config.out:
        write_json(Path(config.out, "env.json"), env)
    return {"rows": writer.rows, "env": env, "plots": plots}
