"""The shipped suite: the samplers on the shipped character model, each beside cached AR.

The model is `sigma_jax.pretrained.load(SHIPPED_MODEL)` (4 x 128, block 256, float32). At every
(length N, batch B) of the config, with nothing known (`unconditional_inputs`), it measures
`shipped_options(N)`:
    ar[random]                      cached AR, the reference of every ratio
    burst[spread](W=16)             exact burst
    burst_jacobi[spread](W=16, 32, all)
A window >= N is the same program as window None (all remaining positions): such entries are
merged.

Timing is that of bench/sampling.py: the public prepared call (`sigma_jax.sampling.prepare`,
inputs checked and keys split before timing), its kernel compiled ahead of time (`compile_aot`;
compile time reported apart), calls ended by `jax.block_until_ready` (`time_calls`), a fresh key
for every call. What differs is the schedule: every configuration is warmed up first, then each
repeat round times every configuration once, forward on even rounds and backward on odd ones, so
AR and each burst row are measured minutes apart at most, under the same load. Counters come from
the returned SampleStats (`sampler_figures`).

Each row: forward_passes (sequential model calls per batch call), iterations (mean per row),
ms per batch call (median and min over the rounds), ms per sequence (median / B), ms per model
call (median / forward_passes), tokens_per_s (B * N / median seconds), vs_ar (tokens_per_s over
the AR row's at the same N and B) and vs_ar_min / vs_ar_max / vs_ar_rounds (the ratio of the AR
call time to this row's call time within each round). A configuration that fails records the
first line of its error and the others go on.
"""

from __future__ import annotations

import dataclasses

import jax

from bench.harness import Timing, compile_aot, device_kind, time_calls
from bench.models import cast_model, param_bytes
from bench.report import format_table, format_value
from bench.sampling import sampler_figures, unconditional_inputs
from sigma_jax import pretrained
from sigma_jax.config import ModelConfig
from sigma_jax.model import count_params
from sigma_jax.sampling import SampleOptions, prepare

SHIPPED_MODEL = "shakespeare_char"
BURST_WINDOW = 16  # the exact burst row's window
JACOBI_WINDOWS = (16, 32, None)
NOTE = ("speed ratios are comparable only side by side (the same process and rounds): this is a "
        "shared machine, and absolute times move with its load")


def shipped_options(length: int) -> list[SampleOptions]:
    """Cached AR first, then exact burst (spread, W=16) and jacobi burst (spread, W=16, 32,
    all); windows >= length become None and duplicates are dropped."""
    options = [SampleOptions("ar", order="random"),
               SampleOptions("burst", order="spread", window=BURST_WINDOW)]
    options += [SampleOptions("burst_jacobi", order="spread", window=w) for w in JACOBI_WINDOWS]
    options = [o.replace(window=None) if o.window and o.window >= length else o for o in options]
    return list(dict.fromkeys(options))


def load_shipped(dtype: str | None = None) -> tuple[ModelConfig, dict, dict]:
    """(cfg, params, info) of the shipped model, cast to `dtype` if given; info: source,
    model name, config, params and param_bytes."""
    cfg, params, _, _ = pretrained.load(SHIPPED_MODEL)
    cfg, params = cast_model(cfg, params, dtype)
    info = dict(source="shipped", shipped=SHIPPED_MODEL, model=dataclasses.asdict(cfg),
                params=count_params(params), param_bytes=param_bytes(params))
    return cfg, params, info


def compiled_call(cfg: ModelConfig, params, options: SampleOptions, length: int, batch: int,
                  n_calls: int, seed: int):
    """(kernel, argument sets): the prepared call of `options` on unconditional inputs
    compiled ahead of time, and the prepared arguments of `n_calls` calls, call i with key
    seed * 1000 + i (as `measure_sampler` keys them)."""
    tokens, known = unconditional_inputs(cfg, batch, length)
    calls = [prepare(cfg, params, jax.random.key(seed * 1000 + i), tokens, known, options)
             for i in range(n_calls)]
    return compile_aot(calls[0].kernel, calls[0].args, calls[0].static), [c.args for c in calls]


