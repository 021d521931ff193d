"""What a benchmark run measures (`BenchConfig`) and the model it measures (`load_model`)."""

from __future__ import annotations

import dataclasses

import jax

from bench.models import WEIGHTS_NOTES, cast_model, param_bytes, preset_model_config
from bench.shipped import load_shipped
from sigma_jax.checkpoint import load
from sigma_jax.checks import check_int
from sigma_jax.config import MAX_SEED, ModelConfig
from sigma_jax.model import count_params, init_params
from sigma_jax.sampling import SAMPLERS, SampleOptions

SUITES = ("sampling", "training", "roofline", "memory", "shipped")


@dataclasses.dataclass
class BenchConfig:
    """Everything a benchmark run needs (the launcher fills it from flags). Validated on
    construction (ValueError, one line).

    lengths / batches: the sampling grid. grid='axes' measures every length at batches[0] and
    every batch at lengths[-1]; 'cross' measures every pair. Points at batches other than the
    first measure `batch_samplers` (None = all `samplers`). burst_window is the window of the
    main-grid burst rows (None = all remaining positions); the main paper rows use n_orders[-1].
    The memory suite compiles every sampler and the train step at every (length, batch) pair,
    with burst_window and n_orders[-1] (bench/memory.py). The shipped suite measures its own
    samplers on the shipped model at every (length, batch) pair (bench/shipped.py).
    The sweeps run at (lengths[-1], batches[0]) for every entry of `weights` (the first entry also
    runs the main grid): exact mode over `windows`, paper mode over `n_orders` at burst_window,
    and cached AR as the reference of each weights' ratios. max_uncached_tokens skips uncached AR
    where batch * length * (length + 1) exceeds it. budget_s (> 0; None or inf: none):
    configurations not started within this many seconds of the start are skipped (recorded as
    skipped); a sampler row whose program is already compiled (the same shapes, other weights)
    gets 10% more time. seed: of the weights and the sampler keys, in [0, MAX_SEED].
    """

    suites: tuple[str, ...] = SUITES
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
        if not self.suites or any(s not in SUITES for s in self.suites):
            raise ValueError(f"suites must be a non-empty subset of {', '.join(SUITES)}; "
                             f"got {','.join(self.suites)}")
        for name in ("lengths", "batches", "n_orders"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                                 for v in values):
                raise ValueError(f"{name} must be a non-empty list of positive integers; "
                                 f"got {values!r}")
        if not self.windows:
            raise ValueError("windows must be a non-empty list of positive integers or 'none'")
        for window in (*self.windows, self.burst_window):
            SampleOptions("burst", window=window)  # the sampler's own window check
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
            SampleOptions("burst", order=order)  # the sampler's own order check
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        for name in ("repeats", "train_batch", "matmul_n", "copy_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.max_uncached_tokens < 0:
            raise ValueError(f"max_uncached_tokens must be >= 0; got {self.max_uncached_tokens!r}")
        if self.train_length is not None and self.train_length < 1:
            raise ValueError(f"train_length must be a positive integer; got {self.train_length!r}")
        if self.budget_s is not None and not self.budget_s > 0:  # nan too
            raise ValueError(f"budget_s must be a number of seconds > 0 (inf: no budget); got "
                             f"{self.budget_s!r}")
        check_int("seed", self.seed, 0, MAX_SEED)  # the seeds jax.random.key takes
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
    weights of `preset` (block_size raised to the longest length), cast to `dtype` if given.
    With memory as the only suite, a preset's params are jax.ShapeDtypeStructs (nothing
    allocated); with shipped as the only suite and no workdir, the model is the shipped one
    (primary kind 'shipped')."""
    if set(config.suites) == {"shipped"} and not config.workdir:
        cfg, params, info = load_shipped(config.dtype)
        return cfg, params, "shipped", info
    if config.workdir:
        cfg, params, step = load(config.workdir, config.step)
        info = dict(source="checkpoint", workdir=str(config.workdir), step=int(step))
        kind = "checkpoint"
        cfg, params = cast_model(cfg, params, config.dtype)
    else:
        cfg = preset_model_config(config.preset, max(config.lengths))
        make = lambda: cast_model(cfg, init_params(cfg, jax.random.key(config.seed)),
                                  config.dtype)[1]
        abstract = set(config.suites) == {"memory"}  # compile-only: no weights needed
        params = jax.eval_shape(make) if abstract else make()
        cfg = cast_model(cfg, {}, config.dtype)[0]
        info = dict(source="preset", preset=config.preset, seed=config.seed,
                    abstract_params=abstract)
        kind = "init"
    info.update(model=dataclasses.asdict(cfg), params=count_params(params),
                param_bytes=param_bytes(params))
    return cfg, params, kind, info
