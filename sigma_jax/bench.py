"""Benchmarks: a timing harness and three suites (sampling, training, decode roofline).

Harness:
- `compile_aot` lowers and compiles a jitted function ahead of time on fully prepared arguments and
  reports the lowering and compile times on their own (`compile_s` never mixes with run time), plus
  `compiled.cost_analysis()` flops / bytes and `memory_analysis()` temporaries where available.
- `time_calls` warms up (>= 2 calls, each ended by `jax.block_until_ready`), then times N calls,
  each ended by `jax.block_until_ready`; `Timing` gives the median and the spread (min, max, IQR).
- Counters (forward passes, iterations, tokens per iteration) always come from the `SampleStats`
  the sampler returns, never from timing.

What is timed for the samplers: the jitted kernels of `sample_ar_call` / `sample_burst_call` (the
public prepared calls that `sample_ar` / `sample_burst` run), compiled AOT. Preparing a call
validates the inputs (which reads arrays back to the host) and splits keys; that is per-call
overhead of a Python convenience layer, not of the sampler, and would distort the ms-per-sequence
of small configurations, so it is done before timing. `kernel_matches_public` is there for the
tests: the compiled kernel on the prepared arguments returns what the public function returns.

Nothing here imports grain (the GPU image has none); presets, checkpoints and the library train step
are imported lazily and have local fallbacks.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.samplers import BURST_MODES, SAMPLERS, SamplerSpec

# ---------------------------------------------------------------- device facts

# Datasheet figures by device-kind substring: (dense bf16 FLOP/s, memory bandwidth B/s).
# H100: the SXM figures (the PCIe / NVL parts are lower: the device kind is recorded with each run).
DATASHEET = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.039e12),
}

WEIGHTS_NOTES = {
    "init": "random init of the preset: weak, nearly context-free conditionals, so burst "
            "acceptance is unrepresentative of a trained model",
    "peaked": "random init with matrices scaled x6: peaked, context-dependent conditionals (a "
              "low-acceptance stress case for burst)",
    "product": "context-free product law (final LayerNorm scale 0): q == p, so burst accepts "
               "every candidate (best case)",
    "checkpoint": "trained checkpoint weights",
}



def device_kind() -> str:
    return jax.devices()[0].device_kind


def datasheet(kind: str | None = None) -> tuple[float | None, float | None]:
    """(peak dense bf16 FLOP/s, memory bandwidth B/s) of the device kind; (None, None) unknown."""
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


# ---------------------------------------------------------------- harness


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
        q25, q75 = np.percentile(self.times_s, [25, 75])
        return float(q25), float(q75)

    def as_dict(self) -> dict:
        q25, q75 = self.iqr_s
        return dict(time_median_s=self.median_s, time_min_s=self.min_s, time_max_s=self.max_s,
                    time_q25_s=q25, time_q75_s=q75, repeats=len(self.times_s),
                    compile_s=self.compile_s, lower_s=self.lower_s)


def cost_numbers(compiled) -> dict:
    """XLA's flops / bytes accessed and the temporary buffer size of a compiled program (None
    where the backend does not say). cost_analysis() is a dict in jax 0.10+, a one-element list in
    older versions. XLA counts a while-loop body once, whatever its trip count."""
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

    static_kwargs are the jit's static keyword arguments: they choose the program and are not passed
    to the compiled executable (some jax versions want them again: handled on the first call).
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


def _signature(tree) -> str:
    return str(jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree))


# ---------------------------------------------------------------- models and weights


# Vocabulary sizes of the tasks (presets leave vocab_size to the task; reading the task would need
# its data files, which a benchmark machine may not have).
TASK_VOCAB = {"product": 2, "step": 2, "maze": 5, "flights": 450, "shakespeare_char": 65,
              "text_bpe": 50257}

# Used only when experiments.presets cannot be imported.
_FALLBACK_PRESETS = {
    "tiny": dict(vocab_size=2, block_size=32, n_layer=2, n_head=2, n_embd=32),
    "shakespeare_char_cpu": dict(vocab_size=65, block_size=256, n_layer=4, n_head=4, n_embd=128,
                                 bias=False, pos_encoding="sinusoidal", sinusoidal_scale=0.1),
    "shakespeare_char_ref": dict(vocab_size=65, block_size=256, n_layer=4, n_head=4, n_embd=128,
                                 bias=False, pos_encoding="sinusoidal", sinusoidal_scale=0.1),
    "gpt2_small": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                       bias=False, dtype="bfloat16", param_dtype="float32"),
}


def preset_names() -> list[str]:
    try:
        from experiments.presets import PRESETS
    except ImportError:
        return list(_FALLBACK_PRESETS)
    return list(PRESETS)


def preset_model_config(name: str, min_block: int = 0) -> ModelConfig:
    """The preset's ModelConfig for random weights: the task's vocabulary (TASK_VOCAB, or the
    preset's own vocab_size) and block_size raised to `min_block` (harmless for random weights).
    Raises ValueError (one line) for an unknown preset."""
    try:
        from experiments.presets import PRESETS
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        fields = dict(PRESETS[name].model)
        task = PRESETS[name].train.task
        if fields.get("vocab_size") is None:
            if task == "permutation":
                fields["vocab_size"] = fields["block_size"]
            else:
                fields["vocab_size"] = TASK_VOCAB.get(task, 256)
    except ImportError:
        if name not in _FALLBACK_PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: "
                             f"{', '.join(_FALLBACK_PRESETS)}") from None
        fields = dict(_FALLBACK_PRESETS[name])
    fields["block_size"] = max(fields["block_size"], min_block)
    return ModelConfig(**fields)


def cast_model(cfg: ModelConfig, params: dict, dtype: str | None) -> tuple[ModelConfig, dict]:
    """Inference copy in `dtype` (compute and storage), or unchanged for None."""
    if dtype is None:
        return cfg, params
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    return cfg, jax.tree.map(lambda x: x.astype(dtype), params)


def variant_params(kind: str, cfg: ModelConfig, params: dict, seed: int = 0) -> dict:
    """Weights of the given kind derived from `params`: 'init' / 'checkpoint' unchanged;
    'peaked' scales every matrix x6; 'product' zeroes the final LayerNorm scale so every
    conditional is one fixed distribution (ln_f bias @ wte when the model has biases, else uniform).
    """
    if kind in ("init", "checkpoint"):
        return params
    if kind == "peaked":
        return jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params)
    if kind == "product":
        params = jax.tree.map(lambda x: x, params)  # a copy of the nested dicts
        ln_f = dict(params["ln_f"])
        ln_f["scale"] = jnp.zeros_like(ln_f["scale"])
        if "bias" in ln_f:
            noise = jax.random.normal(jax.random.key(seed + 1), ln_f["bias"].shape)
            ln_f["bias"] = (3.0 * noise).astype(ln_f["bias"].dtype)
        params["ln_f"] = ln_f
        return params
    raise ValueError(f"weights must be one of init, peaked, product, checkpoint; got {kind!r}")


def count_params(params: dict) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def param_bytes(params: dict) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def matmul_params(cfg: ModelConfig, params: dict) -> int:
    """Parameters that take part in matmuls: all, less the position table and, when the head is
    untied, the input token embedding (a lookup). A tied embedding counts once, as the head."""
    n = count_params(params)
    if "wpe" in params.get("pos", {}):
        n -= params["pos"]["wpe"].size
    if not cfg.tie_embeddings:
        n -= params["wte"]["embedding"].size
    return n


FLOPS_FORMULA = ("6*N_matmul + 12*L*d*T per token (nanoGPT; attention term not halved for "
                 "causality; N_matmul = params less the position table and an untied input "
                 "embedding; T = tokens per sequence)")


def model_flops_per_token(cfg: ModelConfig, params: dict, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (FLOPS_FORMULA)."""
    return 6.0 * matmul_params(cfg, params) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def kv_bytes(cfg: ModelConfig, batch: int, slots: int) -> int:
    """Bytes of K and V for `slots` cache slots of `batch` rows."""
    return 2 * cfg.n_layer * batch * slots * cfg.n_embd * cfg.compute_dtype.itemsize


# ---------------------------------------------------------------- samplers


def unconditional_inputs(cfg: ModelConfig, batch: int, length: int):
    """tokens int32 [B, N] and known bool [B, N]: nothing known (with a start token), else the
    first token known (token 0)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    known = jnp.zeros((batch, length), bool)
    if not cfg.bos:
        known = known.at[:, 0].set(True)
    return tokens, known


def kernel_matches_public(cfg, params, spec: SamplerSpec, key, tokens, known) -> bool:
    """True when the AOT-compiled kernel on prepared arguments returns the public function's
    tokens and stats."""
    call = spec.prepare(cfg, params, key, tokens, known)
    ours = compile_aot(call.kernel, call.args, call.static)(*call.args)
    theirs = spec.sample(cfg, params, key, tokens, known)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        ours, theirs)
    return all(jax.tree.leaves(same))


def sampler_peak_bytes(cfg: ModelConfig, spec: SamplerSpec, length: int, batch: int) -> int:
    """A rough upper estimate of the device memory a sampler configuration needs: float32 logits
    and their sampling copies, attention scores over the cache plus the new block, the cache and
    the parameters. Used to skip configurations that cannot fit, before compiling them."""
    w = (spec.window or length) if spec.is_burst else 1
    k = spec.n_orders if spec.name == "burst_paper" else 1
    q = batch * k * w  # query slots of the largest pass
    slots = length + int(cfg.bos) + w
    if spec.name == "ar_nocache":
        q, w, k, slots = batch * (length + 1), length + 1, 1, 0
    logits = 6 * q * cfg.vocab_size * 4
    if spec.name == "burst_jacobi":  # every position's draft distribution, in the loop state
        logits += 2 * batch * length * cfg.vocab_size * 4
    attention = 4 * batch * cfg.n_head * (k * w) * (slots + k * w) * 4
    hidden = 8 * q * max(cfg.hidden_dim, 3 * cfg.n_embd) * 4
    weights = cfg.n_layer * 12 * cfg.n_embd ** 2 * 4 + cfg.vocab_size * cfg.n_embd * 4
    return logits + attention + hidden + kv_bytes(cfg, batch, slots) * 2 + weights


def measure_sampler(cfg: ModelConfig, params: dict, spec: SamplerSpec, length: int, batch: int,
                    *, repeats: int = 3, warmup: int = 2, seed: int = 0, weights: str = "init",
                    kernels: dict | None = None) -> dict:
    """Time one sampler configuration on unconditional generation of `batch` sequences of
    `length` tokens; each call (warm-up and timed) uses a different key. Returns a result row.

    kernels: a cache {key: Kernel} shared across calls, so the same program (e.g. the same shapes
    with other weights) is compiled once; the row reports that program's compile time.
    """
    if length > cfg.block_size:
        raise ValueError(f"length {length} exceeds the model's block_size {cfg.block_size}")
    tokens, known = unconditional_inputs(cfg, batch, length)
    calls = [spec.prepare(cfg, params, jax.random.key(seed * 1000 + i), tokens, known)
             for i in range(warmup + repeats)]
    arg_sets = [call.args for call in calls]
    cache_key = (spec, cfg, length, batch, _signature(params))
    kernels = {} if kernels is None else kernels
    if cache_key not in kernels:
        kernels[cache_key] = compile_aot(calls[0].kernel, arg_sets[0], calls[0].static)
    kernel = kernels[cache_key]
    timing, outputs = time_calls(lambda i: kernel(*arg_sets[i]), repeats, warmup)
    stats = [jax.device_get(out[1]) for out in outputs]  # after timing: no effect on it

    passes = np.array([s.forward_passes for s in stats], np.float64)
    iterations = np.stack([s.iterations for s in stats]).astype(np.float64)  # [R, B]
    generated = np.stack([s.generated for s in stats]).astype(np.float64)  # [R, B]
    finished = np.stack([s.finished for s in stats])
    median = timing.median_s
    tokens_per_call = float(generated.sum(axis=1).mean())
    mean_passes = float(passes.mean())
    row = dict(
        suite="sampling", sampler=spec.name, label=spec.label, weights=weights,
        mode=BURST_MODES.get(spec.name), order=spec.order,
        window=spec.window, window_eff=(spec.window or length) if spec.is_burst else 1,
        n_orders=spec.n_orders if spec.name == "burst_paper" else 1,
        length=length, batch=batch, n_known=int(np.asarray(known).sum(axis=1).min()),
        forward_passes=mean_passes, forward_passes_max=int(passes.max()),
        forward_passes_per_token=mean_passes / max(length, 1),
        iterations=float(iterations.mean()), iterations_max=int(iterations.max()),
        tokens_per_iteration=float(generated.sum() / max(iterations.sum(), 1)),
        generated_per_seq=float(generated.mean()), finished_frac=float(finished.mean()),
        tokens_per_s=tokens_per_call / median, ms_per_seq=1e3 * median / batch,
        ms_per_call=1e3 * median / max(mean_passes, 1),
        **timing.as_dict(),
    )
    row["compile_s"], row["lower_s"] = kernel.compile_s, kernel.lower_s
    row.update(kernel.costs)
    if spec.name != "ar_nocache":
        # Every cached model call reads the weights and the whole cache buffer (masked slots too).
        capacity = length + int(cfg.bos) + (row["window_eff"] if spec.is_burst else 1)
        per_call = param_bytes(params) + kv_bytes(cfg, batch, capacity)
        row["bytes_per_call_est"] = per_call
        row["hbm_gbps_est"] = per_call * mean_passes / median / 1e9
    return row


# ---------------------------------------------------------------- training


def _local_train_step(model_cfg, train_cfg, state, batch):
    """Fallback when sigma_jax.train is missing: left-to-right cross-entropy and AdamW."""
    import optax

    from sigma_jax import orders as orders_lib
    from sigma_jax.model import forward

    params, opt_state = state

    def loss_fn(p):
        order = orders_lib.left_to_right(*batch.shape)
        inputs, pos_in, pos_out, targets = orders_lib.make_batch(
            batch, order, bos=model_cfg.bos, bos_id=model_cfg.bos_id)
        logits = forward(model_cfg, p, inputs, pos_in, pos_out)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optax.adamw(train_cfg["learning_rate"]).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}


def _library_train_step(model_cfg, train_cfg, state, batch):
    from sigma_jax import train

    return train.train_step(model_cfg, train_cfg, state, batch)


# Created once (jit caches on the function object); the state is donated, as in training.
_LIBRARY_STEP = jax.jit(_library_train_step, donate_argnums=2)
_LOCAL_STEP = jax.jit(_local_train_step, donate_argnums=2)


def _train_setup(cfg: ModelConfig, batch: int, seq_len: int, preset: str | None,
                 use_library: bool):
    """(jitted step, model cfg, train cfg, fresh state, source name)."""
    if use_library:
        try:
            from sigma_jax import train
        except ImportError:
            use_library = False
    if use_library:
        train_cfg = None
        if preset:
            try:
                from experiments.presets import PRESETS
                train_cfg = PRESETS[preset].train if preset in PRESETS else None
            except ImportError:
                pass
        train_cfg = train_cfg or train.TrainConfig()
        train_cfg = train_cfg.replace(batch_size=batch, grad_accum=1, seq_len=seq_len,
                                      max_steps=max(train_cfg.max_steps, 10),
                                      warmup_steps=min(train_cfg.warmup_steps, 1))
        state = train.init_state(cfg, train_cfg)
        return _LIBRARY_STEP, cfg, train_cfg, state, "sigma_jax.train.train_step"
    import optax

    from sigma_jax.model import init_params

    params = init_params(cfg, jax.random.key(0))
    state = (params, optax.adamw(1e-3).init(params))
    return _LOCAL_STEP, cfg, {"learning_rate": 1e-3}, state, "local loss+adamw step"


def measure_training(cfg: ModelConfig, batch: int, seq_len: int, *, repeats: int = 5,
                     warmup: int = 2, preset: str | None = None,
                     matmul_flops_s: float | None = None, peak_flops_s: float | None = None,
                     use_library: bool = True) -> dict:
    """Step time, tokens/s and MFU of one optimizer update on random tokens [batch, seq_len]
    (data loading excluded; the same batch every step; the state is donated and re-bound)."""
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {cfg.block_size}")
    step, model_cfg, train_cfg, state, source = _train_setup(cfg, batch, seq_len, preset,
                                                             use_library)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
    kernel = compile_aot(step, (model_cfg, train_cfg, state, tokens))
    holder = {"state": state}

    def call(_):
        holder["state"], metrics = kernel(model_cfg, train_cfg, holder["state"], tokens)
        return holder["state"], metrics

    timing, _ = time_calls(call, repeats, warmup)
    params = holder["state"].params if hasattr(holder["state"], "params") else holder["state"][0]
    step_s = timing.median_s
    tokens_per_s = batch * seq_len / step_s
    flops_token = model_flops_per_token(cfg, params, seq_len)
    achieved = flops_token * tokens_per_s
    row = dict(
        suite="training", step_source=source, batch=batch, length=seq_len,
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


# ---------------------------------------------------------------- device baselines and roofline


@jax.jit
def _matmul(a, b):
    return a @ b


@jax.jit
def _scale_copy(x):
    return x * 2  # reads and writes every element once; cannot be simplified away


def measure_matmul(n: int, dtype, repeats: int = 5) -> dict:
    """Dense [n, n] @ [n, n] in `dtype` on the default device: FLOP/s = 2 n^3 / median time."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    kernel = compile_aot(_matmul, (a, b))
    timing, _ = time_calls(lambda _: kernel(a, b), repeats)
    timing.compile_s, timing.lower_s = kernel.compile_s, kernel.lower_s
    return dict(suite="roofline", kind="matmul", n=n, dtype=jnp.dtype(dtype).name,
                flops_s=2.0 * n ** 3 / timing.median_s, **timing.as_dict())


def measure_copy_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """Memory bandwidth of an elementwise pass over a float32 array of `nbytes` (read + write)."""
    x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
    kernel = compile_aot(_scale_copy, (x,))
    timing, _ = time_calls(lambda _: kernel(x), repeats)
    timing.compile_s, timing.lower_s = kernel.compile_s, kernel.lower_s
    moved = 2 * x.size * 4
    return dict(suite="roofline", kind="copy", bytes=int(x.size * 4), bytes_moved=moved,
                bytes_s=moved / timing.median_s, **timing.as_dict())


def _decode_step(cfg, params, cache, tok, pos_in, pos_out):
    from sigma_jax.decode import extend_pass

    logits, k_new, v_new = extend_pass(cfg, params, cache, tok, pos_in, pos_out)
    return logits, k_new, v_new


_DECODE_STEP = jax.jit(_decode_step)


def measure_decode(cfg: ModelConfig, params: dict, batch: int, context: int, *,
                   repeats: int = 10, copy_bytes_s: float | None = None,
                   datasheet_bytes_s: float | None = None) -> dict:
    """One cached AR model call (one new token per row over a cache of `context` valid slots):
    time per call, bytes read (params + the K/V cache buffer) and their ratio to the measured copy
    bandwidth and the datasheet bandwidth."""
    from sigma_jax.cache import init_cache

    capacity = context + 1
    cache = init_cache(cfg, batch, capacity)
    cache = dataclasses.replace(cache, length=jnp.full((batch,), context, jnp.int32))
    tok = jnp.zeros((batch, 1), jnp.int32)
    pos_in = jnp.full((batch, 1), max(context - 1, 0), jnp.int32)
    pos_out = jnp.full((batch, 1), min(context, cfg.block_size - 1), jnp.int32)
    args = (cfg, params, cache, tok, pos_in, pos_out)
    kernel = compile_aot(_DECODE_STEP, args)
    timing, _ = time_calls(lambda _: kernel(*args), repeats)
    t = timing.median_s
    nbytes = param_bytes(params) + kv_bytes(cfg, batch, capacity)
    row = dict(suite="roofline", kind="decode", batch=batch, length=context,
               dtype=cfg.dtype, param_dtype=cfg.param_dtype, bytes_per_call=nbytes,
               ms_per_call=1e3 * t, tokens_per_s=batch / t, bytes_s=nbytes / t,
               copy_bytes_s=copy_bytes_s, datasheet_bytes_s=datasheet_bytes_s,
               bw_frac_copy=nbytes / t / copy_bytes_s if copy_bytes_s else None,
               bw_frac_datasheet=nbytes / t / datasheet_bytes_s if datasheet_bytes_s else None,
               roofline_tokens_per_s=batch * copy_bytes_s / nbytes if copy_bytes_s else None,
               **timing.as_dict())
    row["compile_s"], row["lower_s"] = kernel.compile_s, kernel.lower_s
    row.update(kernel.costs)
    return row


# ---------------------------------------------------------------- output


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultWriter:
    """One JSON line per measurement in <out>/<suite>.jsonl (files truncated on first write),
    flushed as it goes so a run cut short keeps what it measured."""

    def __init__(self, out_dir: str | os.PathLike | None):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.rows: dict[str, list[dict]] = {}
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        row = _clean(row)
        suite = row["suite"]
        first = suite not in self.rows
        self.rows.setdefault(suite, []).append(row)
        if self.out_dir is not None:
            with open(self.out_dir / f"{suite}.jsonl", "w" if first else "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def environment(argv: Sequence[str] | None = None, extra: dict | None = None) -> dict:
    """Device, library versions, command line and date of this run."""
    import flax

    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "flax": flax.__version__, "numpy": np.__version__}
    for name in ("jaxlib", "optax", "orbax.checkpoint"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", None)
        except ImportError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = jax.devices()
    env = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=shlex.join(sys.argv if argv is None else argv),
        backend=jax.default_backend(), device_kind=devices[0].device_kind,
        device_count=len(devices), host=platform.node(), cpu_count=os.cpu_count(),
        versions=versions, git_commit=commit,
        xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        weights_notes=WEIGHTS_NOTES, flops_formula=FLOPS_FORMULA,
    )
    env.update(extra or {})
    return env


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-2:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1e3 else f"{value:.0f}"
    return str(value)


SAMPLING_COLUMNS = [("weights", "weights"), ("label", "sampler"), ("order", "order"),
                    ("length", "N"),
                    ("batch", "B"), ("forward_passes", "passes"), ("iterations", "iters"),
                    ("tokens_per_iteration", "tok/iter"), ("tokens_per_s", "tok/s"),
                    ("ms_per_seq", "ms/seq"), ("compile_s", "compile_s"),
                    ("speedup_vs_ar", "x AR tok/s"), ("passes_vs_ar", "passes/AR")]
TRAINING_COLUMNS = [("config", "config"), ("batch", "B"), ("length", "T"), ("params", "params"),
                    ("dtype", "dtype"),
                    ("step_ms", "step_ms"), ("tokens_per_s", "tok/s"),
                    ("flops_per_token", "flop/tok"), ("mfu", "MFU(meas)"),
                    ("mfu_datasheet", "MFU(sheet)"), ("compile_s", "compile_s")]
ROOFLINE_COLUMNS = [("kind", "kind"), ("batch", "B"), ("length", "ctx"),
                    ("ms_per_call", "ms/call"), ("bytes_per_call", "bytes/call"),
                    ("bytes_s", "B/s"), ("bw_frac_copy", "frac copy BW"),
                    ("bw_frac_datasheet", "frac sheet BW"), ("flops_s", "flop/s"),
                    ("tokens_per_s", "tok/s"), ("roofline_tokens_per_s", "roof tok/s")]


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; skipped / failed rows show their reason in the last column."""
    header = [title for _, title in columns] + ["note"]
    body = []
    for row in rows:
        note = row.get("skipped") or row.get("error") or ""
        body.append([_fmt(row.get(key)) for key, _ in columns] + [note])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def plot_sampling(rows: Sequence[dict], out_dir, *, sweep_batch: int | None = None,
                  sweep_length: int | None = None) -> list[str]:
    """PNG plots: model calls vs length per sampler (at batch `sweep_batch`), tokens/s vs batch
    per sampler (at length `sweep_length`), and the burst window sweep. Returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:  # plots are optional (the GPU image may lack matplotlib)
        return []
    ok = [r for r in rows if r.get("suite") == "sampling" and r.get("tokens_per_s")]
    if not ok:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = ok[0]["weights"]
    sweep_batch = min(r["batch"] for r in ok) if sweep_batch is None else sweep_batch
    sweep_length = max(r["length"] for r in ok) if sweep_length is None else sweep_length
    paths = []

    def lines(ax, rows_, x, y):
        for label in dict.fromkeys(r["label"] for r in rows_):
            pts = sorted((r[x], r[y]) for r in rows_ if r["label"] == label)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)

    def log2_axis(ax, values):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(values)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    mine = [r for r in ok if r["weights"] == primary and r.get("part", "grid") == "grid"]
    panels = [
        ("calls_vs_length.png", [r for r in mine if r["batch"] == sweep_batch], "length",
         "forward_passes", f"sequential model calls (batch {sweep_batch}, {primary} weights)"),
        ("tokens_per_s_vs_batch.png", [r for r in mine if r["length"] == sweep_length], "batch",
         "tokens_per_s", f"generated tokens/s (length {sweep_length}, {primary} weights)"),
    ]
    for name, subset, x, y, title in panels:
        if not subset:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        lines(ax, subset, x, y)
        log2_axis(ax, [r[x] for r in subset])
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(str(out_dir / name))

    sweep = [r for r in ok if r["sampler"].startswith("burst") and r["length"] == sweep_length
             and r["batch"] == sweep_batch]
    groups = {}
    for r in sweep:
        groups.setdefault((r["weights"], r["sampler"], r["n_orders"]), []).append(
            (r["window_eff"], r["forward_passes"], r["tokens_per_s"]))
    groups = {k: sorted(v) for k, v in groups.items() if len({p[0] for p in v}) > 1}
    if groups:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for (weights, sampler, k), pts in groups.items():
            w, passes, tps = zip(*pts, strict=True)
            label = f"{sampler}{f' K={k}' if sampler == 'burst_paper' else ''} [{weights}]"
            axes[0].plot(w, passes, marker="o", label=label)
            axes[1].plot(w, tps, marker="o", label=label)
        for ax, y in zip(axes, ("forward passes", "generated tokens/s"), strict=True):
            log2_axis(ax, [p[0] for pts in groups.values() for p in pts])
            ax.set_yscale("log")
            ax.set_xlabel(f"window W ({sweep_length} = all)")
            ax.set_ylabel(y)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"burst window sweep (N={sweep_length}, B={sweep_batch})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "burst_window_sweep.png", dpi=110)
        plt.close(fig)
        paths.append(str(out_dir / "burst_window_sweep.png"))
    return paths


