"""Compile and run time of the test suite's two typical programs under XLA flag sets, measured
interleaved (A B A B) in fresh processes, each with its own empty compilation cache.

    python experiments/time_test_compile.py [ROUNDS]

The programs: the exact burst sampler kernel of the sampler tests' SMALL model (6 rows of 10
tokens, window 3) and the train step of a 2 x 64 model on 32 x 32 tokens. For each flag set it
prints one JSON line per round (compile seconds from lowering to executable, and the median run
of 5 calls after the first) and then the median over rounds. tests/cli_helpers.py sets the
flags that the test processes use.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

FLAG_SETS = {
    "default": "",
    "opt0": "--xla_backend_optimization_level=0",
    "opt0_nofusion": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from sampler_helpers import SMALL, peaked_params, ragged_known
from sigma_jax import ModelConfig, sample_burst_call, train
from sigma_jax.config import TrainConfig

def timed(compiled, args):
    jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return float(np.median(runs))

params = peaked_params(SMALL, 3)
call = sample_burst_call(SMALL, params, jax.random.key(2), jnp.zeros((6, 10), jnp.int32),
                         ragged_known(4, 6, 10), window=3)
start = time.perf_counter()
kernel = call.kernel.lower(*call.args, **call.static).compile()
out = {"sampler_compile_s": time.perf_counter() - start,
       "sampler_run_s": timed(kernel, call.args)}

cfg = ModelConfig(vocab_size=16, block_size=32, n_layer=2, n_head=4, n_embd=64)
tc = TrainConfig(seq_len=32, max_steps=100, batch_size=32, order_policy="random")
state = train.init_state(cfg, tc)
batch = jnp.zeros((32, 32), jnp.int32)
step = train.make_train_step(cfg, tc)
start = time.perf_counter()
compiled = step.lower(state, batch).compile()
out["train_compile_s"] = time.perf_counter() - start
times = []
for _ in range(6):
    begin = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - begin)
out["train_step_s"] = float(np.median(times[1:]))
print(json.dumps(out))
"""


def run(flags: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
               JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp())
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(rounds: int) -> None:
    results = {name: [] for name in FLAG_SETS}
    for r in range(rounds):
        for name, flags in FLAG_SETS.items():
            row = run(flags)
            results[name].append(row)
            print(json.dumps({"round": r, "flags": name, **{k: round(v, 4)
                                                            for k, v in row.items()}}))
    for name, rows in results.items():
        medians = {k: round(statistics.median(row[k] for row in rows), 4) for k in rows[0]}
        print(json.dumps({"median_over_rounds": name, "xla_flags": FLAG_SETS[name], **medians}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
