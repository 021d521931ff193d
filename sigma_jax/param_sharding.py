"""Where each parameter lives on a mesh: the logical axes of every parameter of `init_params`
(one name or None per dimension, by module path and leaf name; layer params stacked on a leading
"layers" axis), and from them the PartitionSpecs and fitted NamedShardings of a params tree."""

from __future__ import annotations

import jax

from sigma_jax.sharding import check_mesh, fitted_sharding, is_logical_axes, logical_to_spec

# (module path suffix, leaf name) -> logical axes of one layer's (or the top-level) parameter.
# Stacked layer params (under "h") get a leading "layers" axis on top of these.
_PARAM_AXES = {
    (("attn", "c_attn"), "kernel"): ("embed", "heads"),  # [D, 3D] = q | k | v
    (("attn", "c_attn"), "bias"): ("heads",),
    (("attn", "c_proj"), "kernel"): ("heads", "embed"),
    (("attn", "c_proj"), "bias"): ("embed",),
    (("mlp", "c_fc"), "kernel"): ("embed", "ff"),
    (("mlp", "c_fc"), "bias"): ("ff",),
    (("mlp", "c_proj"), "kernel"): ("ff", "embed"),
    (("mlp", "c_proj"), "bias"): ("embed",),
    (("ln_1",), "scale"): ("embed",),
    (("ln_1",), "bias"): ("embed",),
    (("ln_2",), "scale"): ("embed",),
    (("ln_2",), "bias"): ("embed",),
    (("ln_f",), "scale"): ("embed",),
    (("ln_f",), "bias"): ("embed",),
    # Not split over "embed": a gather from a table split over "fsdp" into activations whose batch
    # is also split over "fsdp" makes XLA replicate the whole [B, T, D] output ("involuntary full
    # rematerialization"). The table is split over vocab only (it is also the tied output head).
    (("wte",), "embedding"): ("vocab", None),
    (("lm_head",), "kernel"): ("embed", "vocab"),
    (("pos",), "wpe"): ("pos", None),
}
_LAYER_STACK = "h"  # the nn.scan scope whose params are stacked on axis 0


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_logical_axes(params) -> dict:
    """A pytree like `params` of logical-axis tuples (one name or None per dimension)."""

    def axes_of(path, leaf):
        names = _path_names(path)
        stacked = names[:1] == (_LAYER_STACK,)
        module, leaf_name = names[int(stacked):-1], names[-1]
        for (suffix, name), axes in _PARAM_AXES.items():
            if leaf_name == name and module[-len(suffix):] == suffix:
                axes = (("layers",) if stacked else ()) + axes
                if len(axes) != len(leaf.shape):
                    raise ValueError(f"param {'/'.join(names)} has shape {leaf.shape}, expected "
                                     f"{len(axes)} dimensions {axes}")
                return axes
        raise ValueError(f"no sharding rule for param {'/'.join(names)} (shape {leaf.shape}); "
                         f"add it to param_sharding._PARAM_AXES")

    return jax.tree_util.tree_map_with_path(axes_of, params)


def param_specs(params) -> dict:
    """A pytree like `params` of `jax.P`, from the logical axes of each parameter (no fitting)."""
    return jax.tree.map(logical_to_spec, param_logical_axes(params), is_leaf=is_logical_axes)


def param_shardings(params, mesh) -> dict:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) on `mesh` (a jax.sharding.Mesh:
    one-line ValueError otherwise), fitted to the shapes."""
    check_mesh(mesh)
    return jax.tree.map(lambda p, axes: fitted_sharding(mesh, axes, p.shape), params,
                        param_logical_axes(params), is_leaf=is_logical_axes)


def shard_params(params, mesh) -> dict:
    """Place `params` on `mesh` (a jax.sharding.Mesh) by `param_shardings` (a copy; the input is
    left as it is)."""
    return jax.device_put(params, param_shardings(params, mesh))