# ---------------------------------------------------------------- suites


@dataclasses.dataclass
class BenchConfig:
    """Everything a benchmark run needs (the launcher fills it from flags).

    lengths / batches: the sampling grid. grid='axes' measures every length at batches[0] and
    every batch at lengths[-1]; 'cross' measures every pair. Points at batches other than the
    first measure `batch_samplers` (None = all `samplers`). burst_window is the window of the
    main-grid burst rows (None = all remaining positions); the main paper rows use n_orders[-1].
    The sweeps run at (lengths[-1], batches[0]) for every entry of `weights` (the first entry also
    runs the main grid): exact mode over `windows`, paper mode over `n_orders` at burst_window,
    and cached AR as the reference of each weights' ratios. max_uncached_tokens skips uncached AR
    where batch * length * (length + 1) exceeds it. budget_s: configurations not started within
    this many seconds of the start are skipped (recorded as skipped); a sampler row whose
    program is already compiled (the same shapes, other weights) gets 10% more time.
    """

    suites: tuple[str, ...] = ("sampling", "training", "roofline")
    preset: str | None = "shakespeare_char_cpu"
    workdir: str | None = None
    step: int | None = None
    dtype: str | None = None
    lengths: tuple[int, ...] = (32, 64)
    batches: tuple[int, ...] = (1, 4)
    grid: str = "axes"
    windows: tuple[int | None, ...] = (8, None)
    n_orders: tuple[int, ...] = (1, 5)
    burst_window: int | None = None
    weights: tuple[str, ...] = ("init", "product", "peaked")
    samplers: tuple[str, ...] = ("ar", "ar_nocache", "burst", "burst_paper")
    batch_samplers: tuple[str, ...] | None = ("ar", "burst")
    orders: tuple[str, ...] = ("random",)
    repeats: int = 3
    warmup: int = 2
    seed: int = 0
    max_uncached_tokens: int = 10_000
    train_batch: int = 4
    train_length: int | None = None
    train_reference: bool = True
    matmul_n: int = 1024
    copy_bytes: int = 128 << 20
    roofline_batches: tuple[int, ...] | None = None
    budget_s: float | None = None
    out: str | None = None

    def __post_init__(self):
        allowed = ("sampling", "training", "roofline")
        if not self.suites or any(s not in allowed for s in self.suites):
            raise ValueError(f"suites must be a non-empty subset of {', '.join(allowed)}; "
                             f"got {','.join(self.suites)}")
        for name in ("lengths", "batches", "n_orders"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                                 for v in values):
                raise ValueError(f"{name} must be a non-empty list of positive integers; "
                                 f"got {values!r}")
        if not self.windows or any(w is not None and (not isinstance(w, int) or w < 1)
                                   for w in self.windows):
            raise ValueError(f"windows must be positive integers or 'none'; got {self.windows!r}")
        if self.burst_window is not None and self.burst_window < 1:
            raise ValueError(f"burst_window must be a positive integer or none; "
                             f"got {self.burst_window!r}")
        if self.grid not in ("axes", "cross"):
            raise ValueError(f"grid must be 'axes' or 'cross'; got {self.grid!r}")
        for w in self.weights:
            if w not in WEIGHTS_NOTES:
                raise ValueError(f"weights must be among {', '.join(WEIGHTS_NOTES)}; got {w!r}")
        if "checkpoint" in self.weights and not self.workdir:
            raise ValueError("weights 'checkpoint' needs --workdir")
        if "init" in self.weights and self.workdir:
            raise ValueError("weights 'init' (random weights) cannot be combined with --workdir")
        for s in (*self.samplers, *(self.batch_samplers or ())):
            if s not in SAMPLERS:
                raise ValueError(f"samplers must be among {', '.join(SAMPLERS)}; got {s!r}")
        for order in self.orders or (None,):
            SamplerSpec("burst", order=order)  # a one-line ValueError for an unknown order
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        for name in ("repeats", "train_batch", "matmul_n", "copy_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.max_uncached_tokens < 0:
            raise ValueError(f"max_uncached_tokens must be >= 0; got {self.max_uncached_tokens!r}")
        if self.train_length is not None and self.train_length < 1:
            raise ValueError(f"train_length must be a positive integer; got {self.train_length!r}")
        if self.warmup < 2:
            raise ValueError(f"warmup must be >= 2; got {self.warmup!r}")
        if not self.preset and not self.workdir:
            raise ValueError("give a preset (random weights) or a workdir (trained checkpoint)")

    def points(self) -> list[tuple[int, int]]:
        """(length, batch) pairs of the main sampling grid, in measuring order."""
        if self.grid == "cross":
            return [(n, b) for b in self.batches for n in self.lengths]
        pts = [(n, self.batches[0]) for n in self.lengths]
        pts += [(self.lengths[-1], b) for b in self.batches[1:]]
        return pts


def load_model(config: BenchConfig) -> tuple[ModelConfig, dict, str, dict]:
    """(cfg, params, primary weights kind, source info): the checkpoint of `workdir` or random
    weights of `preset` (block_size raised to the longest length), cast to `dtype` if given."""
    need = max(config.lengths)
    if config.workdir:
        from sigma_jax.checkpoint import load

        cfg, params, step = load(config.workdir, config.step)
        info = dict(source="checkpoint", workdir=str(config.workdir), step=int(step))
        kind = "checkpoint"
    else:
        cfg = preset_model_config(config.preset, need)
        from sigma_jax.model import init_params

        params = init_params(cfg, jax.random.key(config.seed))
        info = dict(source="preset", preset=config.preset, seed=config.seed)
        kind = "init"
    cfg, params = cast_model(cfg, params, config.dtype)
    info.update(model=dataclasses.asdict(cfg), params=count_params(params),
                param_bytes=param_bytes(params))
    return cfg, params, kind, info


class _Clock:
    def __init__(self, budget_s):
        self.start, self.budget_s = time.monotonic(), budget_s

    def over(self, grace: float = 0.0) -> bool:
        """Past the budget (plus `grace` x budget)."""
        if self.budget_s is None:
            return False
        return time.monotonic() - self.start > self.budget_s * (1.0 + grace)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def run_sampling_suite(config: BenchConfig, cfg, params, primary: str, writer: ResultWriter,
                       clock: _Clock, log=print) -> list[dict]:
    """The main grid (every sampler at every point, primary weights) and the burst sweeps."""
    kernels: dict = {}
    memory = device_memory_bytes()
    done: set = set()
    ar_rows: dict = {}
    rows = []
    paper_k = config.n_orders[-1]
    # Every exact burst sampler along every order; AR along random orders (its cost does not
    # depend on the order); the published rule draws its own random orders.
    main = [SamplerSpec(s, order=o, window=config.burst_window if s in BURST_MODES else None,
                        n_orders=paper_k if s == "burst_paper" else 1)
            for s in config.samplers for o in config.orders
            if o == "random" or s in ("burst", "burst_jacobi")]
    at_batch = set(config.samplers if config.batch_samplers is None else config.batch_samplers)
    jobs = [(primary, spec, n, b, "grid") for n, b in config.points() for spec in main
            if b == config.batches[0] or spec.name in at_batch]
    sweep_n, sweep_b = config.lengths[-1], config.batches[0]
    for weights in dict.fromkeys((primary, *[w for w in config.weights if w != "checkpoint"])):
        jobs.append((weights, SamplerSpec("ar"), sweep_n, sweep_b, "sweep"))
        if "burst" in config.samplers:
            for window in config.windows:
                jobs.append((weights, SamplerSpec("burst", window=window), sweep_n,
                             sweep_b, "sweep"))
        if "burst_paper" in config.samplers:
            for k in config.n_orders:
                jobs.append((weights, SamplerSpec("burst_paper", window=config.burst_window,
                                                  n_orders=k), sweep_n, sweep_b, "sweep"))
    # A window of N drafts everything: the same program as window None.
    jobs = [(w, dataclasses.replace(spec, window=None) if spec.window and spec.window >= n
             else spec, n, b, part) for w, spec, n, b, part in jobs]
    # Measuring order, so that a time budget cuts what costs most and tells least: the length
    # sweep; the sweep rows that reuse its programs (other weights: no compile); the sweep rows
    # that need new programs, grouped by program; then the other batch sizes.
    first = [j for j in jobs if j[4] == "grid" and j[3] == sweep_b]
    rest = [j for j in jobs if j[4] == "grid" and j[3] != sweep_b]
    compiled = {j[1:4] for j in first}
    reuse = [j for j in jobs if j[4] == "sweep" and j[1:4] in compiled]
    new = [j for j in jobs if j[4] == "sweep" and j[1:4] not in compiled]
    programs = list(dict.fromkeys(j[1:4] for j in new))
    new.sort(key=lambda j: programs.index(j[1:4]))
    variants, ready = {}, set()
    for weights, spec, n, b, part in first + reuse + new + rest:
        if (weights, spec, n, b) in done:
            continue
        done.add((weights, spec, n, b))
        base = dict(suite="sampling", part=part, sampler=spec.name, label=spec.label,
                    order=spec.order, weights=weights, window=spec.window,
                    n_orders=spec.n_orders, length=n, batch=b)
        skip = None
        if n > cfg.block_size:
            skip = f"length > block_size {cfg.block_size}"
        elif spec.name == "ar_nocache" and b * n * (n + 1) > config.max_uncached_tokens:
            skip = f"uncached cost B*N*(N+1) > {config.max_uncached_tokens}"
        elif sampler_peak_bytes(cfg, spec, n, b) > 0.7 * memory:
            skip = f"estimated memory > 70% of {memory / 2**30:.0f} GiB"
        elif clock.over(grace=0.1 if (spec, n, b) in ready else 0.0):
            skip = "time budget"  # a compiled program (other weights) gets 10% grace
        if skip:
            rows.append(writer.add({**base, "skipped": skip}))
            continue
        ready.add((spec, n, b))
        if weights not in variants:
            variants[weights] = variant_params(weights, cfg, params, config.seed)
        try:
            row = measure_sampler(cfg, variants[weights], spec, n, b, repeats=config.repeats,
                                  warmup=config.warmup, seed=config.seed, weights=weights,
                                  kernels=kernels)
        except Exception as error:  # e.g. out of device memory: record it and go on
            rows.append(writer.add({**base, "error": _first_line(error)}))
            log(f"  {spec.label} N={n} B={b} [{weights}] failed: {_first_line(error)}")
            continue
        row.update(part=part, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   params=count_params(params), device_kind=device_kind())
        if spec.name == "ar":
            ar_rows[(weights, n, b)] = row
        ar = ar_rows.get((weights, n, b))
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar["tokens_per_s"] if ar else None
        row["passes_vs_ar"] = row["forward_passes"] / ar["forward_passes"] if ar else None
        rows.append(writer.add(row))
        log(f"  {spec.label:28s} N={n:<5d} B={b:<4d} [{weights}] {row['tokens_per_s']:.4g} tok/s,"
            f" {row['forward_passes']:.4g} passes, compile {row['compile_s']:.2f}s")
    return rows


# The fixed training-throughput configuration: the shipped reference model's step (4 x 128,
# block 256, batch 32, random order, float32), comparable across machines and commits.
TRAIN_REFERENCE = dict(preset="shakespeare_char_ref", batch=32, length=256)


def run_training_suite(config: BenchConfig, cfg, writer: ResultWriter, baselines: dict,
                       clock: _Clock, log=print) -> list[dict]:
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
            log(f"  training ({label}) failed: {_first_line(error)}")
            rows.append(writer.add({**base, "error": _first_line(error)}))
            continue
        row.update(config=label, device_kind=device_kind())
        log(f"  train step [{label}] B={batch} T={length}: {row['step_ms']:.4g} ms, "
            f"{row['tokens_per_s']:.4g} tok/s, {row['model_flops_s'] / 1e9:.3g} GFLOP/s "
            f"(matmul {_fmt((row['matmul_flops_s'] or 0) / 1e9)} GFLOP/s, "
            f"MFU {_fmt(row['mfu'])}), compile {row['compile_s']:.2f}s")
        rows.append(writer.add(row))
    return rows


def measure_baselines(config: BenchConfig, writer: ResultWriter, log=print) -> dict:
    """Dense matmul FLOP/s (bf16 on accelerators, f32 on CPU) and copy bandwidth, same run."""
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
                       clock: _Clock, log=print) -> list[dict]:
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
            rows.append(writer.add({**base, "error": _first_line(error)}))
            continue
        row["device_kind"] = device_kind()
        rows.append(writer.add(row))
        log(f"  decode B={b} ctx={context}: {row['ms_per_call']:.4g} ms/call, "
            f"{row['bytes_s'] / 1e9:.4g} GB/s ({_fmt(row['bw_frac_copy'])} of copy)")
    return rows


