"""The memory suite: what each sampler and the train step would hold on the device, from XLA's
memory analysis of the compiled program. Compiled, never run: every input is abstract
(`jax.ShapeDtypeStruct`; the parameters and the train state from `jax.eval_shape`), so nothing
is allocated on the device, whatever the model size.

Entries, at every (length N, batch B) of the config, one compile at a time:
    sample_ar             cached AR, random order
    sample_burst[exact]   exact burst, spread order, window W
    sample_burst[jacobi]  jacobi burst, spread order, window W
    sample_burst[paper]   the published rule, random orders, window W, K candidate orders
    train_step            `make_train_step` on a [B, N] int32 batch (the preset's TrainConfig
                          with batch_size = B and grad_accum = 1)
A sampler is compiled whole, as the lowering tests build it: `sample_*_call(...)()` traced
inside one `jax.jit` (the order construction before the kernel included), at the sampler's
default temperature 1 with no truncation.

Each row: argument, output, alias and temporary bytes (`compiled.memory_analysis()`), the KV
cache's own bytes (2 x n_layer x B x capacity x n_embd x itemsize; capacity from
`SampleOptions.cache_capacity`), temporaries less the KV cache, lower and compile seconds, and
a target with whether it holds: AR and exact burst `temps <= KV cache + 2 GB`; jacobi
`temps <= 1.5 x exact burst temps` at the same N and B. A configuration that fails records the
first line of its error and the suite goes on.

At GPT-2-small size (N = 1024, W = 64, B = 1, 16, 64) on a shared 2-core CPU each sampler
compile takes 10-25 s and each train-step compile 60-70 s: the whole suite takes about 7 minutes
(more than 5), with under 2 GB of host memory.
On CPU, XLA converts bfloat16 dot operands to float32, which inflates the temporaries against
what a GPU or TPU program of the same model holds.
"""

from __future__ import annotations

import functools
import gc
import time

import jax
import jax.numpy as jnp

from bench.models import kv_bytes
from bench.report import format_table
from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.presets import get_preset
from sigma_jax.sampling import SampleOptions, sample_ar_call, sample_burst_call
from sigma_jax.train import init_state, make_train_step

KV_SLACK_BYTES = 2e9  # AR and exact burst: temporaries within the KV cache plus this
JACOBI_RATIO = 1.5  # jacobi: temporaries within this multiple of exact burst's
GB = 1e9


def entries(window: int | None, n_orders: int) -> list[tuple[str, SampleOptions | None]]:
    """(entry name, sampler options; None for the train step), in compiling order (exact
    burst before jacobi, whose target reads it)."""
    return [
        ("sample_ar", SampleOptions("ar", order="random")),
        ("sample_burst[exact]", SampleOptions("burst", order="spread", window=window)),
        ("sample_burst[jacobi]", SampleOptions("burst_jacobi", order="spread", window=window)),
        ("sample_burst[paper]", SampleOptions("burst_paper", order="random", window=window,
                                              n_orders=n_orders)),
        ("train_step", None),
    ]


def preset_train_config(preset: str | None) -> TrainConfig | None:
    """The preset's TrainConfig (None without a preset: the train step is then skipped)."""
    return get_preset(preset).train if preset else None


def abstract(tree):
    """`tree` with every leaf as a jax.ShapeDtypeStruct of its shape and dtype."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def sampler_program(cfg: ModelConfig, params, options: SampleOptions, n: int, b: int):
    """(jitted sampler, abstract arguments (params, key, tokens int32 [B, N], known bool
    [B, N])): the prepared call and its kernel traced in one function."""
    tokens = jax.ShapeDtypeStruct((b, n), jnp.int32)
    known = jax.ShapeDtypeStruct((b, n), jnp.bool_)
    key = jax.eval_shape(lambda: jax.random.key(0))
    if options.sampler == "ar":
        prepare = functools.partial(sample_ar_call, order=options.order)
    else:
        extra = {"n_orders": options.n_orders} if options.mode == "paper" else {}
        prepare = functools.partial(sample_burst_call, mode=options.mode, order=options.order,
                                    window=options.window, **extra)
    fn = jax.jit(lambda p, k, t, m: prepare(cfg, p, k, t, m)())
    return fn, (abstract(params), key, tokens, known)


def train_program(cfg: ModelConfig, train_cfg: TrainConfig, n: int):
    """(jitted train step, abstract arguments (state, batch int32 [global_batch, N]))."""
    state = jax.eval_shape(functools.partial(init_state, cfg, train_cfg))
    batch = jax.ShapeDtypeStruct((train_cfg.global_batch, n), jnp.int32)
    return make_train_step(cfg, train_cfg), (state, batch)


def compiled_memory(jitted, args) -> dict:
    """Lower and compile `jitted` on `args` (nothing run): {argument_bytes, output_bytes,
    alias_bytes, temp_bytes, code_bytes, lower_s, compile_s}."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    stats = compiled.memory_analysis()
    return dict(argument_bytes=int(stats.argument_size_in_bytes),
                output_bytes=int(stats.output_size_in_bytes),
                alias_bytes=int(stats.alias_size_in_bytes),
                temp_bytes=int(stats.temp_size_in_bytes),
                code_bytes=int(stats.generated_code_size_in_bytes),
                lower_s=t1 - t0, compile_s=t2 - t1)


