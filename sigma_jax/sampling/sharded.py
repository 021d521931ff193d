"""Sampling on a device mesh: any sampler, with the tokens of the unsharded call."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.model import check_params, init_params
from sigma_jax.param_sharding import param_shardings
from sigma_jax.sampling.call import SampleStats
from sigma_jax.sampling.dispatch import kernel_call
from sigma_jax.sampling.draws import row_keys
from sigma_jax.sampling.inputs import checked_inputs, generation_order
from sigma_jax.sampling.options import SampleOptions, check_options
from sigma_jax.sharding import (
    DEFAULT_RULES,
    auto_axes_call,
    batch_multiple,
    batch_rows,
    check_mesh,
    fitted_sharding,
    place_global,
    replicated,
)


def sample_sharded(cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
                   options: SampleOptions, *, mesh, order=None, lengths=None):
    """The sampler of `options` run sharded on `mesh` (a jax.sharding.Mesh), along
    `options.order` or the explicit `order` [B, N], with per-row `lengths` [B] (None: N).

    params: a params dict, already placed (e.g. by `shard_params` or `checkpoint.load(...,
    mesh=mesh)`) or on host; it is placed by `param_shardings`. key: one typed key, or one per
    row [B]. tokens, known: [B, N] host arrays (the same on every process).

    The batch is padded to a multiple of the batch axes with copies of the last row marked fully
    known (with keys of their own): they generate nothing, so no padding row extends a loop and
    every statistic equals the unsharded call's. Rows are placed over ("data", "fsdp"), run by
    one jitted kernel with in/out shardings (params by their logical axes, rows over the batch
    axes, the traced options replicated) that strips the padding rows and, when there are none,
    donates its token buffer to the output. Rows are independent and each row's random stream
    depends only on its key (threefry is partitionable), so the tokens equal the unsharded
    sampler's.

    When the mesh holds the whole params on every device (data parallelism), each device runs
    the sampler's loop over its own rows (`jax.shard_map`): no collective per iteration, and a
    device stops when its rows are done; `forward_passes` is the most any device made, which is
    the unsharded call's. On a CPU host given several devices (`jax_num_cpu_devices`) the rows
    so run on the cores side by side, where one program keeps them only partly busy. Otherwise
    the sampler runs as one program over the mesh, under an Explicit mesh inside
    `auto_axes_call` (Auto axes inside). Every process of a multi-host run must call this with
    the same arguments. Returns (tokens [B, N], SampleStats) as global jax arrays; read them
    with `to_host` (multi-host safe).
    """
    check_mesh(mesh)
    check_options(options)
    check_params(cfg, params)
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
    traced = options.traced_arguments(rows_in[0].shape[1])  # typed arrays; max_iters resolved
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
        return kernel(*args)

    def strip(out, stats):  # the padding rows
        keep = lambda x: x[:batch] if x.ndim else x
        return keep(out), jax.tree.map(keep, stats)

    # The samplers' loops and the padding's removal are not Explicit-clean (per-row scatters
    # without out_sharding, rows sliced unevenly): under an Explicit mesh they run with Auto
    # axes inside, and their outputs come back explicit.
    out_axes = (("batch", "seq"), SampleStats(iterations=("batch",), generated=("batch",),
                                              forward_passes=(), finished=("batch",)))
    shapes = jax.eval_shape(init_params, cfg, jax.random.key(0))
    params_sharding = param_shardings(shapes, mesh)
    whole = all(s.is_fully_replicated for s in jax.tree.leaves(params_sharding))
    body = _per_device_loops(run, mesh, 6 + explicit_order) if whole else run
    kernel = lambda *args: auto_axes_call(lambda *a: strip(*body(*a)), out_axes, *args)

    rows = batch_rows(mesh)  # batch + pad: a multiple
    out_rows = fitted_sharding(mesh, ("batch",), (batch,))  # may drop batch axes
    rep = replicated(mesh)
    stats = SampleStats(iterations=out_rows, generated=out_rows, forward_passes=rep,
                        finished=out_rows)
    in_shardings = (params_sharding, rows, rows, rows, rows,
                    *((rows,) if explicit_order else ()), rep)
    # The tokens buffer is donated to the output tokens when they have the same shape.
    return jax.jit(kernel, in_shardings=in_shardings, out_shardings=(out_rows, stats),
                   donate_argnums=() if pad else (2,))


def _per_device_loops(run, mesh, n_args: int):
    """`run(params, keys, tokens, known, lengths, [order,] traced)` -> (tokens, SampleStats),
    run by every device of the ambient mesh (`mesh`'s devices) on its own rows
    (`jax.shard_map`): the params and the traced options (the last argument) whole on every
    device, the n_args - 2 others split by rows. `forward_passes` is the most of any device's."""
    row_spec = batch_rows(mesh).spec

    def local(*args):
        out, stats = run(*args)
        most = jax.lax.pmax(stats.forward_passes, DEFAULT_RULES.mesh_axes("batch"))
        return out, dataclasses.replace(stats, forward_passes=most)

    stats_spec = SampleStats(iterations=row_spec, generated=row_spec, forward_passes=jax.P(),
                             finished=row_spec)
    in_specs = (jax.P(), *[row_spec] * (n_args - 2), jax.P())
    # Over the ambient mesh when called (Auto axes inside `auto_axes_call`, whatever `mesh`'s).
    return lambda *args: jax.shard_map(
        local, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
        out_specs=(row_spec, stats_spec), check_vma=False)(*args)
