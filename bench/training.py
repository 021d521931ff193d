"""Training measurement: step time, tokens/s and MFU of the library's compiled train step.

The step is `sigma_jax.train.make_train_step` (the one the training loop runs: the state donated),
compiled ahead of time on a fresh `train.init_state` and a batch of random tokens; data loading is
not part of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.harness import compile_aot, time_calls
from bench.models import FLOPS_FORMULA, matmul_params, model_flops_per_token
from sigma_jax import train
from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.model import count_params
from sigma_jax.presets import PRESETS

STEP_SOURCE = "sigma_jax.train.make_train_step"


def bench_train_config(batch: int, seq_len: int, preset: str | None = None) -> TrainConfig:
    """The preset's TrainConfig (default TrainConfig() without one) for one update of `batch`
    sequences of `seq_len` tokens: no gradient accumulation, at least 10 scheduled steps and at
    most 1 warm-up step, so the measured steps run at a non-zero learning rate."""
    train_cfg = PRESETS[preset].train if preset in PRESETS else TrainConfig()
    return train_cfg.replace(batch_size=batch, grad_accum=1, seq_len=seq_len,
                             max_steps=max(train_cfg.max_steps, 10),
                             warmup_steps=min(train_cfg.warmup_steps, 1))


def measure_training(cfg: ModelConfig, batch: int, seq_len: int, *, repeats: int = 5,
                     warmup: int = 2, preset: str | None = None,
                     matmul_flops_s: float | None = None, peak_flops_s: float | None = None
                     ) -> dict:
    """Step time, tokens/s and MFU of one optimizer update on random tokens [batch, seq_len]
    (data loading excluded; the same batch every step; the state is donated and re-bound).

    preset: whose TrainConfig to use (`bench_train_config`). matmul_flops_s / peak_flops_s: the
    measured dense-matmul and the datasheet FLOP/s, the denominators of `mfu` / `mfu_datasheet`
    (None leaves them None). Returns a result row.
    """
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {cfg.block_size}")
    train_cfg = bench_train_config(batch, seq_len, preset)
    state = train.init_state(cfg, train_cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
    kernel = compile_aot(train.make_train_step(cfg, train_cfg), (state, tokens))
    holder = {"state": state}

    def call(_):
        holder["state"], metrics = kernel(holder["state"], tokens)
        return holder["state"], metrics

    timing, _ = time_calls(call, repeats, warmup)
    params = holder["state"].params
    step_s = timing.median_s
    tokens_per_s = batch * seq_len / step_s
    flops_token = model_flops_per_token(cfg, params, seq_len)
    achieved = flops_token * tokens_per_s
    row = dict(
        suite="training", step_source=STEP_SOURCE, batch=batch, length=seq_len,
        params=count_params(params), params_matmul=matmul_params(cfg, params),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        step_ms=1e3 * step_s, tokens_per_s=tokens_per_s,
        flops_per_token=flops_token, flops_formula=FLOPS_FORMULA, model_flops_s=achieved,
        matmul_flops_s=matmul_flops_s, peak_flops_s=peak_flops_s,
        mfu=achieved / matmul_flops_s if matmul_flops_s else None,
        mfu_datasheet=achieved / peak_flops_s if peak_flops_s else None,
        **timing.as_dict(),
    )
    row["compile_s"], row["lower_s"] = kernel.compile_s, kernel.lower_s
    row.update(kernel.costs)
    # XLA counts a loop body once: with the layers scanned this is about one layer's worth, a
    # cross-check of the per-layer cost only, never the model FLOPs.
    row["xla_flops_per_token"] = (row["xla_flops"] / (batch * seq_len)
                                  if row["xla_flops"] else None)
    return row
