"""Time the reference train step of whatever sigma_jax is importable (for A/B runs across commits).

    python experiments/time_train_step.py [STEPS] [TAG]

The configuration of `launch.bench`'s reference training row (4 x 128, block 256, batch 32,
random order, float32, random tokens), through the public `sigma_jax.train` API that every commit
since the train loop landed has. Prints one JSON line: compile + first step, median and min step
seconds over STEPS timed steps, tokens/s. experiments/ab_train_step.sh interleaves two commits.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax import train
from sigma_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=65, block_size=256, n_layer=4, n_head=4, n_embd=128, bias=False,
                  pos_encoding="sinusoidal", sinusoidal_scale=0.1)
TRAIN = train.TrainConfig(task="shakespeare_char", seq_len=256, max_steps=1000, batch_size=32,
                          learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.1,
                          beta1=0.9, beta2=0.99, grad_clip=1.0, order_policy="random")


def main(steps: int, tag: str) -> None:
    state = train.init_state(CFG, TRAIN)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 65, (32, 256)), jnp.int32)
    start = time.perf_counter()
    state, metrics = train.train_step(CFG, TRAIN, state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train.train_step(CFG, TRAIN, state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    print(json.dumps(dict(tag=tag, first_step_s=round(first, 2), median_s=round(median, 4),
                          min_s=round(min(times), 4), tokens_per_s=round(32 * 256 / median),
                          loss=float(metrics["loss"]))), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, sys.argv[2] if len(sys.argv) > 2 else "")
