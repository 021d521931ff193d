"""The sampler vocabulary: one name per sampler, shared by the sample CLI, the benchmark and the
experiments.

    ar            cached any-order AR (`sample_ar`), one token per model call
    ar_nocache    the uncached oracle: a full forward pass per token
    burst         exact burst sampling (`sample_burst(mode='exact')`): draft + verify per iteration
    burst_jacobi  exact, one verify call per iteration (`sample_burst(mode='jacobi')`)
    burst_paper   the published rule with K candidate orders (`sample_burst(mode='paper')`; not
                  exact; random orders only)

A `SamplerSpec` names a sampler with its generation order, window and K; `spec.prepare(...)` gives
the public prepared call (`SamplerCall`) and `spec.sample(...)` runs it. `sample_sharded` runs
`sample_ar` or `sample_burst` on a device mesh, with the tokens of the unsharded call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.model import init_params, param_shardings
from sigma_jax.orders import KNOWN_ORDERS, ORDER_KINDS
from sigma_jax.sample_ar import sample_ar, sample_ar_call
from sigma_jax.sample_burst import sample_burst, sample_burst_call
from sigma_jax.sampling import (
    SamplerCall,
    SampleStats,
    check_sampler_inputs,
    row_keys,
    truncation_options,
)
from sigma_jax.sharding import (
    auto_axes_call,
    batch_multiple,
    batch_rows,
    fitted_sharding,
    place_global,
    replicated,
)

SAMPLERS = ("ar", "ar_nocache", "burst", "burst_jacobi", "burst_paper")
BURST_MODES = {"burst": "exact", "burst_jacobi": "jacobi", "burst_paper": "paper"}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its static choices. order: a kind of `orders.ORDER_KINDS` (burst_paper:
    'random' only); window: burst candidates per iteration (None = every remaining position;
    ignored by the AR samplers); n_orders: K of burst_paper; known_order: how order='random'
    feeds the known tokens. Bad values raise a one-line ValueError at construction."""

    name: str
    order: str = "random"
    window: int | None = None
    n_orders: int = 5
    known_order: str = "random"

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.name!r}")
        if self.order not in ORDER_KINDS:
            raise ValueError(f"order must be one of {', '.join(ORDER_KINDS)}; "
                             f"got {self.order!r}")
        if self.name == "burst_paper" and self.order != "random":
            raise ValueError("burst_paper draws its own random candidate orders: use "
                             "order='random' or another sampler")
        if self.known_order not in KNOWN_ORDERS:
            raise ValueError(f"known_order must be one of {', '.join(KNOWN_ORDERS)}; "
                             f"got {self.known_order!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be None or a positive integer; got {self.window!r}")
        if not isinstance(self.n_orders, int) or self.n_orders < 1:
            raise ValueError(f"n_orders must be a positive integer; got {self.n_orders!r}")

    @property
    def is_burst(self) -> bool:
        return self.name in BURST_MODES

    @property
    def label(self) -> str:
        """e.g. 'ar[random]', 'burst_jacobi[spread](W=all)', 'burst_paper[random](W=16,K=5)'."""
        if not self.is_burst:
            return f"{self.name}[{self.order}]"
        k = f",K={self.n_orders}" if self.name == "burst_paper" else ""
        return f"{self.name}[{self.order}](W={self.window or 'all'}{k})"

    @property
    def function(self) -> Callable:
        """The public sampler: `sample_ar` or `sample_burst`."""
        return sample_burst if self.is_burst else sample_ar

    def options(self, *, temperature=1.0, top_k: int | None = None, top_p=None) -> dict:
        """The keyword arguments of `self.function` (and of its `_call` variant)."""
        common = dict(order=self.order, temperature=temperature, top_k=top_k, top_p=top_p,
                      known_order=self.known_order)
        if not self.is_burst:
            return dict(use_cache=self.name == "ar", **common)
        return dict(mode=BURST_MODES[self.name], window=self.window, n_orders=self.n_orders,
                    **common)

    def prepare(self, cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
                **sampling) -> SamplerCall:
        """The public prepared call for (key, tokens [B, N], known [B, N]); sampling:
        temperature, top_k, top_p."""
        prepare = sample_burst_call if self.is_burst else sample_ar_call
        return prepare(cfg, params, key, tokens, known, **self.options(**sampling))

    def sample(self, cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
               **sampling) -> tuple[jax.Array, SampleStats]:
        """Run the sampler: (tokens [B, N], SampleStats); sampling: temperature, top_k, top_p."""
        return self.function(cfg, params, key, tokens, known, **self.options(**sampling))

    def expected_forward_passes(self, length: int, n_known: int, iterations_max: int) -> int:
        """The SampleStats count of sequential model calls: ar 1 + steps (prefill + one per
        token), ar_nocache one full pass per token, burst and burst_paper 1 + 2 x iterations
        (prefill + draft and verify), burst_jacobi 2 + iterations (prefill, drafts, verify)."""
        steps = length - n_known
        if self.name == "ar":
            return 1 + steps
        if self.name == "ar_nocache":
            return steps
        if self.name == "burst_jacobi":
            return 2 + iterations_max
        return 1 + 2 * iterations_max


# ---------------------------------------------------------------- sharded sampling