def warm_up(program, warmup: int) -> None:
    """Run a compiled program [kernel, argument sets] untimed on its first `warmup` (>= 1)
    argument sets, each call ended by `jax.block_until_ready` (one timed call discarded)."""
    kernel, arg_sets = program
    time_calls(lambda i: kernel(*arg_sets[i]), repeats=1, warmup=warmup - 1)


def time_interleaved(programs: list, repeats: int, first: int) -> tuple[list, list]:
    """Time compiled programs [(kernel, argument sets)] in rounds: round r times each program
    once, on argument set first + r, forward on even rounds and backward on odd ones, each call
    timed by `time_calls`. Returns (seconds [program][round], outputs [program][round])."""
    times = [[0.0] * repeats for _ in programs]
    outputs = [[None] * repeats for _ in programs]
    for r in range(repeats):
        ids = range(len(programs)) if r % 2 == 0 else reversed(range(len(programs)))
        for p in ids:
            kernel, arg_sets = programs[p]
            timing, out = time_calls(lambda _, k=kernel, a=arg_sets[first + r]: k(*a),
                                     repeats=1, warmup=0)
            times[p][r], outputs[p][r] = timing.times_s[0], out[0]
    return times, outputs


def shipped_row(options: SampleOptions, length: int, batch: int, kernel, times: list[float],
                outputs: list, ar_times: list[float] | None) -> dict:
    """The result row of one configuration timed `times` (seconds per round) with `outputs`;
    ar_times: the AR row's times in the same rounds (None: no ratios)."""
    timing = Timing(times_s=list(times), compile_s=kernel.compile_s, lower_s=kernel.lower_s)
    figures = sampler_figures(outputs, timing.median_s)
    rounds = None if ar_times is None else [a / t for a, t in zip(ar_times, times, strict=True)]
    row = dict(
        suite="shipped", model=SHIPPED_MODEL, sampler=options.sampler, label=options.label,
        mode=options.mode, order=options.order, window=options.window,
        window_eff=options.window_for(length), length=length, batch=batch,
        **{k: figures[k] for k in ("forward_passes", "forward_passes_max", "iterations",
                                   "iterations_max", "tokens_per_iteration",
                                   "generated_per_seq", "finished_frac")},
        ms_per_batch=1e3 * timing.median_s, ms_per_batch_min=1e3 * timing.min_s,
        ms_per_seq=1e3 * timing.median_s / batch,
        ms_per_call=1e3 * timing.median_s / max(figures["forward_passes"], 1.0),
        tokens_per_s=batch * length / timing.median_s,
        vs_ar_rounds=rounds, vs_ar_min=None if rounds is None else min(rounds),
        vs_ar_max=None if rounds is None else max(rounds),
        schedule="interleaved rounds", device_kind=device_kind(), **timing.as_dict())
    row.update(kernel.costs)
    return row


def measure_point(cfg: ModelConfig, params, options: list[SampleOptions], length: int,
                  batch: int, *, repeats: int, warmup: int, seed: int, log=print) -> list[dict]:
    """The rows of `options` at (length, batch), timed in interleaved rounds; a configuration
    whose compile or warm-up fails is an error row. options[0] is the ratios' reference (AR)."""
    from bench.suites import first_line  # the suites module imports this one

    programs, errors = {}, {}
    for o in options:
        try:
            programs[o] = compiled_call(cfg, params, o, length, batch, warmup + repeats, seed)
            warm_up(programs[o], warmup)  # a failing program fails here, not in the rounds
        except Exception as error:  # e.g. out of memory: record it and go on
            programs.pop(o, None)
            errors[o] = first_line(error)
            log(f"  {o.label} N={length} B={batch} failed: {errors[o]}")
    timed = list(programs)
    times, outputs = time_interleaved([programs[o] for o in timed], repeats, warmup)
    by_option = {o: (times[i], outputs[i]) for i, o in enumerate(timed)}
    ar_times = by_option[options[0]][0] if options[0] in by_option else None
    rows = []
    for o in options:
        base = dict(suite="shipped", model=SHIPPED_MODEL, sampler=o.sampler, label=o.label,
                    order=o.order, window=o.window, length=length, batch=batch)
        if o in errors:
            rows.append({**base, "error": errors[o]})
            continue
        rows.append(shipped_row(o, length, batch, programs[o][0], *by_option[o], ar_times))
    ar = rows[0] if "error" not in rows[0] else None
    for row in rows:
        if "error" not in row:
            row["vs_ar"] = row["tokens_per_s"] / ar["tokens_per_s"] if ar else None
    return rows


