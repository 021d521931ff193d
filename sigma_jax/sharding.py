"""Device meshes, the logical-axis table, and `constrain()`: the one helper every sharding hint
uses. This module knows meshes and axis names only; of sigma_jax it imports only the leaf checks.

The mesh has three axes, always in this order:

  data    pure data parallelism: the batch is split, parameters are replicated;
  fsdp    the batch is split too, and parameters are split along their model width ("embed");
          XLA all-gathers each layer's weights where they are used;
  tensor  heads, MLP width and vocabulary are split (Megatron-style tensor parallelism).

Library code never names mesh axes. It names *logical* axes ("batch", "heads", ...) and the
`DEFAULT_RULES` table maps them onto mesh axes. The model declares its parameters' logical axes
(`param_sharding.param_shardings`), the cache its own (`cache.cache_sharding`); training
(`sigma_jax.train`) and sharded sampling (`sampling.sample_sharded`) put them on their jitted
entry points. Without an ambient mesh (`jax.set_mesh`), `constrain()` does nothing. `fit_spec`
drops a mesh axis from a dimension it does not divide (a vocabulary of 11 on tensor=4 stays
replicated), so tiny models run on any mesh; batches use `check_batch`.

Axis types. Auto meshes (the default, `MeshConfig.axis_type='auto'`) let XLA propagate shardings;
`constrain` then uses `jax.lax.with_sharding_constraint`. Explicit meshes carry shardings in the
array types; `constrain` then uses `jax.sharding.reshard`. Under Explicit:
  - Flax Linen layers are not Explicit-clean (`nn.Embed` gathers and `nn.Dense` matmuls take no
    `out_sharding=`), so the model runs its module through `auto_axes_call`: inside it the mesh's
    axes are Auto, and its outputs come back with explicit shardings;
  - `cache.write` passes `out_sharding=explicit_spec(...)` to its scatter;
  - calls need `with jax.set_mesh(mesh):` (the ambient mesh is how `constrain` sees it).

Host data: each process's share of a batch enters with `place_local_batch`, data every process
holds in full with `place_global`; results leave with `to_host` (all-gathered across processes).
`mesh_config` reads the launchers' --mesh flag ('auto' or data:fsdp:tensor).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding

from sigma_jax.checks import check_int, is_concrete, short_repr

MESH_AXES = ("data", "fsdp", "tensor")
AXIS_TYPES = ("auto", "explicit")

# ---------------------------------------------------------------- mesh


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes (integers >= 1, numpy integers accepted
    and stored as ints), and their type: 'auto' or 'explicit'."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    axis_type: str = "auto"

    def __post_init__(self):
        for name in MESH_AXES:
            object.__setattr__(self, name, check_int(f"mesh axis {name}", getattr(self, name), 1))
        if self.axis_type not in AXIS_TYPES:
            raise ValueError(f"axis_type (--mesh_axis_type) must be auto or explicit, got "
                             f"{self.axis_type!r}")

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
    experiments; it uses a leading subset of the devices). mesh_cfg must be a MeshConfig (e.g.
    `MeshConfig.parse('2:2:2')`): anything else is a one-line ValueError.
    """
    if not isinstance(mesh_cfg, MeshConfig):
        raise ValueError(f"mesh_cfg must be a MeshConfig, e.g. MeshConfig.parse('1:1:1'); got "
                         f"{short_repr(mesh_cfg)}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if mesh_cfg.size > n or n % mesh_cfg.size:
        hint = ""
        if mesh_cfg.size > n and all(d.platform == "cpu" for d in devices):
            hint = (f" (on a CPU host, ask for {mesh_cfg.size} with jax_num_cpu_devices before "
                    "any JAX call; launch.sample: --host_devices)")
        raise ValueError(f"mesh {mesh_cfg} needs {mesh_cfg.size} devices, which must divide the "
                         f"{n} available device{'s' if n != 1 else ''}{hint}")
    kind = AxisType.Explicit if mesh_cfg.axis_type == "explicit" else AxisType.Auto
    return jax.make_mesh(mesh_cfg.shape, MESH_AXES, axis_types=(kind,) * len(MESH_AXES),
                         devices=devices[: mesh_cfg.size])


def local_mesh() -> jax.sharding.Mesh:
    """The 1x1x1 mesh on the first device: what training and sampling use when given no mesh."""
    return make_mesh(MeshConfig(), jax.devices()[:1])


def as_mesh(mesh: jax.sharding.Mesh | MeshConfig | None) -> jax.sharding.Mesh:
    """A Mesh from a Mesh (itself), a MeshConfig (`make_mesh`) or None (`local_mesh`); anything
    else is a one-line ValueError (`check_mesh`)."""
    if isinstance(mesh, MeshConfig):
        return make_mesh(mesh)
    if mesh is None:
        return local_mesh()
    check_mesh(mesh, allowed="a jax.sharding.Mesh, a MeshConfig or None")
    return mesh


def check_mesh(mesh, allowed: str = "a jax.sharding.Mesh") -> None:
    """One-line ValueError naming `mesh` unless it is a `jax.sharding.Mesh` whose axes are named
    as `make_mesh` names them (the batch axes included), saying what to pass.
    allowed: how the message names what the caller takes (e.g. 'a jax.sharding.Mesh or None',
    where the caller handles None itself)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        got = f"MeshConfig '{mesh}'" if isinstance(mesh, MeshConfig) else short_repr(mesh)
        raise ValueError(f"mesh must be {allowed}, e.g. make_mesh(MeshConfig.parse('1:1:1')); "
                         f"got {got}")
    names = set(mesh.axis_names)
    if not names <= set(MESH_AXES) or not set(DEFAULT_RULES.mesh_axes("batch")) <= names:
        raise ValueError(f"mesh axes must be named among {', '.join(map(repr, MESH_AXES))} and "
                         f"include the batch axes {DEFAULT_RULES.mesh_axes('batch')}, as "
                         f"make_mesh names them; got {tuple(mesh.axis_names)}")


def mesh_text(mesh) -> str:
    """'data:fsdp:tensor' sizes of a mesh, e.g. '2:2:2' (how launchers and logs print a mesh)."""
    return ":".join(str(_axis_sizes(mesh).get(axis, 1)) for axis in MESH_AXES)


# ---------------------------------------------------------------- logical axes

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
    """Logical names (None = replicated) -> `jax.P` by `rules` (default: the library's table, the
    one every `constrain` uses); a mesh axis used by two dimensions raises."""
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


def fitted_sharding(mesh, logical_names: Sequence[str | None], shape) -> NamedSharding:
    """The NamedSharding of an array of `shape` with these logical axes on `mesh` (`fit_spec`)."""
    return NamedSharding(mesh, fit_spec(logical_to_spec(logical_names), shape, mesh))


def is_logical_axes(x) -> bool:
    """Whether x is one array's logical axes (a tuple of names or None): a pytree leaf test."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _all_explicit(mesh) -> bool:
    return bool(mesh.axis_types) and all(t == AxisType.Explicit for t in mesh.axis_types)


def _no_shardable_axes(mesh) -> bool:
    """No mesh, or one whose axes are all Manual (inside `shard_map`): nothing to constrain."""
    return mesh.empty or all(t == AxisType.Manual for t in mesh.axis_types)


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Ask for x to be sharded by its logical axes under the ambient mesh (`jax.set_mesh`).

    No mesh: x unchanged (so library code runs unsharded). All-Explicit mesh: `reshard`. Any other
    mesh: `with_sharding_constraint`. Mesh axes that do not divide a dimension are dropped.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if _no_shardable_axes(mesh):
        return x
    if len(logical_names) != x.ndim:
        raise ValueError(f"constrain got {len(logical_names)} logical axes {tuple(logical_names)} "
                         f"for an array of shape {x.shape}")
    spec = fit_spec(logical_to_spec(logical_names), x.shape, mesh)
    if _all_explicit(mesh):
        return jax.sharding.reshard(x, spec)
    if is_concrete(x):  # eager call on a concrete array: place it
        return jax.device_put(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def explicit_spec(shape: Sequence[int], logical_names: Sequence[str | None]) -> jax.P | None:
    """The fitted spec for an op's `out_sharding=` under an all-Explicit ambient mesh, else None.

    For ops whose output sharding Explicit mode cannot infer (scatters, some einsums); None keeps
    the op's default behaviour with no mesh or an Auto mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if _no_shardable_axes(mesh) or not _all_explicit(mesh):
        return None
    return fit_spec(logical_to_spec(logical_names), shape, mesh)


def _check_no_explicit_inputs(args) -> None:
    for leaf in jax.tree.leaves(args):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty and _all_explicit(mesh):
            raise ValueError("inputs are sharded on an Explicit mesh but no mesh is set; call "
                             "inside `with jax.set_mesh(mesh):`")


def auto_axes_call(f, out_axes, *args):
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
        return jax.tree.map(lambda axes, x: constrain(x, axes), out_axes, out,
                            is_leaf=is_logical_axes)
    # One abstract trace to learn the output shapes, then the real call with fitted specs.
    shapes = jax.eval_shape(jax.sharding.auto_axes(f, out_sharding=jax.P()), *args)
    specs = jax.tree.map(
        lambda axes, s: fit_spec(logical_to_spec(axes), s.shape, mesh), out_axes, shapes,
        is_leaf=is_logical_axes)
    return jax.sharding.auto_axes(f, out_sharding=specs)(*args)


# ---------------------------------------------------------------- batches and replication


def replicated(mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, jax.P())


def batch_rows(mesh) -> NamedSharding:
    """Axis 0 (rows) split over the batch mesh axes, every other axis replicated; the batch must
    divide by `batch_multiple` (see `batch_spec` for a sharding fitted to any batch)."""
    return NamedSharding(mesh, logical_to_spec(("batch",)))


def batch_multiple(mesh) -> int:
    """How many ways the batch is split: the product of the batch mesh axes' sizes."""
    sizes = _axis_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in DEFAULT_RULES.mesh_axes("batch"))


def check_batch(batch: int, mesh) -> None:
    """Raise a one-line ValueError unless `batch` divides evenly over the batch mesh axes."""
    multiple = batch_multiple(mesh)
    if batch % multiple:
        axes = "×".join(DEFAULT_RULES.mesh_axes("batch"))
        raise ValueError(f"batch {batch} is not divisible by the {multiple} devices of the {axes} "
                         f"axes; use a multiple of {multiple}")


# ---------------------------------------------------------------- the mesh flag; host data


def mesh_config(text: str, axis_type: str = "auto", *, devices: int | None = None,
                platform: str | None = None, process_count: int | None = None,
                host_devices: int | None = None) -> MeshConfig:
    """The launchers' --mesh value as a MeshConfig: 'data:fsdp:tensor', or 'auto'.

    'auto' puts every device on "data" (pure data parallelism), except on a single-process CPU
    host, where it is the devices the process asked for by `jax_num_cpu_devices` (one unless
    set): any others are fake ones from XLA flags (ask for them explicitly, e.g.
    --mesh=8:1:1). The keyword arguments default to the running JAX (device_count,
    default_backend, process_count, the jax_num_cpu_devices setting) and exist for tests.
    """
    if str(text).strip().lower() != "auto":
        return MeshConfig.parse(text, axis_type)
    devices = jax.device_count() if devices is None else devices
    platform = jax.default_backend() if platform is None else platform
    process_count = jax.process_count() if process_count is None else process_count
    if host_devices is None:
        host_devices = max(1, jax.config.jax_num_cpu_devices)
    data = min(host_devices, devices) if platform == "cpu" and process_count == 1 else devices
    return MeshConfig(data=data, axis_type=axis_type)


def place_local_batch(local_batch, mesh) -> jax.Array:
    """A global batch from this process's rows: `jax.make_array_from_process_local_data`.

    local_batch: [B / process_count, ...], this process's share of the global batch (what the
    data iterator yields: it reads examples process_index::process_count). The global batch
    [B, ...] is split over the batch mesh axes; each process's rows go to its own devices. One
    process: this is just a sharded device_put. B must divide by `batch_multiple` (`check_batch`).
    """
    local_batch = np.asarray(local_batch)
    global_rows = local_batch.shape[0] * jax.process_count()
    shape = (global_rows, *local_batch.shape[1:])
    check_batch(global_rows, mesh)
    sharding = fitted_sharding(mesh, ("batch",), shape)
    return jax.make_array_from_process_local_data(sharding, local_batch, shape)


def place_global(x, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full (same values everywhere), placed by
    `sharding`: each process copies only the slices its own devices hold. Works across hosts,
    where `jax.device_put` of a host array onto other processes' devices does not (typed PRNG
    keys go through their key data)."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(place_global(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """numpy copies of every leaf; arrays spread over several processes are all-gathered first
    (`process_allgather(tiled=True)`, a collective: every process must call it)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
