"""Portable serving artifacts: the engine's functions serialized with `jax.export`, loadable by
any process with jax and numpy, without sigma_jax.

`export(cfg, params, options, slots, capacity, directory)` writes

    manifest.json   shapes and dtypes of every argument, every sampler option
                    (`SampleOptions(**manifest["options"])`), the vocabulary, the files
    init.bin        () -> state
    insert.bin      (params, state, slot, tokens, known, length, key) -> state
    step.bin        (params, state) -> state        (`iterations` sampler iterations)
    finished.bin    (state,) -> finished bool [S]
    result.bin      (state, slot) -> (tokens int32 [N], iterations, generated, model calls)
    params.npz      the parameters (when `params` holds arrays, not shapes), keys p0, p1, ...

Across the boundary every tree is a flat list of arrays: `params` in the order of
`manifest["params"]`, `state` in the order of `manifest["state"]`, and PRNG keys as their raw
key data (uint32 [..., 2] for threefry): `key` of a request is
`jax.random.key_data(jax.random.key(seed))`. slot and length are int32 scalars, tokens int32 [N],
known bool [N]. A request served through the artifacts gets bitwise the tokens of
`sigma_jax.sampling.serve` on the platform that ran them.

The artifacts check shapes and dtypes (jax.export refuses others), not values: a loader must
check each request itself, as `engine.check_request` does where sigma_jax is at hand: slot in
[0, slots), length in [1, capacity], known token ids in [0, manifest["vocab_size"]), at least
one known token without a start token. Outside those, an insert writes another slot (a slot is
clamped), never finishes (length 0) or returns garbage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.checks import check_choice, check_int, short_repr
from sigma_jax.config import ModelConfig
from sigma_jax.model import check_params
from sigma_jax.sampling import engine
from sigma_jax.sampling.options import SampleOptions

FUNCTIONS = ("init", "insert", "step", "finished", "result")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's platform names


def export(cfg: ModelConfig, params, options: SampleOptions, slots: int, capacity: int,
           directory, *, platforms=("cpu",), iterations: int = 1) -> dict:
    """Write the engine's artifacts for `platforms` (a non-empty tuple or list of distinct names
    of PLATFORMS, e.g. ('cpu',), ('cuda', 'tpu'): lowering for a platform needs no device of it)
    to `directory`; returns the manifest. params: the params dict of `cfg`, or a tree of
    `jax.ShapeDtypeStruct` (then no params.npz is written). iterations >= 1: sampler iterations
    per step. Bad arguments (those of `engine.init`, params whose tree or shapes are not
    `cfg`'s, platforms, iterations, a directory that is a file) are one-line ValueErrors raised
    before the directory is created; every function is exported before any file is written."""
    iterations = check_int("iterations", iterations, 1)
    platforms = _check_platforms(platforms)
    slots, capacity = engine.check_init(cfg, options, slots, capacity)
    check_params(cfg, params)
    directory = _artifact_directory(directory)
    state_shape = jax.eval_shape(lambda: engine.init(cfg, options, slots, capacity))
    state_leaves, state_tree = jax.tree.flatten(state_shape)
    param_leaves, param_tree = jax.tree.flatten(params)
    key_slots = [i for i, x in enumerate(state_leaves) if _is_key(x)]
    key_impl = jax.random.key_impl(jax.random.key(0))

    def to_state(flat):
        flat = list(flat)
        for i in key_slots:
            flat[i] = jax.random.wrap_key_data(flat[i], impl=key_impl)
        return jax.tree.unflatten(state_tree, flat)

    def to_flat(state):
        flat = jax.tree.leaves(state)
        return [jax.random.key_data(x) if i in key_slots else x for i, x in enumerate(flat)]

    as_params = lambda flat: jax.tree.unflatten(param_tree, list(flat))
    functions = {
        "init": lambda: to_flat(engine.init(cfg, options, slots, capacity)),
        "insert": lambda p, s, slot, tokens, known, length, key: to_flat(engine.insert(
            cfg, as_params(p), to_state(s), slot, tokens, known, length,
            jax.random.wrap_key_data(key, impl=key_impl))),
        "step": lambda p, s: to_flat(engine.step(cfg, as_params(p), to_state(s), iterations)),
        "finished": lambda s: engine.finished(to_state(s)),
        "result": lambda s, slot: _result_arrays(to_state(s), slot),
    }
    flat_state = _abstract([jax.ShapeDtypeStruct(x.shape, x.dtype) if not _is_key(x) else
                            jax.eval_shape(jax.random.key_data, x) for x in state_leaves])
    flat_params = _abstract(param_leaves)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    key_data = jax.eval_shape(jax.random.key_data, jax.random.key(0))
    arguments = {
        "init": (),
        "insert": (flat_params, flat_state, scalar, jax.ShapeDtypeStruct((capacity,), jnp.int32),
                   jax.ShapeDtypeStruct((capacity,), jnp.bool_), scalar, key_data),
        "step": (flat_params, flat_state),
        "finished": (flat_state,),
        "result": (flat_state, scalar),
    }
    serialized = {name: jax.export.export(jax.jit(functions[name]), platforms=platforms)(
        *arguments[name]).serialize() for name in FUNCTIONS}
    manifest = _manifest(cfg, options, slots, capacity, platforms, iterations, param_leaves,
                         flat_state, key_data)
    _write(directory, serialized, param_leaves, manifest)
    return manifest


def _artifact_directory(directory) -> Path:
    """`directory` as a Path, after a one-line ValueError if it is a file."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot write the artifacts to {directory}: it is a file; pass a "
                         "directory")
    return directory