def run_shipped_suite(config, writer, clock=None, log=print, *, model=None,
                      options=None) -> list[dict]:
    """Every (length, batch) of `config` (a BenchConfig: lengths, batches, repeats, warmup,
    seed, dtype) on the shipped model. model: (cfg, params) if already loaded; options: the
    configurations (default `shipped_options(length)`; the first is the ratios' reference).
    Lengths above block_size and points past the clock's budget are recorded as skipped.
    Returns the rows (also added to `writer`)."""
    cfg, params = model if model is not None else load_shipped(config.dtype)[:2]
    rows = []
    for n in config.lengths:
        for b in config.batches:
            chosen = list(options) if options is not None else shipped_options(n)
            skip = (f"length > block_size {cfg.block_size}" if n > cfg.block_size else
                    "time budget" if clock is not None and clock.over() else None)
            if skip:
                rows += [writer.add(dict(suite="shipped", model=SHIPPED_MODEL, label=o.label,
                                         sampler=o.sampler, length=n, batch=b, skipped=skip))
                         for o in chosen]
                continue
            point = measure_point(cfg, params, chosen, n, b, repeats=config.repeats,
                                  warmup=config.warmup, seed=config.seed, log=log)
            for row in point:
                row.update(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
                rows.append(writer.add(row))
                if "error" not in row:
                    log(f"  {row['label']:28s} N={n:<4d} B={b:<3d} "
                        f"{row['forward_passes']:.4g} calls, {row['ms_per_batch']:.4g} ms, "
                        f"{row['tokens_per_s']:.4g} tok/s, x AR {format_value(row['vs_ar'])} "
                        f"({_spread(row)}), compile {row['compile_s']:.2f}s")
    return rows


def _spread(row: dict) -> str:
    low, high = row.get("vs_ar_min"), row.get("vs_ar_max")
    return "-" if low is None else f"{low:.3g}..{high:.3g}"


# (row key, column title) of the shipped table.
SHIPPED_COLUMNS = [("label", "sampler"), ("length", "N"), ("batch", "B"),
                   ("forward_passes", "calls"), ("iterations", "iters"),
                   ("ms_per_batch", "ms med"), ("ms_per_batch_min", "ms min"),
                   ("ms_per_call", "ms/call"), ("tokens_per_s", "tok/s"), ("vs_ar", "x AR"),
                   ("spread", "x AR min..max"), ("compile_s", "compile_s")]


def format_shipped_table(rows) -> str:
    """The shipped rows as a text table (tokens/s as whole numbers)."""
    shown = []
    for row in rows:
        cells = {"spread": _spread(row)}
        if row.get("tokens_per_s") is not None:
            cells["tokens_per_s"] = f"{row['tokens_per_s']:.0f}"
        shown.append({**row, **cells})
    return format_table(shown, SHIPPED_COLUMNS)


def print_shipped_table(rows, log=print) -> None:
    """The shipped table (nothing for no rows), with what its figures are."""
    if not rows:
        return
    log(f"\n== shipped ({SHIPPED_MODEL}) ==")
    log(format_shipped_table(rows))
    repeats = max((r.get("repeats") or 0 for r in rows), default=0)
    log(f"\ncalls: sequential model calls per batch call (SampleStats.forward_passes); iters: "
        f"mean per row; ms: one batch call, median and min over {repeats} interleaved rounds; "
        f"ms/call = ms med / calls; tok/s = B * N / median; x AR: tok/s over cached AR's at the "
        f"same N and B, min..max over the rounds.\nNote: {NOTE}.")
