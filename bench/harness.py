"""The timing harness: device facts, ahead-of-time compilation and timed calls.

- `compile_aot` lowers and compiles a jitted function ahead of time on fully prepared arguments
  and reports the lowering and compile times on their own (`compile_s` never mixes with run time),
  plus `compiled.cost_analysis()` flops / bytes and `memory_analysis()` temporaries where the
  backend gives them (`cost_numbers`).
- `time_calls` warms up (untimed calls, each ended by `jax.block_until_ready`), then times N calls,
  each ended by `jax.block_until_ready`; `Timing` gives the median and the spread (min, max, IQR).
- `datasheet` / `device_kind` / `device_memory_bytes`: what the device is and what it may do.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# Datasheet figures by device-kind substring: (dense bf16 FLOP/s, memory bandwidth B/s).
# H100: the SXM figures (the PCIe / NVL parts are lower: the device kind is recorded with each run).
DATASHEET = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.039e12),
    "TPU v5 lite": (197e12, 819e9),  # TPU v5e
    "TPU v5p": (459e12, 2.765e12),
}


def device_kind() -> str:
    """The device kind of the first device (e.g. 'NVIDIA H200', 'cpu')."""
    return jax.devices()[0].device_kind


def datasheet(kind: str | None = None) -> tuple[float | None, float | None]:
    """(peak dense bf16 FLOP/s, memory bandwidth B/s) of the device kind (default: the first
    device's); (None, None) for a kind not in DATASHEET."""
    kind = device_kind() if kind is None else kind
    for name, figures in DATASHEET.items():
        if name in kind:
            return figures
    return None, None


def device_memory_bytes() -> int:
    """Memory the first device may use: its allocator limit, else half the host's RAM."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclasses.dataclass
class Timing:
    """Seconds per call of `repeats` timed calls, and the one-off lowering / compile times."""

    times_s: list[float]
    compile_s: float = float("nan")
    lower_s: float = float("nan")

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s))

    @property
    def min_s(self) -> float:
        return float(np.min(self.times_s))

    @property
    def max_s(self) -> float:
        return float(np.max(self.times_s))

    @property
    def iqr_s(self) -> tuple[float, float]:
        """The 25th and 75th percentiles of the call times."""
        q25, q75 = np.percentile(self.times_s, [25, 75])
        return float(q25), float(q75)

    def as_dict(self) -> dict:
        """The result-row fields: time_{median,min,max,q25,q75}_s, repeats, compile_s, lower_s."""
        q25, q75 = self.iqr_s
        return dict(time_median_s=self.median_s, time_min_s=self.min_s, time_max_s=self.max_s,
                    time_q25_s=q25, time_q75_s=q75, repeats=len(self.times_s),
                    compile_s=self.compile_s, lower_s=self.lower_s)


def cost_numbers(compiled) -> dict:
    """XLA's flops / bytes accessed and the temporary buffer size of a compiled program:
    {"xla_flops", "xla_bytes", "temp_bytes"}, None where the backend does not say.
    cost_analysis() is a dict in jax 0.10+, a one-element list in older versions. XLA counts a
    while-loop body once, whatever its trip count."""
    out = {"xla_flops": None, "xla_bytes": None, "temp_bytes": None}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else None
        if cost:
            flops, nbytes = cost.get("flops"), cost.get("bytes accessed")
            out["xla_flops"] = None if flops is None or flops < 0 else float(flops)
            out["xla_bytes"] = None if nbytes is None or nbytes < 0 else float(nbytes)
    except Exception:  # not every backend implements cost analysis
        pass
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
            out["temp_bytes"] = int(memory.temp_size_in_bytes)
    except Exception:
        pass
    return out


class Kernel:
    """A jitted function compiled ahead of time for one set of argument shapes.

    lower_s / compile_s: the one-off lowering and compile times; costs: `cost_numbers`.
    static_kwargs are the jit's static keyword arguments: they choose the program and are not
    passed to the compiled executable (some jax versions want them again: handled on the first
    call).
    """

    def __init__(self, jitted, args: Sequence, static_kwargs: dict | None = None):
        self.static_kwargs = dict(static_kwargs or {})
        t0 = time.perf_counter()
        lowered = jitted.lower(*args, **self.static_kwargs)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.costs = cost_numbers(self.compiled)
        self._with_static = None

    def __call__(self, *args):
        if self._with_static is None:
            try:
                out = self.compiled(*args)
                self._with_static = False
                return out
            except TypeError:
                self._with_static = True
        if self._with_static:
            return self.compiled(*args, **self.static_kwargs)
        return self.compiled(*args)


def compile_aot(jitted, args: Sequence, static_kwargs: dict | None = None) -> Kernel:
    """Lower and compile `jitted` for `args` (timed apart from any run)."""
    return Kernel(jitted, args, static_kwargs)


def time_calls(call: Callable[[int], Any], repeats: int, warmup: int = 2
               ) -> tuple[Timing, list]:
    """Call `call(i)` for i = 0 .. warmup + repeats - 1; the first `warmup` calls are not timed.
    Every call ends with `jax.block_until_ready` on its output. Returns (Timing, timed outputs)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats}, {warmup}")
    for i in range(warmup):
        jax.block_until_ready(call(i))
    times, outputs = [], []
    for i in range(warmup, warmup + repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(call(i))
        times.append(time.perf_counter() - t0)
        outputs.append(out)
    return Timing(times_s=times), outputs


def tree_signature(tree) -> str:
    """The shapes and dtypes of a pytree's leaves, as a string (a compile-cache key part)."""
    return str(jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree))
