"""Device meshes, logical-axis rules, and `constrain()`: the one helper every sharding hint uses.

The mesh has three axes, always in this order:

  data    pure data parallelism: the batch is split, parameters are replicated;
  fsdp    the batch is split too, and parameters are split along their model width ("embed");
          XLA all-gathers each layer's weights where they are used;
  tensor  heads, MLP width and vocabulary are split (Megatron-style tensor parallelism).

Library code never names mesh axes. It names *logical* axes ("batch", "heads", ...) and a
`LogicalRules` table maps them onto mesh axes. Launchers own the mesh: they build it with
`make_mesh`, enter it with `jax.set_mesh(mesh)`, place params/batches/caches with the helpers below,
and put `in_shardings`/`out_shardings` on their jitted entry points. Library functions stay
mesh-agnostic apart from `constrain()` calls, which do nothing when there is no mesh.

Divisibility: `constrain`, `param_shardings` and `cache_sharding` drop a mesh axis from an array
dimension that it does not divide (e.g. a vocabulary of 11 on tensor=4 stays replicated), so tiny
test models run on any mesh. That silently costs memory or parallelism on real models; for the
batch, launchers should instead call `check_batch` (or `pad_batch`) so a bad batch size is an
error, not a slowdown.

Axis types. Auto meshes (the default, `MeshConfig.axis_type='auto'`) let XLA propagate shardings;
`constrain` then uses `jax.lax.with_sharding_constraint`. Explicit meshes carry shardings in the
array types; `constrain` then uses `jax.sharding.reshard`. Under Explicit:
  - Flax Linen layers are not Explicit-clean (`nn.Embed` gathers and `nn.Dense` matmuls take no
    `out_sharding=`), so `model.forward_masked` runs the module through `auto_axes_call`: inside
    it the mesh's axes are Auto, and its outputs come back with explicit shardings;
  - `cache.write` passes `out_sharding=explicit_spec(...)` to its scatter;
  - calls need `with jax.set_mesh(mesh):` (the ambient mesh is how `constrain` sees it).
Both axis types are tested on 8 fake CPU devices (tests/test_sharding.py): forward, gradients,
cache writes; prefill + burst pass under Auto (under Explicit, `orders.make_batch` still needs its
start column constrained to ("batch", "seq")).

Jobs (docs/scaling.md; tests/test_scale.py, tests/test_multihost.py):
  - training: `sigma_jax.train.train(..., mesh=...)`, or `init_state(mesh=)` + `train_step(mesh=)`
    (jax.jit with in/out shardings, state donated); batches enter with `place_local_batch`
    (`jax.make_array_from_process_local_data`, so each host passes only its own rows);
  - sampling: `sample_sharded(sample_ar | sample_burst, ...)`: one jitted kernel with in/out
    shardings, the batch padded to the batch axes and stripped; under an Explicit mesh the
    sampler runs inside an Auto region (`auto_axes_call`), as the Linen forward does;
  - host data every process holds in full enters with `place_global`; results leave with
    `to_host` (`process_allgather` for arrays spread over several processes);
  - `mesh_config` reads the launchers' --mesh flag ('auto' or data:fsdp:tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding

MESH_AXES = ("data", "fsdp", "tensor")
AXIS_TYPES = ("auto", "explicit")

# ----------------------------------------------------------------------------------------------
# Mesh


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes, and their type: 'auto' or 'explicit'."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    axis_type: str = "auto"

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mesh axis {name} must be an integer >= 1, got {value!r}")
        if self.axis_type not in AXIS_TYPES:
            raise ValueError(f"axis_type must be 'auto' or 'explicit', got {self.axis_type!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @classmethod
    def parse(cls, text: str, axis_type: str = "auto") -> MeshConfig:
        """'data:fsdp:tensor', e.g. '8:1:1' or '2:2:2' (the launcher's --mesh flag)."""
        match = re.fullmatch(r"\s*([0-9]+):([0-9]+):([0-9]+)\s*", str(text))
        if match is None:
            raise ValueError(f"--mesh must be three positive integers data:fsdp:tensor "
                             f"(e.g. 2:2:2), got {text!r}")
        data, fsdp, tensor = (int(g) for g in match.groups())
        return cls(data=data, fsdp=fsdp, tensor=tensor, axis_type=axis_type)

    def __str__(self) -> str:
        return f"{self.data}:{self.fsdp}:{self.tensor}"


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh over the first `mesh_cfg.size` of `devices` (default: all).

    The mesh size must divide the number of devices (a smaller mesh is allowed for tests and
    experiments; it uses a leading subset of the devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if mesh_cfg.size > n or n % mesh_cfg.size:
        raise ValueError(f"mesh {mesh_cfg} needs {mesh_cfg.size} devices, which must divide the "
                         f"{n} available device{'s' if n != 1 else ''}")
    kind = AxisType.Explicit if mesh_cfg.axis_type == "explicit" else AxisType.Auto
    return jax.make_mesh(mesh_cfg.shape, MESH_AXES, axis_types=(kind,) * len(MESH_AXES),
                         devices=devices[: mesh_cfg.size])


# ----------------------------------------------------------------------------------------------
# Logical axes

MeshAxes = str | tuple[str, ...] | None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).

    Parameter axes: embed (model width of weights), heads, kv_heads, ff, vocab, layers, pos.
    Activation axes: batch, seq, act_embed (model width of activations), head_dim, cache_seq.
    `embed` and `act_embed` are separate because activations are already split over "fsdp" by
    their batch: one array cannot use a mesh axis twice.
    """

    batch: MeshAxes = ("data", "fsdp")
    embed: MeshAxes = "fsdp"
    act_embed: MeshAxes = None
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    ff: MeshAxes = "tensor"
    vocab: MeshAxes = "tensor"
    seq: MeshAxes = None
    cache_seq: MeshAxes = None
    layers: MeshAxes = None
    head_dim: MeshAxes = None
    pos: MeshAxes = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            ok = value is None or isinstance(value, str) or (
                isinstance(value, tuple) and all(isinstance(a, str) for a in value))
            if not ok:
                raise ValueError(f"rule {field.name} must be a mesh axis name, a tuple of them or "
                                 f"None, got {value!r}")

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        """The mesh axes of one logical name, as a tuple (empty = replicated); None -> ()."""
        if name is None:
            return ()
        if name not in _RULE_NAMES:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(_RULE_NAMES)}")
        value = getattr(self, name)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    def replace(self, **changes) -> LogicalRules:
        return dataclasses.replace(self, **changes)


_RULE_NAMES = tuple(f.name for f in dataclasses.fields(LogicalRules))
DEFAULT_RULES = LogicalRules()


def _spec_entry(axes: Sequence[str]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES) -> jax.P:
    """Logical names (None = replicated) -> `jax.P`; a mesh axis used by two dimensions raises."""
    entries, used = [], {}
    for name in names:
        axes = rules.mesh_axes(name)
        for axis in axes:
            if axis in used:
                raise ValueError(f"mesh axis {axis!r} is used by both {used[axis]!r} and {name!r} "
                                 f"in logical axes {tuple(names)}")
            used[axis] = name
        entries.append(_spec_entry(axes))
    return jax.P(*entries)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def fit_spec(spec: jax.P, shape: Sequence[int], mesh) -> jax.P:
    """Drop, per dimension, the mesh axes that the mesh lacks or that do not divide the dimension.

    Axes are tried in order and each is kept only if the product of the kept ones still divides
    the dimension: a batch of 2 on data=2, fsdp=2 becomes P("data"), a vocabulary of 11 on
    tensor=4 becomes replicated.
    """
    sizes = _axis_sizes(mesh)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    if len(entries) != len(shape):
        raise ValueError(f"spec {spec} has more entries than the array has dimensions {shape}")
    fitted = []
    for dim, entry in zip(shape, entries, strict=True):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept, prod = [], 1
        for axis in axes:
            if axis in sizes and dim % (prod * sizes[axis]) == 0:
                kept.append(axis)
                prod *= sizes[axis]
        fitted.append(_spec_entry(kept))
    return jax.P(*fitted)


def _all_explicit(mesh) -> bool:
    return bool(mesh.axis_types) and all(t == AxisType.Explicit for t in mesh.axis_types)


def constrain(x: jax.Array, logical_names: Sequence[str | None],
              rules: LogicalRules = DEFAULT_RULES) -> jax.Array:
    """Ask for x to be sharded by its logical axes under the ambient mesh (`jax.set_mesh`).

    No mesh: x unchanged (so library code runs unsharded). All-Explicit mesh: `reshard`. Any other
    mesh: `with_sharding_constraint`. Mesh axes that do not divide a dimension are dropped.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(logical_names) != x.ndim:
        raise ValueError(f"constrain got {len(logical_names)} logical axes {tuple(logical_names)} "
                         f"for an array of shape {x.shape}")
    spec = fit_spec(logical_to_spec(logical_names, rules), x.shape, mesh)
    if _all_explicit(mesh):
        return jax.sharding.reshard(x, spec)
    if not isinstance(x, jax.core.Tracer):  # eager call on a concrete array: place it
        return jax.device_put(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def explicit_spec(shape: Sequence[int], logical_names: Sequence[str | None],
                  rules: LogicalRules = DEFAULT_RULES) -> jax.P | None:
    """The fitted spec for an op's `out_sharding=` under an all-Explicit ambient mesh, else None.

    For ops whose output sharding Explicit mode cannot infer (scatters, some einsums); None keeps
    the op's default behaviour with no mesh or an Auto mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not _all_explicit(mesh):
        return None
    return fit_spec(logical_to_spec(logical_names, rules), shape, mesh)


def _check_no_explicit_inputs(args) -> None:
    for leaf in jax.tree.leaves(args):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty and _all_explicit(mesh):
            raise ValueError("inputs are sharded on an Explicit mesh but no mesh is set; call "
                             "inside `with jax.set_mesh(mesh):`")


def auto_axes_call(f, out_axes, *args, rules: LogicalRules = DEFAULT_RULES):
    """f(*args), with its outputs sharded by `out_axes` (a pytree of logical-axis tuples, one per
    output array, matching f's output structure).

    For code that is not Explicit-clean (Flax Linen layers call `jnp.take` and `dot_general`
    without `out_sharding=`): under an all-Explicit mesh f runs inside `jax.sharding.auto_axes`,
    i.e. with the mesh's axes treated as Auto (so `constrain` inside it uses
    `with_sharding_constraint` and XLA propagates shardings), and its outputs come back with
    explicit shardings. Under an Auto mesh the outputs are constrained; with no mesh this is
    exactly f(*args). f's arguments must be passed in `args`, not closed over.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        _check_no_explicit_inputs(args)
        return f(*args)
    if not _all_explicit(mesh):
        out = f(*args)
        return jax.tree.map(lambda axes, x: constrain(x, axes, rules), out_axes, out,
                            is_leaf=_is_axes)
    # One abstract trace to learn the output shapes, then the real call with fitted specs.
    shapes = jax.eval_shape(jax.sharding.auto_axes(f, out_sharding=jax.P()), *args)
    specs = jax.tree.map(
        lambda axes, s: fit_spec(logical_to_spec(axes, rules), s.shape, mesh), out_axes, shapes,
        is_leaf=_is_axes)
    return jax.sharding.auto_axes(f, out_sharding=specs)(*args)


# ----------------------------------------------------------------------------------------------
# Parameters

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
                         f"add it to sharding._PARAM_AXES")

    return jax.tree_util.tree_map_with_path(axes_of, params)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_specs(params, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """A pytree like `params` of `jax.P`, from the logical axes of each parameter (no fitting)."""
    return jax.tree.map(lambda axes: logical_to_spec(axes, rules), param_logical_axes(params),
                        is_leaf=_is_axes)


def param_shardings(params, mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) on `mesh`, fitted to the shapes."""
    specs = param_specs(params, rules)
    return jax.tree.map(lambda p, spec: NamedSharding(mesh, fit_spec(spec, p.shape, mesh)),
                        params, specs)


def shard_params(params, mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """Place `params` on `mesh` by `param_shardings` (a copy; the input is left as it is)."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


# ----------------------------------------------------------------------------------------------
# Batches, caches, replication


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.P())


def batch_sharding(mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis split over the batch mesh axes, every other axis replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))