def _write(directory: Path, serialized: dict, param_leaves: list, manifest: dict) -> None:
    """The files of the artifacts: one .bin per function, params.npz when the params are
    arrays, manifest.json last. A directory that cannot be created is a one-line ValueError."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write the artifacts to {directory} "
                         f"({error.strerror or error}); pass a new directory") from None
    for name, data in serialized.items():
        (directory / f"{name}.bin").write_bytes(data)
    if all(isinstance(x, jax.Array | np.ndarray) for x in param_leaves):
        np.savez(directory / "params.npz", **{f"p{i}": np.asarray(x)
                                             for i, x in enumerate(param_leaves)})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _check_platforms(platforms) -> tuple[str, ...]:
    """`platforms` as a tuple after one-line ValueErrors: a non-empty tuple or list of distinct
    names of PLATFORMS."""
    if not isinstance(platforms, tuple | list) or not platforms:
        raise ValueError("platforms must be a non-empty tuple of platform names such as "
                         f"('cpu',) or ('cuda', 'tpu'); got {short_repr(platforms)}")
    for i, name in enumerate(platforms):
        if name == "gpu":
            raise ValueError(f"platforms[{i}] must name the GPU platform, 'cuda' (NVIDIA) or "
                             "'rocm' (AMD), not 'gpu'")
        check_choice(f"platforms[{i}]", name, PLATFORMS)
    if len(set(platforms)) != len(platforms):
        raise ValueError(f"platforms must name each platform once; got {short_repr(platforms)}")
    return tuple(platforms)


def manifest_options(options: SampleOptions) -> dict:
    """The manifest's "options": every field of `options` by name, as JSON values (concrete
    traced fields are Python numbers), so that `SampleOptions(**manifest["options"])` equals
    the options the artifacts sample with."""
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}


def _result_arrays(state, slot):
    tokens, stats = engine.result(state, slot)
    return (tokens, stats.iterations[0], stats.generated[0], stats.forward_passes)


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract(leaves) -> list:
    return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]


def _manifest(cfg, options, slots, capacity, platforms, iterations, param_leaves, flat_state,
              key_data) -> dict:
    spec = lambda x: {"shape": list(x.shape), "dtype": str(jnp.dtype(x.dtype))}
    return {
        "format": "sigma_jax engine artifacts 1",
        "platforms": list(platforms), "slots": slots, "capacity": capacity,
        "iterations_per_step": iterations, "vocab_size": cfg.vocab_size, "bos": cfg.bos,
        "options": manifest_options(options),
        "files": {name: f"{name}.bin" for name in FUNCTIONS},
        "params": [spec(x) for x in param_leaves],
        "state": [spec(x) for x in flat_state],
        "key": spec(key_data),
        "request": {"tokens": {"shape": [capacity], "dtype": "int32"},
                    "known": {"shape": [capacity], "dtype": "bool"},
                    "length": {"shape": [], "dtype": "int32"},
                    "slot": {"shape": [], "dtype": "int32"}},
    }