def measure_entry(cfg: ModelConfig, params, train_cfg: TrainConfig | None, name: str,
                  options: SampleOptions | None, n: int, b: int) -> dict:
    """The compiled figures of one entry at (N, B), with kv_cache_bytes and
    temp_minus_kv_bytes (None for the train step: it holds no cache)."""
    if options is None:
        if train_cfg is None:
            raise ValueError("the train step needs a preset's TrainConfig")
        jitted, args = train_program(cfg, train_cfg.replace(batch_size=b, grad_accum=1), n)
        kv = None
    else:
        jitted, args = sampler_program(cfg, params, options, n, b)
        kv = kv_bytes(cfg, b, options.cache_capacity(cfg, n))
    row = compiled_memory(jitted, args)
    row.update(kv_cache_bytes=kv,
               temp_minus_kv_bytes=None if kv is None else row["temp_bytes"] - kv)
    return row


def with_target(row: dict, exact: dict | None) -> dict:
    """`row` with target (text), target_bytes and target_ok (None where the row has no target
    or its reference failed). exact: the exact-burst row at the same N and B."""
    name, temps = row["entry"], row.get("temp_bytes")
    bound, text = None, None
    if name in ("sample_ar", "sample_burst[exact]"):
        text = f"temps <= KV cache + {KV_SLACK_BYTES / GB:g} GB"
        if temps is not None:
            bound = row["kv_cache_bytes"] + KV_SLACK_BYTES
    elif name == "sample_burst[jacobi]":
        text = f"temps <= {JACOBI_RATIO:g} x exact burst temps"
        if temps is not None and exact and exact.get("temp_bytes") is not None:
            bound = JACOBI_RATIO * exact["temp_bytes"]
    row.update(target=text, target_bytes=bound,
               target_ok=None if bound is None else bool(temps <= bound))
    return row


def run_memory_suite(config, cfg: ModelConfig, params, train_cfg: TrainConfig | None,
                     writer, clock=None, log=print) -> list[dict]:
    """Every entry at every (length, batch) of `config` (a BenchConfig: lengths, batches,
    burst_window, n_orders[-1]), one compile at a time, each program dropped before the next.
    params: arrays or ShapeDtypeStructs (only their shapes are read). Lengths above block_size
    and configurations past the clock's budget are recorded as skipped, failures as error rows.
    Returns the rows (also added to `writer`)."""
    from bench.suites import first_line  # the suites module imports this one

    rows = []
    for n in config.lengths:
        window = config.burst_window if config.burst_window and config.burst_window < n else None
        for b in config.batches:
            exact = None
            for name, options in entries(window, config.n_orders[-1]):
                base = dict(suite="memory", entry=name, label=options.label if options else name,
                            length=n, batch=b, window=options.window_for(n) if options else None,
                            n_orders=options.n_orders if name.endswith("[paper]") else None,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            device_kind=jax.devices()[0].device_kind)
                if n > cfg.block_size:
                    row = {**base, "skipped": f"length > block_size {cfg.block_size}"}
                elif clock is not None and clock.over():
                    row = {**base, "skipped": "time budget"}
                else:
                    try:
                        row = {**base, **measure_entry(cfg, params, train_cfg, name, options,
                                                       n, b)}
                    except Exception as error:  # e.g. out of host memory: record it, go on
                        row = {**base, "error": first_line(error)}
                    gc.collect()  # drop the compiled program before the next compile
                row = writer.add(with_target(row, exact))
                exact = row if name == "sample_burst[exact]" else exact
                rows.append(row)
                log(f"  {name:21s} N={n:<5d} B={b:<4d} " + (
                    f"temps {_gb(row['temp_bytes'])} GB, compile {row['compile_s']:.1f}s"
                    if "temp_bytes" in row else (row.get("error") or row.get("skipped"))))
    return rows


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


# (row key, column title) of the memory table; byte columns in GB.
MEMORY_COLUMNS = [("entry", "entry"), ("length", "N"), ("batch", "B"),
                  ("argument_bytes", "args GB"), ("output_bytes", "out GB"),
                  ("temp_bytes", "temps GB"), ("kv_cache_bytes", "KV GB"),
                  ("temp_minus_kv_bytes", "temps-KV GB"), ("target", "target"),
                  ("target_ok", "holds"), ("compile_s", "compile_s")]


def format_memory_table(rows) -> str:
    """The memory rows as a text table, bytes in GB with two decimals."""
    shown = []
    for row in rows:
        cells = {key: _gb(row.get(key)) if key.endswith("_bytes") else row.get(key)
                 for key, _ in MEMORY_COLUMNS}
        ok = row.get("target_ok")
        cells["target_ok"] = "-" if ok is None else ("yes" if ok else "NO")
        if row.get("compile_s") is not None:
            cells["compile_s"] = f"{row['compile_s']:.1f}"
        shown.append({**row, **cells})
    return format_table(shown, MEMORY_COLUMNS)


def print_memory_table(rows, log=print) -> None:
    """The memory table (nothing for no rows), with what its figures are."""
    if not rows:
        return
    log("\n== memory ==")
    log(format_memory_table(rows))
    log("\nbytes from XLA's memory_analysis() of the compiled program (compile only, abstract "
        "inputs); KV: 2 x n_layer x B x capacity x n_embd x itemsize. On CPU XLA converts "
        "bfloat16 dot operands to float32, which inflates temporaries against GPU/TPU.")