CACHE_KV_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
CACHE_LENGTH_AXES = ("batch",)


def cache_sharding(mesh, cache=None, rules: LogicalRules = DEFAULT_RULES):
    """A KVCache of NamedShardings: k, v by CACHE_KV_AXES, length by batch.

    With `cache` (a KVCache of arrays or ShapeDtypeStructs) the specs are fitted to its shapes.
    Usable as `out_shardings` of a jitted `init_cache` or as `in_shardings` of a sampler.
    """
    from sigma_jax.cache import KVCache  # local import: cache.py imports this module

    kv, length = logical_to_spec(CACHE_KV_AXES, rules), logical_to_spec(CACHE_LENGTH_AXES, rules)
    if cache is None:
        return KVCache(k=NamedSharding(mesh, kv), v=NamedSharding(mesh, kv),
                       length=NamedSharding(mesh, length))
    return KVCache(k=NamedSharding(mesh, fit_spec(kv, cache.k.shape, mesh)),
                   v=NamedSharding(mesh, fit_spec(kv, cache.v.shape, mesh)),
                   length=NamedSharding(mesh, fit_spec(length, cache.length.shape, mesh)))


def batch_multiple(mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """How many ways the batch is split: the product of the batch mesh axes' sizes."""
    sizes = _axis_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in rules.mesh_axes("batch"))