def run(config: BenchConfig, *, argv: Sequence[str] | None = None, model=None,
        log=print) -> dict:
    """Run the chosen suites; write <out>/{sampling,training,roofline}.jsonl, env.json and plots
    when `config.out` is set. model: `load_model(config)` if already loaded. Returns
    {"rows": {suite: rows}, "env": env, "plots": paths}."""
    clock = _Clock(config.budget_s)
    plain_log = log
    log = lambda message: plain_log(f"[{time.monotonic() - clock.start:6.1f}s] {message}")
    writer = ResultWriter(config.out)
    cfg, params, primary, info = model if model is not None else load_model(config)
    log(f"device {device_kind()} ({jax.default_backend()}); model {info.get('preset') or 'ckpt'}"
        f" {cfg.n_layer}x{cfg.n_embd} V={cfg.vocab_size} block={cfg.block_size} "
        f"{cfg.dtype}/{cfg.param_dtype}, {info['params']:,} params")
    env = environment(argv, dict(model_info=info, config=dataclasses.asdict(config)))
    if config.out:
        Path(config.out, "env.json").write_text(json.dumps(_clean(env), indent=1) + "\n")
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
        Path(config.out, "env.json").write_text(json.dumps(_clean(env), indent=1) + "\n")
    return {"rows": writer.rows, "env": env, "plots": plots}


def print_tables(rows: dict, log=print) -> None:
    for suite, columns in (("sampling", SAMPLING_COLUMNS), ("training", TRAINING_COLUMNS),
                           ("roofline", ROOFLINE_COLUMNS)):
        if rows.get(suite):
            table = rows[suite]
            if suite == "sampling":  # the grid, then the sweeps weights by weights
                kinds = list(dict.fromkeys(r["weights"] for r in table))
                table = sorted(table, key=lambda r: (r.get("part") == "sweep",
                                                     kinds.index(r["weights"])))
            log(f"\n== {suite} ==")
            log(format_table(table, columns))
    if rows.get("sampling"):
        log("\npasses: sequential model calls per batch call (every row takes part in each);"
            " iters: mean per row; tok/iter: tokens committed per iteration; x AR: ratio to"
            " cached AR at the same N, B and weights.")
        for kind in dict.fromkeys(r["weights"] for r in rows["sampling"]):
            log(f"weights {kind}: {WEIGHTS_NOTES[kind]}")