# Sampler keyword arguments that are traced (changing them never recompiles); every other one is
# static (it selects a compiled kernel).
_TRACED_SAMPLER_OPTIONS = ("temperature", "top_p", "max_iters")


def sample_sharded(sampler, cfg, params, key, tokens, known, *, mesh, **options):
    """`sampler(cfg, params, key, tokens, known, **options)` run sharded on `mesh`.

    sampler: `sigma_jax.sample_ar` or `sigma_jax.sample_burst` (or anything with their signature
    returning (tokens [B, N], SampleStats)). params: a params dict, already placed (e.g. by
    `shard_params` or `checkpoint.load(..., mesh=mesh)`) or on host; it is placed by
    `param_shardings`. key: one typed key, or one per row [B]. tokens, known: [B, N] host arrays
    (the same on every process). options: the sampler's keyword arguments (temperature, top_p and
    max_iters are traced, the rest static).

    The batch is padded to a multiple of the batch axes with copies of the last row marked fully
    known (with keys of their own): they generate nothing, so the loop runs exactly as long as
    the unsharded call's and every statistic equals its. Rows are placed over ("data", "fsdp"), run
    by one jitted kernel with in/out shardings (params by their logical axes, rows over the batch
    axes, scalars replicated) that strips the padding rows and, when there are none, donates its
    token buffer to the output. Rows are independent and each row's random stream depends only
    on its key (threefry is partitionable), so the tokens equal the unsharded sampler's. Under an
    Explicit mesh the sampler runs inside `auto_axes_call` (Auto axes inside). Every process of
    a multi-host run must call this with the same arguments. Returns (tokens [B, N], SampleStats)
    as global jax arrays; read them with `to_host` (multi-host safe).
    """
    tokens, known = np.asarray(tokens, np.int32), np.asarray(known, bool)
    order = options.pop("order", None)
    explicit_order = order is not None and not isinstance(order, str)
    check_sampler_inputs(cfg, tokens, known, np.asarray(order) if explicit_order else order,
                         options.get("known_order", "random"))
    truncation_options(cfg, options.get("temperature", 1.0), options.get("top_k"),
                       options.get("top_p"))
    if order is not None and not explicit_order:
        options["order"] = order  # a kind name: static
    batch = tokens.shape[0]
    keys = row_keys(key, batch)  # [B]: what the sampler itself would use
    rows_in = [tokens, known] + ([np.asarray(order, np.int32)] if explicit_order else [])
    pad = -batch % batch_multiple(mesh)
    if pad:  # fully known copies of the last row, with keys of their own; they are stripped
        rows_in = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) for x in rows_in]
        rows_in[1][batch:] = True  # nothing to generate: no padding row extends the loop
        extra = jax.vmap(lambda i: jax.random.fold_in(keys[-1], i))(jnp.arange(1, pad + 1))
        keys = jnp.concatenate([keys, extra])
    traced = {k: v for k, v in options.items() if k in _TRACED_SAMPLER_OPTIONS and v is not None}
    static = tuple(sorted((k, v) for k, v in options.items() if k not in traced))
    kernel = _sampler_kernel(sampler, cfg, mesh, static, explicit_order, batch, pad)
    rows = batch_rows(mesh)
    with jax.set_mesh(mesh):
        return kernel(jax.device_put(params, param_shardings(params, mesh)),
                      place_global(keys, rows), *(place_global(x, rows) for x in rows_in),
                      {k: place_global(np.asarray(v), replicated(mesh))
                       for k, v in traced.items()})


@functools.lru_cache(maxsize=32)
def _sampler_kernel(sampler, cfg, mesh, static, explicit_order, batch, pad):
    """The jitted sampler for one (sampler, config, mesh, static options, batch) combination:
    inputs of batch + pad rows, outputs of the first `batch` rows."""
    static = dict(static)

    def run(params, keys, tokens, known, *rest):  # rest: ([order,] traced options)
        order = {"order": rest[0]} if explicit_order else {}
        out, stats = sampler(cfg, params, keys, tokens, known, **static, **order, **rest[-1])
        keep = lambda x: x[:batch] if x.ndim else x  # strip the padding rows
        return keep(out), jax.tree.map(keep, stats)

    # The samplers' loops are not Explicit-clean (per-row scatters without out_sharding): under
    # an Explicit mesh they run with Auto axes inside, and their outputs come back explicit.
    out_axes = (("batch", "seq"), SampleStats(iterations=("batch",), generated=("batch",),
                                              forward_passes=(), finished=("batch",)))
    kernel = lambda *args: auto_axes_call(run, out_axes, *args)

    shapes = jax.eval_shape(init_params, cfg, jax.random.key(0))
    rows = batch_rows(mesh)  # batch + pad: a multiple
    out_rows = fitted_sharding(mesh, ("batch",), (batch,))  # may drop batch axes
    rep = replicated(mesh)
    stats = SampleStats(iterations=out_rows, generated=out_rows, forward_passes=rep,
                        finished=out_rows)
    in_shardings = (param_shardings(shapes, mesh), rows, rows, rows,
                    *((rows,) if explicit_order else ()), rep)
    # The tokens buffer is donated to the output tokens when they have the same shape.
    return jax.jit(kernel, in_shardings=in_shardings, out_shardings=(out_rows, stats),
                   donate_argnums=() if pad else (2,))