def check_batch(batch: int, mesh, rules: LogicalRules = DEFAULT_RULES) -> None:
    """Raise a one-line ValueError unless `batch` divides evenly over the batch mesh axes."""
    multiple = batch_multiple(mesh, rules)
    if batch % multiple:
        axes = "×".join(rules.mesh_axes("batch"))
        raise ValueError(f"batch {batch} is not divisible by the {multiple} devices of the {axes} "
                         f"axes; use a multiple of {multiple}")


def pad_batch(tree, multiple: int):
    """Pad axis 0 of every leaf up to a multiple of `multiple` by repeating the last row.

    Returns (padded tree, original batch size); strip with `unpad_batch`. Repeating a real row
    (rather than zeros) keeps padded rows valid inputs: orders stay permutations, counts stay legal.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree, 0
    batch = leaves[0].shape[0]
    if any(leaf.shape[0] != batch for leaf in leaves):
        raise ValueError(f"pad_batch needs one batch size, got {[x.shape[0] for x in leaves]}")
    pad = -batch % multiple
    if pad == 0:
        return tree, batch

    def pad_leaf(x):
        return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)

    return jax.tree.map(pad_leaf, tree), batch


def unpad_batch(tree, batch: int):
    """Undo `pad_batch`: keep the first `batch` rows of every leaf."""
    return jax.tree.map(lambda x: x[:batch], tree)


# ----------------------------------------------------------------------------------------------
# Launcher helpers: the mesh flag, placing host data, reading results back (multi-host safe)


def mesh_config(text: str, axis_type: str = "auto", *, devices: int | None = None,
                platform: str | None = None, process_count: int | None = None) -> MeshConfig:
    """The launchers' --mesh value as a MeshConfig: 'data:fsdp:tensor', or 'auto'.

    'auto' puts every device on "data" (pure data parallelism), except on a single-process CPU
    host, where it is one device. Several CPU devices there are fake ones (XLA_FLAGS=
    --xla_force_host_platform_device_count, set for tests) sharing the same cores: whether they
    help depends on the model (docs/scaling.md measures both ways), and one device keeps a CPU
    run bit-identical to the unsharded library calls whatever XLA_FLAGS says. Ask for them
    explicitly, e.g. --mesh=8:1:1. The keyword arguments default to the running JAX
    (device_count, default_backend, process_count) and exist for tests.
    """
    if str(text).strip().lower() != "auto":
        return MeshConfig.parse(text, axis_type)
    devices = jax.device_count() if devices is None else devices
    platform = jax.default_backend() if platform is None else platform
    process_count = jax.process_count() if process_count is None else process_count
    data = 1 if platform == "cpu" and process_count == 1 else devices
    return MeshConfig(data=data, axis_type=axis_type)


def batch_spec(shape: Sequence[int], mesh, rules: LogicalRules = DEFAULT_RULES) -> jax.P:
    """The batch spec (rows over the batch axes) fitted to `shape`."""
    return fit_spec(logical_to_spec(("batch",), rules), shape, mesh)


def place_local_batch(local_batch, mesh, rules: LogicalRules = DEFAULT_RULES) -> jax.Array:
    """A global batch from this process's rows: `jax.make_array_from_process_local_data`.

    local_batch: [B / process_count, ...], this process's share of the global batch (what the
    data iterator yields: it reads examples process_index::process_count). The global batch
    [B, ...] is split over the batch mesh axes; each process's rows go to its own devices. One
    process: this is just a sharded device_put. B must divide by `batch_multiple` (`check_batch`).
    """
    local_batch = np.asarray(local_batch)
    global_rows = local_batch.shape[0] * jax.process_count()
    shape = (global_rows, *local_batch.shape[1:])
    check_batch(global_rows, mesh, rules)
    sharding = NamedSharding(mesh, batch_spec(shape, mesh, rules))
    return jax.make_array_from_process_local_data(sharding, local_batch, shape)


def place_global(x, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full (same values everywhere), placed by
    `sharding`: each process copies only the slices its own devices hold. Works across hosts,
    where `jax.device_put` of a host array onto other processes' devices does not. Typed PRNG
    keys are placed through their key data."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(place_global(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """numpy copies of every leaf; arrays spread over several processes are all-gathered first
    (`process_allgather(tiled=True)`, a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------------------------
# Sharded sampling

# Sampler keyword arguments that are traced (changing them never recompiles); every other one is
# static (it selects a compiled kernel).
_TRACED_SAMPLER_OPTIONS = ("temperature", "top_p", "max_iters")


def sample_sharded(sampler, cfg, params, key, tokens, known, *, mesh,
                   rules: LogicalRules = DEFAULT_RULES, **options):
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
    by one jitted kernel with in/out shardings (params by the rules, rows over the batch axes,
    scalars replicated) that strips the padding rows and, when there are none, donates its token
    buffer to the output. Rows are independent and each row's random stream depends only on its
    key (threefry is partitionable), so the tokens equal the unsharded sampler's. Under an
    Explicit mesh the sampler runs inside `auto_axes_call` (Auto axes inside). Every process of
    a multi-host run must call this with the same arguments. Returns (tokens [B, N], SampleStats)
    as global jax arrays; read them with `to_host` (multi-host safe).
    """
    from sigma_jax.sampling import check_sampler_inputs, row_keys, truncation_options

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
    pad = -batch % batch_multiple(mesh, rules)
    if pad:  # fully known copies of the last row, with keys of their own; they are stripped
        rows_in = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) for x in rows_in]
        rows_in[1][batch:] = True  # nothing to generate: no padding row extends the loop
        extra = jax.vmap(lambda i: jax.random.fold_in(keys[-1], i))(jnp.arange(1, pad + 1))
        keys = jnp.concatenate([keys, extra])
    traced = {k: v for k, v in options.items() if k in _TRACED_SAMPLER_OPTIONS and v is not None}
    static = tuple(sorted((k, v) for k, v in options.items() if k not in traced))
    kernel = _sampler_kernel(sampler, cfg, mesh, rules, static, explicit_order, batch, pad)
    rows = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    with jax.set_mesh(mesh):
        return kernel(jax.device_put(params, param_shardings(params, mesh, rules)),
                      place_global(keys, rows), *(place_global(x, rows) for x in rows_in),
                      {k: place_global(np.asarray(v), replicated(mesh))
                       for k, v in traced.items()})


@functools.lru_cache(maxsize=32)
def _sampler_kernel(sampler, cfg, mesh, rules, static, explicit_order, batch, pad):
    """The jitted sampler for one (sampler, config, mesh, static options, batch) combination:
    inputs of batch + pad rows, outputs of the first `batch` rows."""
    from sigma_jax.model import init_params
    from sigma_jax.sampling import SampleStats

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
    kernel = lambda *args: auto_axes_call(run, out_axes, *args, rules=rules)

    shapes = jax.eval_shape(init_params, cfg, jax.random.key(0))
    rows = NamedSharding(mesh, logical_to_spec(("batch",), rules))  # batch + pad: a multiple
    out_rows = NamedSharding(mesh, batch_spec((batch,), mesh, rules))  # may drop batch axes
    rep = replicated(mesh)
    stats = SampleStats(iterations=out_rows, generated=out_rows, forward_passes=rep,
                        finished=out_rows)
    in_shardings = (param_shardings(shapes, mesh, rules), rows, rows, rows,
                    *((rows,) if explicit_order else ()), rep)
    # The tokens buffer is donated to the output tokens when they have the same shape.
    return jax.jit(kernel, in_shardings=in_shardings, out_shardings=(out_rows, stats),
                   donate_argnums=() if pad else (2,))
