"""Where the reference train step's time goes (CPU): temporaries, page faults, per-op times.

    python experiments/profile_train_step.py [TOP]

The step of experiments/time_train_step.py, compiled once. Prints the size of XLA's temporary
arena (allocated afresh at every call on CPU), the minor page faults and the user / system CPU
seconds per step, then the op times of 3 profiled steps (jax.profiler, summed over threads, so
the total exceeds the wall time) grouped by shape family, and the TOP slowest ops.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.time_train_step import CFG, TRAIN
from sigma_jax import train

STEPS = 3


def _timed(step, state, batch):
    """(state, minor faults, user s, system s, wall s) per step over STEPS steps."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    per = lambda a, b: (b - a) / STEPS
    return (state, per(r0.ru_minflt, r1.ru_minflt), per(r0.ru_utime, r1.ru_utime),
            per(r0.ru_stime, r1.ru_stime), per(t0, t1))


def _op_times(step, state, batch) -> collections.Counter:
    """Microseconds per op name over STEPS profiled steps."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(STEPS):
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
        path = glob.glob(folder + "/**/*.trace.json.gz", recursive=True)[0]
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("$", "Thunk", "Slinky", "Pjit")):
            times[name] += e.get("dur", 0)
    return times


def _family(shape: str, name: str) -> str:
    kind = "matmul" if name.startswith(("ynn", "dot")) else "elementwise"
    for pattern, family in ((r"\[\d+,4,", "attention"), (r"512\]", "mlp (x512)"),
                            (r"384\]", "qkv (x384)"), (r"128\]", "width 128")):
        if re.search(pattern, shape):
            return f"{family} {kind}"
    return f"other {kind}"


def main(top: int) -> None:
    state = train.init_state(CFG, TRAIN)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 65, (32, 256)), jnp.int32)
    step = train.make_train_step(CFG, TRAIN)
    compiled = step.lower(state, batch).compile()
    print(f"temporaries: {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB")
    state, _ = step(state, batch)
    state, faults, user, system, wall = _timed(step, state, batch)
    print(f"per step: {faults:.0f} minor faults, user {user:.3f} s, system {system:.3f} s, "
          f"wall {wall:.3f} s")
    shapes = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            shapes.setdefault(m.group(1), m.group(2))
    times = _op_times(step, state, batch)
    ms = lambda us: us / STEPS / 1000
    families = collections.Counter()
    for name, us in times.items():
        families[_family(shapes.get(name, ""), name)] += ms(us)
    print(f"op time {ms(sum(times.values())):.0f} ms per step (summed over threads)")
    for family, t in families.most_common():
        print(f"  {t:7.1f} ms  {family}")
    for name, us in times.most_common(top):
        print(f"  {ms(us):7.2f} ms  {name:34s} {shapes.get(name, '')}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
