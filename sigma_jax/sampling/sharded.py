"""Sampling on a device mesh: any sampler, with the tokens of the unsharded call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.model import init_params, param_shardings
from sigma_jax.sampling.call import SampleStats
from sigma_jax.sampling.dispatch import kernel_call
from sigma_jax.sampling.draws import row_keys
from sigma_jax.sampling.inputs import checked_inputs, generation_order
from sigma_jax.sampling.options import SampleOptions
from sigma_jax.sharding import (
    auto_axes_call,
    batch_multiple,
    batch_rows,
    fitted_sharding,
    place_global,
    replicated,
)


def sample_sharded(cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
                   options: SampleOptions, *, mesh, order=None, lengths=None):
    """The sampler of `options` run sharded on `mesh`, along `options.order` or the explicit
    `order` [B, N], with per-row `lengths` [B] (None: N).

    params: a params dict, already placed (e.g. by `shard_params` or `checkpoint.load(...,
    mesh=mesh)`) or on host; it is placed by `param_shardings`. key: one typed key, or one per
    row [B]. tokens, known: [B, N] host arrays (the same on every process).

    The batch is padded to a multiple of the batch axes with copies of the last row marked fully
    known (with keys of their own): they generate nothing, so the loop runs exactly as long as
    the unsharded call's and every statistic equals its. Rows are placed over ("data", "fsdp"), run
    by one jitted kernel with in/out shardings (params by their logical axes, rows over the batch
    axes, the traced options replicated) that strips the padding rows and, when there are none,
    donates its token buffer to the output. Rows are independent and each row's random stream
    depends only on its key (threefry is partitionable), so the tokens equal the unsharded
    sampler's. Under an Explicit mesh the sampler runs inside `auto_axes_call` (Auto axes
    inside). Every process of a multi-host run must call this with the same arguments. Returns
    (tokens [B, N], SampleStats) as global jax arrays; read them with `to_host` (multi-host safe).
    """
    tokens, known, order, lengths = checked_inputs(cfg, tokens, known, options, order, lengths)
    explicit_order = order is not None
    rows_in = [np.asarray(x) for x in (tokens, known, lengths,
                                       *((order,) if explicit_order else ()))]
    batch = rows_in[0].shape[0]
    keys = row_keys(key, batch)  # [B]: what the sampler itself would use
    pad = -batch % batch_multiple(mesh)
    if pad:  # fully known copies of the last row, with keys of their own; they are stripped
        rows_in = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) for x in rows_in]
        rows_in[1][batch:] = True  # nothing to generate: no padding row extends the loop
        extra = jax.vmap(lambda i: jax.random.fold_in(keys[-1], i))(jnp.arange(1, pad + 1))
        keys = jnp.concatenate([keys, extra])
    values = options.traced_values(rows_in[0].shape[1])  # typed arrays; max_iters resolved
    traced = {name: value for name, value in zip(SampleOptions.traced_fields(), values,
                                                 strict=True) if value is not None}
    kernel = _sampler_kernel(cfg, mesh, options.static_part(), explicit_order, batch, pad)
    rows = batch_rows(mesh)
    with jax.set_mesh(mesh):
        return kernel(jax.device_put(params, param_shardings(params, mesh)),
                      place_global(keys, rows), *(place_global(x, rows) for x in rows_in),
                      {k: place_global(v, replicated(mesh)) for k, v in traced.items()})


@functools.lru_cache(maxsize=32)
def _sampler_kernel(cfg, mesh, static: SampleOptions, explicit_order, batch, pad):
    """The jitted sampler for one (config, mesh, static options, batch) combination: inputs of
    batch + pad rows, outputs of the first `batch` rows."""

    def run(params, keys, tokens, known, lengths, *rest):  # rest: ([order,] traced options)
        options = static.replace(**rest[-1])
        order, keys = generation_order(rest[0] if explicit_order else options.order, known,
                                       keys, options.known_order, lengths)
        kernel, args = kernel_call(cfg, params, keys, tokens, known, order, lengths, options)
        out, stats = kernel(*args)
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
    in_shardings = (param_shardings(shapes, mesh), rows, rows, rows, rows,
                    *((rows,) if explicit_order else ()), rep)
    # The tokens buffer is donated to the output tokens when they have the same shape.
    return jax.jit(kernel, in_shardings=in_shardings, out_shardings=(out_rows, stats),
                   donate_argnums=() if pad else (2,))
